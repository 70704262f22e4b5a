/* qcow2py native: bitmaps (contracts in bitmap.h). */
#include "bitmap.h"

#include <string.h>

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
