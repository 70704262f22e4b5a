/* What every area of qcow2py's native code shares: the fixed-width types and
 * the return codes of the functions that do not return -errno. */
#ifndef QCOW2PY_COMMON_H
#define QCOW2PY_COMMON_H
#include <stddef.h>
#include <stdint.h>

/* Return codes: QP_ERR_ARGS from every area; the others from qp_decode_l2
 * (the entry index goes to *bad_index). */
#define QP_OK                  0
#define QP_ERR_ARGS           -1  /* sizes or parameters inconsistent           */
#define QP_ERR_RESERVED       -2  /* reserved bits set in an L2 entry           */
#define QP_ERR_UNALIGNED      -3  /* host offset not cluster aligned            */
#define QP_ERR_SUBCLUSTER     -4  /* invalid extended-L2 subcluster bitmap       */
#endif
