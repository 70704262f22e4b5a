/* qcow2py native hot path.  Every function checks every bound it is given and
 * never allocates: the Python side owns all buffers.  cffi releases the GIL
 * around each call.
 *
 * Argument checks: what C can see (signs, ranges, sums that would overflow
 * int64_t or off_t, NULL pointers with a non-zero length) is refused with an
 * error code and nothing is read or written.  What C cannot see -- that a
 * pointer really holds the length it comes with -- is the wrapper's job
 * (qcow2py/native/common.py checks it for both back-ends).  CI runs the twin
 * tests once on a build with QCOW2PY_SANITIZE=1 (ASan + UBSan). */
#ifndef QCOW2PY_NATIVE_H
#define QCOW2PY_NATIVE_H
#include <stddef.h>
#include <stdint.h>

/* Unit kinds produced by qp_decode_l2 (one unit = a cluster, or a subcluster
 * with extended L2): the values of ClusterKind in qcow2py/format/l2.py, which
 * tests/test_format_l2.py checks against these #defines. */
#define QP_UNALLOCATED        0  /* read from the backing file                   */
#define QP_ZERO               1  /* reads as zeros, no host cluster              */
#define QP_ZERO_ALLOC         2  /* reads as zeros, host cluster preallocated    */
#define QP_DATA               3  /* data at host offset                          */
#define QP_COMPRESSED         4  /* compressed; host holds the byte offset       */
#define QP_UNALLOCATED_ALLOC  5  /* ext. L2: unallocated subcluster, host known  */

/* Error codes of qp_decode_l2 (the entry index goes to *bad_index). */
#define QP_OK                  0
#define QP_ERR_ARGS           -1  /* sizes or parameters inconsistent           */
#define QP_ERR_RESERVED       -2  /* reserved bits set in an L2 entry           */
#define QP_ERR_UNALIGNED      -3  /* host offset not cluster aligned            */
#define QP_ERR_SUBCLUSTER     -4  /* invalid extended-L2 subcluster bitmap       */

/* 1 if the buffer is all zero bytes (or len is 0), else 0; QP_ERR_ARGS for a
 * NULL buffer of non-zero length. */
int qp_is_zero(const uint8_t *buf, size_t len);

/* Decode a whole L2 table (big-endian entries) into per-unit kinds and host
 * offsets.  n_units must be table_len/8 (standard) or table_len/16*32
 * (extended).  Returns QP_OK or a QP_ERR_* code with *bad_index set. */
int qp_decode_l2(const uint8_t *table, size_t table_len, int cluster_bits,
                 int extended, int external_data,
                 uint8_t *kinds, int64_t *hosts, size_t n_units,
                 int64_t *bad_index);

/* Scatter-read: for each i, read len[i] bytes at host_off[i] of fd into
 * buf + buf_off[i]; bytes past EOF become zeros.  Returns 0 or -errno
 * (-EINVAL, before any read, if a run does not fit the buffer, has a negative
 * field, or ends in the file past INT64_MAX). */
int qp_pread_runs(int fd, uint8_t *buf, size_t buf_len,
                  const int64_t *buf_off, const int64_t *host_off,
                  const int64_t *len, size_t n);
/* Bitmaps (persistent dirty bitmaps, copy masks).  Bit i of a bitmap is bit
 * (i % 8) of byte i / 8: LSB-first, as qcow2 stores them and as bitarray
 * does with endian="little".  A bitmap of nbits bits needs (nbits + 7) / 8
 * bytes; bits at and past nbits are ignored.  Ranges [start, end) are
 * clipped to [0, nbits). */

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

/* Write pieces of a buffer (a batch of a copy, read by qp_pread_runs or
 * inflated): piece i is len[i] bytes at buf + buf_off[i], to go to
 * dst_off[i].  Pieces are written in write_order[] (a permutation of
 * 0..n-1, usually by target offset), those that continue each other in the
 * target gathered into one pwritev.  Zero detection works on chunks of
 * zero_chunk bytes aligned in the target's address space (0: none): an
 * all-zero chunk is skipped, or written as zeros when write_zeroes is set.
 * When mark is given, the bit of every target unit ((dst - mark_base) >>
 * mark_shift) that received non-zero data is set, for units below
 * mark_nbits (a length in BITS: mark holds (mark_nbits + 7) / 8 bytes, bits
 * at and past mark_nbits are never touched).  stats[1], stats[2] += bytes
 * written, zero bytes.  Returns 0, -errno, or -EINVAL, before any write, for
 * bad arguments (negative fields, a piece outside the buffer or ending in the
 * target past INT64_MAX, write_order out of range, zero_chunk < 0,
 * mark_shift outside 0..40, mark_base < 0, NULL arrays). */
int qp_write_batch(size_t n, const int64_t *buf_off, const int64_t *dst_off,
                   const int64_t *len, const int64_t *write_order, int dst_fd,
                   const uint8_t *buf, size_t buf_len, int64_t zero_chunk, int write_zeroes,
                   int64_t mark_base, int mark_shift, uint8_t *mark, int64_t mark_nbits,
                   int64_t *stats);

/* Start writing back the dirty page-cache pages of [offset, offset+length)
 * of fd, without waiting for them (Linux sync_file_range with
 * SYNC_FILE_RANGE_WRITE): a hint that overlaps the device's writeback with
 * the writes still to come, so a later fdatasync has less left to do.  It
 * makes nothing durable.  Returns 0, -errno, or -EINVAL for bad arguments
 * (negative, or a range ending past INT64_MAX); 0 where the call does not
 * exist. */
int qp_start_writeback(int fd, int64_t offset, int64_t length);
#endif
