/* File I/O of the copy path: scatter-reads, gathered batch writes, writeback
 * hints.  These return 0 or -errno. */
#ifndef QCOW2PY_IO_H
#define QCOW2PY_IO_H
#include "common.h"

/* Scatter-read: for each i, read len[i] bytes at host_off[i] of fd into
 * buf + buf_off[i]; bytes past EOF become zeros.  Returns 0 or -errno
 * (-EINVAL, before any read, if a run does not fit the buffer, has a negative
 * field, or ends in the file past INT64_MAX). */
int qp_pread_runs(int fd, uint8_t *buf, size_t buf_len,
                  const int64_t *buf_off, const int64_t *host_off,
                  const int64_t *len, size_t n);

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
