/* qcow2py native: zero detection (contract in zero.h). */
#include "zero.h"

#include <string.h>

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
