/* Zero detection. */
#ifndef QCOW2PY_ZERO_H
#define QCOW2PY_ZERO_H
#include "common.h"

/* 1 if the buffer is all zero bytes (or len is 0), else 0; QP_ERR_ARGS for a
 * NULL buffer of non-zero length. */
int qp_is_zero(const uint8_t *buf, size_t len);
#endif
