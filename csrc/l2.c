/* qcow2py native: the L2 table decoder (contract in l2.h). */
#include "l2.h"

#include <string.h>

static inline uint64_t load_be64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return __builtin_bswap64(v);
}

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
