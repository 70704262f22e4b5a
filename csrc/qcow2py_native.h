/* qcow2py native hot path.  Every function checks every bound it is given and
 * never allocates: the Python side owns all buffers.  cffi releases the GIL
 * around each call. */
#ifndef QCOW2PY_NATIVE_H
#define QCOW2PY_NATIVE_H
#include <stddef.h>
#include <stdint.h>

/* Unit kinds produced by qp_decode_l2 (one unit = a cluster, or a subcluster
 * with extended L2).  Keep in sync with qcow2py/format/l2.py. */
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

/* 1 if the buffer is all zero bytes, else 0. */
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
 * (-EINVAL if a run does not fit the buffer). */
int qp_pread_runs(int fd, uint8_t *buf, size_t buf_len,
                  const int64_t *buf_off, const int64_t *host_off,
                  const int64_t *len, size_t n);
/* Copy extents: for each i (in the order given), read len[i] bytes at
 * src_off[i] of src_fd[i] (one request per piece of at most buf_len bytes;
 * past EOF reads as zeros) and write them at dst_off[i] of dst_fd.
 * Zero detection works on chunks of zero_chunk bytes aligned in the target's
 * address space (0: none): an all-zero chunk is skipped, or written as zeros
 * when write_zeroes is set.  When mark is given, the bit of every target
 * unit ((dst - mark_base) >> mark_shift) that received non-zero data is set.
 * stats[0..3] += bytes read, bytes written, zero bytes skipped, read requests.
 * Returns 0, -errno, or -EINVAL for bad arguments. */
int qp_copy_extents(size_t n, const int32_t *src_fd, const int64_t *src_off,
                    const int64_t *dst_off, const int64_t *len, int dst_fd,
                    uint8_t *buf, size_t buf_len, int64_t zero_chunk, int write_zeroes,
                    int64_t mark_base, int mark_shift, uint8_t *mark, size_t mark_len,
                    int64_t *stats);
#endif
