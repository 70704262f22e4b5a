/* qcow2py native hot path: see qcow2py_native.h for the contracts. */
#define _GNU_SOURCE
#include "qcow2py_native.h"

#include <errno.h>
#include <string.h>
#include <unistd.h>

static inline uint64_t load_be64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return __builtin_bswap64(v);
}

int qp_is_zero(const uint8_t *buf, size_t len)
{
    /* Check a 16-byte head by hand, then compare the buffer with itself
     * shifted by 16: memcmp is vectorised and needs no zero page. */
    size_t head = len < 16 ? len : 16;
    for (size_t i = 0; i < head; i++)
        if (buf[i])
            return 0;
    if (len <= 16)
        return 1;
    return memcmp(buf, buf + 16, len - 16) == 0;
}

#define L2E_OFFSET_MASK        0x00fffffffffffe00ULL
#define L2E_STD_RESERVED_MASK  0x3f000000000001feULL
#define OFLAG_COPIED           (1ULL << 63)
#define OFLAG_COMPRESSED       (1ULL << 62)
#define OFLAG_ZERO             1ULL

int qp_decode_l2(const uint8_t *table, size_t table_len, int cluster_bits,
                 int extended, int external_data,
                 uint8_t *kinds, int64_t *hosts, size_t n_units,
                 int64_t *bad_index)
{
    *bad_index = -1;
    if (cluster_bits < 9 || cluster_bits > 21)
        return QP_ERR_ARGS;
    size_t entry_size = extended ? 16 : 8;
    if (table_len % entry_size)
        return QP_ERR_ARGS;
    size_t n_entries = table_len / entry_size;
    size_t per = extended ? 32 : 1;
    if (n_units != n_entries * per)
        return QP_ERR_ARGS;
    uint64_t cluster_mask = (1ULL << cluster_bits) - 1;
    int csize_shift = 62 - (cluster_bits - 8);
    uint64_t coff_mask = (1ULL << csize_shift) - 1;
    int64_t sub_size = (int64_t)1 << (cluster_bits - 5);

    for (size_t i = 0; i < n_entries; i++) {
        uint64_t e = load_be64(table + i * entry_size);
        uint8_t *k = kinds + i * per;
        int64_t *h = hosts + i * per;

        if (e & OFLAG_COMPRESSED) {
            if (e & OFLAG_COPIED) {
                *bad_index = (int64_t)i;
                return QP_ERR_RESERVED;
            }
            if (extended && load_be64(table + i * entry_size + 8) != 0) {
                *bad_index = (int64_t)i;
                return QP_ERR_SUBCLUSTER;
            }
            int64_t coff = (int64_t)(e & coff_mask);
            for (size_t s = 0; s < per; s++) {
                k[s] = QP_COMPRESSED;
                h[s] = coff;
            }
            continue;
        }
        if (e & L2E_STD_RESERVED_MASK) {
            *bad_index = (int64_t)i;
            return QP_ERR_RESERVED;
        }
        uint64_t off = e & L2E_OFFSET_MASK;
        int allocated = off != 0 || (external_data && (e & OFLAG_COPIED));
        if (off & cluster_mask) {
            *bad_index = (int64_t)i;
            return QP_ERR_UNALIGNED;
        }
        if (!extended) {
            if (e & OFLAG_ZERO) {
                k[0] = allocated ? QP_ZERO_ALLOC : QP_ZERO;
                h[0] = allocated ? (int64_t)off : 0;
            } else if (allocated) {
                k[0] = QP_DATA;
                h[0] = (int64_t)off;
            } else {
                k[0] = QP_UNALLOCATED;
                h[0] = 0;
            }
            continue;
        }
        uint64_t bm = load_be64(table + i * entry_size + 8);
        uint32_t alloc = (uint32_t)bm, zero = (uint32_t)(bm >> 32);
        if ((alloc & zero) || (!allocated && alloc)) {
            *bad_index = (int64_t)i;
            return QP_ERR_SUBCLUSTER;
        }
        for (size_t s = 0; s < 32; s++) {
            int64_t sh = allocated ? (int64_t)off + (int64_t)s * sub_size : 0;
            if (zero & (1U << s))
                k[s] = allocated ? QP_ZERO_ALLOC : QP_ZERO;
            else if (alloc & (1U << s))
                k[s] = QP_DATA;
            else
                k[s] = allocated ? QP_UNALLOCATED_ALLOC : QP_UNALLOCATED;
            h[s] = (k[s] == QP_ZERO || k[s] == QP_UNALLOCATED) ? 0 : sh;
        }
    }
    return QP_OK;
}

int qp_pread_runs(int fd, uint8_t *buf, size_t buf_len,
                  const int64_t *buf_off, const int64_t *host_off,
                  const int64_t *len, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (buf_off[i] < 0 || host_off[i] < 0 || len[i] < 0 ||
            (uint64_t)buf_off[i] > buf_len ||
            (uint64_t)len[i] > buf_len - (uint64_t)buf_off[i])
            return -EINVAL;
    }
    for (size_t i = 0; i < n; i++) {
        uint8_t *dst = buf + buf_off[i];
        size_t want = (size_t)len[i], done = 0;
        while (done < want) {
            ssize_t r = pread(fd, dst + done, want - done, (off_t)(host_off[i] + done));
            if (r < 0) {
                if (errno == EINTR)
                    continue;
                return -errno;
            }
            if (r == 0) {
                memset(dst + done, 0, want - done);   /* past EOF reads as zeros */
                break;
            }
            done += (size_t)r;
        }
    }
    return 0;
}

static int write_all(int fd, const uint8_t *p, size_t n, int64_t off)
{
    size_t done = 0;
    while (done < n) {
        ssize_t w = pwrite(fd, p + done, n - done, (off_t)(off + done));
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        done += (size_t)w;
    }
    return 0;
}

static int read_full(int fd, uint8_t *p, size_t n, int64_t off)
{
    size_t done = 0;
    while (done < n) {
        ssize_t r = pread(fd, p + done, n - done, (off_t)(off + done));
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0) {
            memset(p + done, 0, n - done);
            break;
        }
        done += (size_t)r;
    }
    return 0;
}

static void mark_range(uint8_t *mark, size_t mark_len, int64_t base, int shift,
                       int64_t start, int64_t end)
{
    if (!mark || end <= start || start < base)
        return;
    int64_t first = (start - base) >> shift, last = (end - 1 - base) >> shift;
    for (int64_t u = first; u <= last && (uint64_t)u / 8 < mark_len; u++)
        mark[u / 8] |= (uint8_t)(1u << (u % 8));
}

int qp_copy_extents(size_t n, const int32_t *src_fd, const int64_t *src_off,
                    const int64_t *dst_off, const int64_t *len, int dst_fd,
                    uint8_t *buf, size_t buf_len, int64_t zero_chunk, int write_zeroes,
                    int64_t mark_base, int mark_shift, uint8_t *mark, size_t mark_len,
                    int64_t *stats)
{
    if (buf_len == 0 || zero_chunk < 0 || mark_shift < 0 || mark_shift > 40)
        return -EINVAL;
    for (size_t i = 0; i < n; i++)
        if (src_off[i] < 0 || dst_off[i] < 0 || len[i] < 0)
            return -EINVAL;
    static const uint8_t zeros[65536];
    for (size_t i = 0; i < n; i++) {
        int64_t done = 0;
        while (done < len[i]) {
            size_t piece = (size_t)(len[i] - done) < buf_len ? (size_t)(len[i] - done) : buf_len;
            int rc = read_full(src_fd[i], buf, piece, src_off[i] + done);
            if (rc)
                return rc;
            stats[0] += (int64_t)piece;
            stats[3] += 1;
            int64_t dst = dst_off[i] + done;
            if (zero_chunk <= 0) {
                rc = write_all(dst_fd, buf, piece, dst);
                if (rc)
                    return rc;
                stats[1] += (int64_t)piece;
                mark_range(mark, mark_len, mark_base, mark_shift, dst, dst + (int64_t)piece);
            } else {
                /* walk chunks aligned in target space; write runs of non-zero chunks */
                size_t pos = 0, run_start = 0;
                int in_run = 0;
                while (pos < piece) {
                    int64_t abs = dst + (int64_t)pos;
                    size_t clen = (size_t)(zero_chunk - abs % zero_chunk);
                    if (clen > piece - pos)
                        clen = piece - pos;
                    int z = qp_is_zero(buf + pos, clen);
                    if (!z && !in_run) {
                        run_start = pos;
                        in_run = 1;
                    } else if (z && in_run) {
                        rc = write_all(dst_fd, buf + run_start, pos - run_start, dst + (int64_t)run_start);
                        if (rc)
                            return rc;
                        stats[1] += (int64_t)(pos - run_start);
                        mark_range(mark, mark_len, mark_base, mark_shift,
                                   dst + (int64_t)run_start, dst + (int64_t)pos);
                        in_run = 0;
                    }
                    if (z) {
                        if (write_zeroes) {
                            size_t off = 0;
                            while (off < clen) {
                                size_t k = clen - off < sizeof zeros ? clen - off : sizeof zeros;
                                rc = write_all(dst_fd, zeros, k, abs + (int64_t)off);
                                if (rc)
                                    return rc;
                                off += k;
                            }
                        }
                        stats[2] += (int64_t)clen;
                    }
                    pos += clen;
                }
                if (in_run) {
                    rc = write_all(dst_fd, buf + run_start, piece - run_start, dst + (int64_t)run_start);
                    if (rc)
                        return rc;
                    stats[1] += (int64_t)(piece - run_start);
                    mark_range(mark, mark_len, mark_base, mark_shift,
                               dst + (int64_t)run_start, dst + (int64_t)piece);
                }
            }
            done += (int64_t)piece;
        }
    }
    return 0;
}
