/* qcow2py native hot path: see qcow2py_native.h for the contracts. */
#define _GNU_SOURCE
#include "qcow2py_native.h"

#include <errno.h>
#include <fcntl.h>
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
    if (len == 0)
        return 1;
    if (!buf)
        return QP_ERR_ARGS;
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
    if (!bad_index)
        return QP_ERR_ARGS;
    *bad_index = -1;
    if (cluster_bits < 9 || cluster_bits > 21)
        return QP_ERR_ARGS;
    size_t entry_size = extended ? 16 : 8;
    if (table_len % entry_size)
        return QP_ERR_ARGS;
    size_t n_entries = table_len / entry_size;
    size_t per = extended ? 32 : 1;
    if (n_entries > SIZE_MAX / per || n_units != n_entries * per)
        return QP_ERR_ARGS;
    if (n_units && (!table || !kinds || !hosts))
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


#include <sys/uio.h>
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

/* ------------------------------------------------------------------ bitmaps */

static inline uint64_t load_le64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

/* Word w of a bitmap (bits [64w, 64w + 64)); bytes past nbytes read as 0. */
static inline uint64_t bm_word(const uint8_t *bits, size_t nbytes, int64_t w)
{
    size_t off = (size_t)w * 8;
    if (off + 8 <= nbytes)
        return load_le64(bits + off);
    uint64_t v = 0;
    for (size_t i = 0; off + i < nbytes; i++)
        v |= (uint64_t)bits[off + i] << (8 * i);
    return v;
}

static inline int popcount64(uint64_t x)
{
    /* SWAR: no dependency on the popcnt instruction being available */
    x = x - ((x >> 1) & 0x5555555555555555ULL);
    x = (x & 0x3333333333333333ULL) + ((x >> 2) & 0x3333333333333333ULL);
    x = (x + (x >> 4)) & 0x0f0f0f0f0f0f0f0fULL;
    return (int)((x * 0x0101010101010101ULL) >> 56);
}

/* The two word loops that dominate counting: on x86-64 Linux with GCC they are
 * compiled twice (with and without the popcnt instruction) and picked at load
 * time; elsewhere they use the portable popcount64. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define QP_POPCNT_CLONES __attribute__((target_clones("popcnt", "default")))
#define QP_POPCOUNT(x) __builtin_popcountll(x)
#else
#define QP_POPCNT_CLONES
#define QP_POPCOUNT(x) popcount64(x)
#endif

/* set bits in n whole words at p */
QP_POPCNT_CLONES
int64_t qp_internal_popcount_words(const uint8_t *p, int64_t n)
{
    int64_t count = 0;
    for (int64_t w = 0; w < n; w++)
        count += QP_POPCOUNT(load_le64(p + (size_t)w * 8));
    return count;
}

/* run starts (set bits after a clear one) in n whole words at p; *prev is the
 * bit before p on entry and the last bit on return */
QP_POPCNT_CLONES
int64_t qp_internal_run_starts(const uint8_t *p, int64_t n, uint64_t *prev)
{
    int64_t count = 0;
    uint64_t c = *prev;
    for (int64_t w = 0; w < n; w++) {
        uint64_t word = load_le64(p + (size_t)w * 8);
        count += QP_POPCOUNT(word & ~((word << 1) | c));
        c = word >> 63;
    }
    *prev = c;
    return count;
}

/* mask of the bits of word w inside [start, end) (differences, not base + 64,
 * so nbits up to INT64_MAX cannot overflow) */
static inline uint64_t bm_range_mask(int64_t w, int64_t start, int64_t end)
{
    uint64_t m = ~0ULL;
    int64_t base = w << 6;
    if (start > base)
        m &= ~0ULL << (start - base);
    if (end - base < 64)
        m &= (1ULL << (end - base)) - 1;
    return m;
}

/* bytes of a bitmap of nbits >= 0 bits (nbits + 7 would overflow at INT64_MAX) */
static inline size_t bm_nbytes(int64_t nbits)
{
    return (size_t)(nbits / 8 + (nbits % 8 != 0));
}

/* Clip [start, end) to [0, nbits): 0 when nothing is left (or nbits < 0). */
static inline int bm_clip(int64_t nbits, int64_t *start, int64_t *end)
{
    if (nbits < 0)
        return 0;
    if (*start < 0)
        *start = 0;
    if (*end > nbits)
        *end = nbits;
    return *start < *end;
}

int64_t qp_bitmap_count(const uint8_t *bits, int64_t nbits, int64_t start, int64_t end)
{
    if (!bm_clip(nbits, &start, &end))
        return 0;
    if (!bits)
        return QP_ERR_ARGS;
    size_t nbytes = bm_nbytes(nbits);
    int64_t w0 = start >> 6, w1 = (end - 1) >> 6;
    int64_t count = 0;
    if (w0 == w1)
        return popcount64(bm_word(bits, nbytes, w0) & bm_range_mask(w0, start, end));
    count += popcount64(bm_word(bits, nbytes, w0) & bm_range_mask(w0, start, end));
    count += qp_internal_popcount_words(bits + (size_t)(w0 + 1) * 8, w1 - w0 - 1);
    count += popcount64(bm_word(bits, nbytes, w1) & bm_range_mask(w1, start, end));
    return count;
}

int64_t qp_bitmap_next(const uint8_t *bits, int64_t nbits, int64_t start, int64_t end,
                       int value)
{
    if (!bm_clip(nbits, &start, &end) || !bits)
        return -1;
    size_t nbytes = bm_nbytes(nbits);
    uint64_t flip = value ? 0 : ~0ULL;
    int64_t w = start >> 6, last = (end - 1) >> 6;
    uint64_t word = (bm_word(bits, nbytes, w) ^ flip) & (~0ULL << (start & 63));
    for (;;) {
        if (word) {
            int64_t i = (w << 6) + __builtin_ctzll(word);
            return i < end ? i : -1;
        }
        if (++w > last)
            return -1;
        word = bm_word(bits, nbytes, w) ^ flip;
    }
}

/* Where runs go: plain bit runs, or pieces of a masked extent. */
typedef struct {
    int64_t *a, *b, *c;    /* starts/lens, or guest/len/idx */
    int64_t max, n;
    int mask;              /* 0: bit runs; 1: extent pieces */
    int64_t g0, g1, gran, idx;
} bm_sink;

static inline void bm_emit(bm_sink *s, int64_t rs, int64_t re)
{
    if (s->n < s->max) {
        if (!s->mask) {
            s->a[s->n] = rs;
            s->b[s->n] = re - rs;
        } else {
            /* rs < re <= ceil(g1 / gran): rs * gran < g1 fits, re * gran may
             * not (granularity near 2^63), so clip re before multiplying */
            int64_t lo = rs * s->gran;
            int64_t hi = re > s->g1 / s->gran ? s->g1 : re * s->gran;
            if (lo < s->g0)
                lo = s->g0;
            if (hi > s->g1)
                hi = s->g1;
            s->a[s->n] = lo;
            s->b[s->n] = hi - lo;
            s->c[s->n] = s->idx;
        }
    }
    s->n++;
}

/* Emit the runs of set bits in [start, end) (already clipped, start < end),
 * walking words and toggling at each transition. */
static void bm_scan_runs(const uint8_t *bits, size_t nbytes, int64_t start, int64_t end,
                         bm_sink *s)
{
    int64_t w0 = start >> 6, w1 = (end - 1) >> 6;
    int in_run = 0;
    int64_t run_start = 0;
    for (int64_t w = w0; w <= w1; w++) {
        uint64_t word = bm_word(bits, nbytes, w);
        if (w == w0 || w == w1)
            word &= bm_range_mask(w, start, end);
        /* fast skips: nothing changes inside this word */
        if (!in_run && word == 0)
            continue;
        if (in_run && word == ~0ULL)
            continue;
        int64_t base = w << 6;
        uint64_t cur = in_run ? ~word : word;     /* 1s mark the next transition */
        while (cur) {
            int b = __builtin_ctzll(cur);
            if (!in_run) {
                run_start = base + b;
                in_run = 1;
                cur = ~word;
            } else {
                bm_emit(s, run_start, base + b);
                in_run = 0;
                cur = word;
            }
            cur &= b < 63 ? (~0ULL << (b + 1)) : 0;
        }
    }
    if (in_run)
        bm_emit(s, run_start, end);
}

int64_t qp_bitmap_runs(const uint8_t *bits, int64_t nbits, int64_t start, int64_t end,
                       int64_t *starts, int64_t *lens, int64_t max_out)
{
    if (!bm_clip(nbits, &start, &end))
        return 0;
    if (!bits)
        return QP_ERR_ARGS;
    size_t nbytes = bm_nbytes(nbits);
    if (max_out <= 0 || !starts || !lens) {
        /* count only: a run starts at every set bit whose predecessor is clear */
        int64_t w0 = start >> 6, w1 = (end - 1) >> 6;
        uint64_t word = bm_word(bits, nbytes, w0) & bm_range_mask(w0, start, end);
        int64_t count = popcount64(word & ~(word << 1));
        uint64_t prev = word >> 63;
        if (w1 > w0) {
            count += qp_internal_run_starts(bits + (size_t)(w0 + 1) * 8, w1 - w0 - 1, &prev);
            word = bm_word(bits, nbytes, w1) & bm_range_mask(w1, start, end);
            count += popcount64(word & ~((word << 1) | prev));
        }
        return count;
    }
    /* Branch-light fill: per word, the run starts (set bits after a clear one)
     * and the run ends (clear bits after a set one) are extracted with ctz
     * loops; the k-th end pairs with the k-th start.  lens holds the ends
     * until the final pass turns them into lengths. */
    int64_t w0 = start >> 6, w1 = (end - 1) >> 6;
    int64_t ns = 0, ne = 0;
    uint64_t prev = 0;
    for (int64_t w = w0; w <= w1; w++) {
        uint64_t word = (w > w0 && w < w1) ? load_le64(bits + (size_t)w * 8)
            : bm_word(bits, nbytes, w) & bm_range_mask(w, start, end);
        uint64_t shifted = (word << 1) | prev;
        prev = word >> 63;
        uint64_t rise = word & ~shifted, fall = ~word & shifted;
        int64_t base = w << 6;
        if (ns + 64 <= max_out && ne + 64 <= max_out) {        /* room for any word */
            /* the word's first start and first end without a branch: a store
             * that is not counted gets overwritten by the next one */
            starts[ns] = base + __builtin_ctzll(rise | (1ULL << 63));
            ns += rise != 0;
            rise &= rise - 1;
            lens[ne] = base + __builtin_ctzll(fall | (1ULL << 63));
            ne += fall != 0;
            fall &= fall - 1;
            while (rise) {
                starts[ns++] = base + __builtin_ctzll(rise);
                rise &= rise - 1;
            }
            while (fall) {
                lens[ne++] = base + __builtin_ctzll(fall);
                fall &= fall - 1;
            }
        } else {
            while (rise) {
                if (ns < max_out)
                    starts[ns] = base + __builtin_ctzll(rise);
                ns++;
                rise &= rise - 1;
            }
            while (fall) {
                if (ne < max_out)
                    lens[ne] = base + __builtin_ctzll(fall);
                ne++;
                fall &= fall - 1;
            }
        }
    }
    if (ne < ns) {                       /* the last run reaches the end */
        if (ne < max_out)
            lens[ne] = end;
        ne++;
    }
    int64_t stored = ns < max_out ? ns : max_out;
    for (int64_t k = 0; k < stored; k++)
        lens[k] -= starts[k];
    return ns;
}

/* out = a OP b over 8-byte words (memcpy keeps unaligned buffers and aliasing
 * legal; the compiler turns these loops into vector code), then the tail. */
#define QP_BITMAP_LOOP(EXPR)                                          \
    do {                                                              \
        for (i = 0; i + 8 <= nbytes; i += 8) {                        \
            uint64_t x, y, r;                                         \
            memcpy(&x, a + i, 8);                                     \
            memcpy(&y, b + i, 8);                                     \
            r = (EXPR);                                               \
            memcpy(out + i, &r, 8);                                   \
        }                                                             \
        for (; i < nbytes; i++) {                                     \
            uint8_t x = a[i], y = b[i];                               \
            out[i] = (uint8_t)(EXPR);                                 \
        }                                                             \
    } while (0)

int qp_bitmap_op(const uint8_t *a, const uint8_t *b, uint8_t *out, size_t nbytes, int op)
{
    size_t i;
    if (nbytes && (!a || !b || !out))
        return QP_ERR_ARGS;
    switch (op) {
    case QP_BITMAP_AND:
        QP_BITMAP_LOOP(x & y);
        return 0;
    case QP_BITMAP_OR:
        QP_BITMAP_LOOP(x | y);
        return 0;
    case QP_BITMAP_ANDNOT:
        QP_BITMAP_LOOP(x & ~y);
        return 0;
    default:
        return QP_ERR_ARGS;
    }
}

int64_t qp_bitmap_mask_extents(const int64_t *guest, const int64_t *len, int64_t n,
                               const uint8_t *bits, int64_t nbits, int64_t granularity,
                               int64_t *out_guest, int64_t *out_len, int64_t *out_idx,
                               int64_t max_out)
{
    if (granularity < 1 || n < 0 || nbits < 0 || (n && (!guest || !len)) ||
        (nbits && !bits))
        return QP_ERR_ARGS;
    size_t nbytes = bm_nbytes(nbits);
    bm_sink s = {out_guest, out_len, out_idx, max_out, 0, 1, 0, 0, granularity, 0};
    if (!out_guest || !out_len || !out_idx)
        s.max = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t g = guest[i], l = len[i];
        if (g < 0 || l < 0 || g > INT64_MAX - l)
            return QP_ERR_ARGS;
        if (l == 0)
            continue;
        int64_t b0 = g / granularity;
        int64_t b1 = (g + l - 1) / granularity + 1;
        if (!bm_clip(nbits, &b0, &b1))
            continue;
        s.g0 = g;
        s.g1 = g + l;
        s.idx = i;
        bm_scan_runs(bits, nbytes, b0, b1, &s);
    }
    return s.n;
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
