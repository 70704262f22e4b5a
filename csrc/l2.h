/* L2 tables: the entry bits and the decoder. */
#ifndef QCOW2PY_L2_H
#define QCOW2PY_L2_H
#include "common.h"

/* Unit kinds produced by qp_decode_l2 (one unit = a cluster, or a subcluster
 * with extended L2): the values of ClusterKind in qcow2py/format/l2.py, which
 * tests/test_format_l2.py checks against these #defines. */
#define QP_UNALLOCATED        0  /* read from the backing file                   */
#define QP_ZERO               1  /* reads as zeros, no host cluster              */
#define QP_ZERO_ALLOC         2  /* reads as zeros, host cluster preallocated    */
#define QP_DATA               3  /* data at host offset                          */
#define QP_COMPRESSED         4  /* compressed; host holds the byte offset       */
#define QP_UNALLOCATED_ALLOC  5  /* ext. L2: unallocated subcluster, host known  */

/* L2 entry bits: those of qcow2py/format/l2.py, which tests/test_format_l2.py
 * checks against these #defines. */
#define L2E_OFFSET_MASK        0x00fffffffffffe00ULL
#define L2E_STD_RESERVED_MASK  0x3f000000000001feULL
#define OFLAG_COPIED           (1ULL << 63)
#define OFLAG_COMPRESSED       (1ULL << 62)
#define OFLAG_ZERO             1ULL

/* Decode a whole L2 table (big-endian entries) into per-unit kinds and host
 * offsets.  n_units must be table_len/8 (standard) or table_len/16*32
 * (extended).  Returns QP_OK or a QP_ERR_* code with *bad_index set. */
int qp_decode_l2(const uint8_t *table, size_t table_len, int cluster_bits,
                 int extended, int external_data,
                 uint8_t *kinds, int64_t *hosts, size_t n_units,
                 int64_t *bad_index);
#endif
