/* qcow2py native hot path.  Every function checks every bound it is given and
 * never allocates: the Python side owns all buffers.  cffi releases the GIL
 * around each call.
 *
 * Argument checks: what C can see (signs, ranges, sums that would overflow
 * int64_t or off_t, NULL pointers with a non-zero length) is refused with an
 * error code and nothing is read or written.  What C cannot see -- that a
 * pointer really holds the length it comes with -- is the wrapper's job
 * (qcow2py/native/common.py checks it for both back-ends).  CI runs the twin
 * tests once on a build with QCOW2PY_SANITIZE=1 (ASan + UBSan).
 *
 * One .c and one .h per area, each header the contract of its functions.
 * This umbrella includes them all: build_ffi.py reads its #include list, in
 * order, as the cffi declarations, and compiles every .c of csrc/. */
#ifndef QCOW2PY_NATIVE_H
#define QCOW2PY_NATIVE_H
#include "common.h"    /* types, return codes */
#include "zero.h"      /* qp_is_zero */
#include "l2.h"        /* L2 entry bits, unit kinds, qp_decode_l2 */
#include "io.h"        /* qp_pread_runs, qp_write_batch, qp_start_writeback */
#include "bitmap.h"    /* qp_bitmap_* */
#endif
