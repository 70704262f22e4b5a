/* Bitmaps (persistent dirty bitmaps, copy masks): scans, operations, masking.
 * Bit i of a bitmap is bit (i % 8) of byte i / 8: LSB-first, as qcow2 stores
 * them and as bitarray does with endian="little".  A bitmap of nbits bits
 * needs (nbits + 7) / 8 bytes; bits at and past nbits are ignored.  Ranges
 * [start, end) are clipped to [0, nbits). */
#ifndef QCOW2PY_BITMAP_H
#define QCOW2PY_BITMAP_H
#include "common.h"

/* Number of set bits in [start, end); QP_ERR_ARGS if bits is NULL and the
 * clipped range is not empty. */
int64_t qp_bitmap_count(const uint8_t *bits, int64_t nbits, int64_t start, int64_t end);

/* First bit index in [start, end) whose value is `value` (0 or 1), or -1
 * (also -1, reading nothing, when bits is NULL). */
int64_t qp_bitmap_next(const uint8_t *bits, int64_t nbits, int64_t start, int64_t end,
                       int value);

/* Runs of set bits in [start, end), merged, in order: the k-th run starts at
 * bit starts[k] and has lens[k] bits (a run cut by the range is clipped).
 * Stores at most max_out runs (starts/lens may be NULL when max_out is 0);
 * returns the total number of runs (QP_ERR_ARGS if bits is NULL and the
 * clipped range is not empty). */
int64_t qp_bitmap_runs(const uint8_t *bits, int64_t nbits, int64_t start, int64_t end,
                       int64_t *starts, int64_t *lens, int64_t max_out);

#define QP_BITMAP_AND     0
#define QP_BITMAP_OR      1
#define QP_BITMAP_ANDNOT  2   /* a & ~b */

/* out[i] = a[i] OP b[i] for nbytes bytes (out may be a or b).  Returns 0, or
 * QP_ERR_ARGS for an unknown op or a NULL buffer. */
int qp_bitmap_op(const uint8_t *a, const uint8_t *b, uint8_t *out, size_t nbytes, int op);

/* Mask extents with a bitmap of `granularity`-byte units: for each extent i
 * (guest offset guest[i], length len[i] bytes; non-overlapping extents cost
 * one pass over the bits they cover), every piece lying under set bits, in
 * order.  Piece k is out_guest[k], out_len[k], from extent out_idx[k].
 * Stores at most max_out pieces; returns the total number, or QP_ERR_ARGS
 * (granularity < 1, negative offsets or lengths, an extent ending past
 * INT64_MAX, NULL arrays).  Any granularity up to INT64_MAX is exact. */
int64_t qp_bitmap_mask_extents(const int64_t *guest, const int64_t *len, int64_t n,
                               const uint8_t *bits, int64_t nbits, int64_t granularity,
                               int64_t *out_guest, int64_t *out_len, int64_t *out_idx,
                               int64_t max_out);
#endif
