/* qcow2py native: file I/O of the copy path (contracts in io.h). */
#define _GNU_SOURCE
#include "io.h"
#include "zero.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

int qp_pread_runs(int fd, uint8_t *buf, size_t buf_len,
                  const int64_t *buf_off, const int64_t *host_off,
                  const int64_t *len, size_t n)
{
    if (n && (!buf_off || !host_off || !len))
        return -EINVAL;
    for (size_t i = 0; i < n; i++) {
        /* the run fits the buffer, and its end in the file fits an off_t */
        if (buf_off[i] < 0 || host_off[i] < 0 || len[i] < 0 ||
            (uint64_t)buf_off[i] > buf_len ||
            (uint64_t)len[i] > buf_len - (uint64_t)buf_off[i] ||
            host_off[i] > INT64_MAX - len[i])
            return -EINVAL;
        if (len[i] && !buf)
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

/* Set the mark bits of the units [start, end) touches; base >= 0, start >= 0
 * and end >= start were checked, so no difference overflows.  Bits at and
 * past mark_nbits are left alone (the buffer may be a bitarray's). */
static void mark_range(uint8_t *mark, int64_t mark_nbits, int64_t base, int shift,
                       int64_t start, int64_t end)
{
    if (!mark || end <= start || start < base)
        return;
    int64_t first = (start - base) >> shift, last = (end - 1 - base) >> shift;
    for (int64_t u = first; u <= last && u < mark_nbits; u++)
        mark[u / 8] |= (uint8_t)(1u << (u % 8));
}

#define QP_IOV 512

struct qp_gather {
    int fd;
    struct iovec iov[QP_IOV];
    int cnt;
    int64_t start, end;        /* target range covered by iov[] */
};

static int gather_flush(struct qp_gather *g)
{
    int64_t off = g->start;
    int idx = 0;
    while (idx < g->cnt) {
        ssize_t w = pwritev(g->fd, g->iov + idx, g->cnt - idx, (off_t)off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        off += w;
        /* advance over what was written (short writes are rare but legal) */
        while (idx < g->cnt && (size_t)w >= g->iov[idx].iov_len) {
            w -= (ssize_t)g->iov[idx].iov_len;
            idx++;
        }
        if (idx < g->cnt && w > 0) {
            g->iov[idx].iov_base = (uint8_t *)g->iov[idx].iov_base + w;
            g->iov[idx].iov_len -= (size_t)w;
        }
    }
    g->cnt = 0;
    return 0;
}

static int gather_add(struct qp_gather *g, const uint8_t *p, size_t n, int64_t dst)
{
    if (n == 0)
        return 0;
    if (g->cnt && (dst != g->end || g->cnt == QP_IOV)) {
        int rc = gather_flush(g);
        if (rc)
            return rc;
    }
    if (g->cnt == 0)
        g->start = dst;
    g->iov[g->cnt].iov_base = (void *)p;
    g->iov[g->cnt].iov_len = n;
    g->cnt++;
    g->end = dst + (int64_t)n;
    return 0;
}

int qp_write_batch(size_t n, const int64_t *buf_off, const int64_t *dst_off,
                   const int64_t *len, const int64_t *write_order, int dst_fd,
                   const uint8_t *buf, size_t buf_len, int64_t zero_chunk, int write_zeroes,
                   int64_t mark_base, int mark_shift, uint8_t *mark, int64_t mark_nbits,
                   int64_t *stats)
{
    /* page-aligned: zero runs may go to an O_DIRECT descriptor */
    static const uint8_t zeros[65536] __attribute__((aligned(4096)));
    if (zero_chunk < 0 || mark_shift < 0 || mark_shift > 40 || mark_base < 0 ||
        mark_nbits < 0 || (mark_nbits && !mark) || !stats)
        return -EINVAL;
    if (n && (!buf_off || !dst_off || !len || !write_order))
        return -EINVAL;
    for (size_t i = 0; i < n; i++) {
        /* the piece fits the buffer, and its end in the target fits an off_t */
        if (buf_off[i] < 0 || dst_off[i] < 0 || len[i] < 0 ||
            (uint64_t)buf_off[i] + (uint64_t)len[i] > buf_len ||
            dst_off[i] > INT64_MAX - len[i] ||
            write_order[i] < 0 || (uint64_t)write_order[i] >= n)
            return -EINVAL;
        if (len[i] && !buf)
            return -EINVAL;
    }
    /* in target order, gathering continuous pieces */
    struct qp_gather g;
    g.fd = dst_fd;
    g.cnt = 0;
    g.start = g.end = 0;
    for (size_t k = 0; k < n; k++) {
        size_t e = (size_t)write_order[k];
        const uint8_t *data = buf + buf_off[e];
        int64_t dst = dst_off[e], L = len[e];
        int rc;
        if (zero_chunk <= 0) {
            rc = gather_add(&g, data, (size_t)L, dst);
            if (rc)
                return rc;
            stats[1] += L;
            mark_range(mark, mark_nbits, mark_base, mark_shift, dst, dst + L);
            continue;
        }
        int64_t q = 0;
        while (q < L) {
            int64_t abs = dst + q;
            int64_t clen = zero_chunk - abs % zero_chunk;
            if (clen > L - q)
                clen = L - q;
            if (qp_is_zero(data + q, (size_t)clen)) {
                if (write_zeroes) {
                    for (int64_t o = 0; o < clen;) {
                        int64_t m = clen - o < (int64_t)sizeof zeros ? clen - o : (int64_t)sizeof zeros;
                        rc = gather_add(&g, zeros, (size_t)m, abs + o);
                        if (rc)
                            return rc;
                        o += m;
                    }
                }
                stats[2] += clen;
            } else {
                rc = gather_add(&g, data + q, (size_t)clen, abs);
                if (rc)
                    return rc;
                stats[1] += clen;
                mark_range(mark, mark_nbits, mark_base, mark_shift, abs, abs + clen);
            }
            q += clen;
        }
    }
    if (g.cnt)
        return gather_flush(&g);
    return 0;
}

int qp_start_writeback(int fd, int64_t offset, int64_t length)
{
    if (fd < 0 || offset < 0 || length < 0 || offset > INT64_MAX - length)
        return -EINVAL;
#ifdef SYNC_FILE_RANGE_WRITE
    if (sync_file_range(fd, (off64_t)offset, (off64_t)length, SYNC_FILE_RANGE_WRITE) < 0)
        return -errno;
#endif
    return 0;
}
