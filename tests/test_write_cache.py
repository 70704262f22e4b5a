"""The reader's caches stay right while the writer changes the image.

Two regressions, made deterministic (the threaded tests found the first one
only now and then):

* a decoded L2 table that a writer changed *while* a reader decoded it must
  not be put in the cache (it would hide the change from later reads);
* the last decompressed cluster, kept by its stream's host offset, must not
  be served for a new compressed stream that reuses that offset.
"""

import random

import qcow2py

KiB = 1 << 10


def test_table_changed_during_decode_is_not_cached(tmp_path):
    img = qcow2py.create(str(tmp_path / "t.qcow2"), 4 << 20)
    try:
        img.write(0, b"\x01" * 4096)
        img.flush()
        img._forget_table(0)
        real = img._l2_bytes

        def racing(l1i, off):
            raw = real(l1i, off)                    # the reader's snapshot of the table...
            img.write(2 * 65536, b"\x03" * 4096)    # ...then a writer allocates cluster 2
            return raw

        img._l2_bytes = racing
        assert img.read(0, 4096) == b"\x01" * 4096
        img._l2_bytes = real
        assert img.read(2 * 65536, 4096) == b"\x03" * 4096
    finally:
        img.close()


def test_reused_compressed_offset_is_not_served_from_the_last_cluster(tmp_path):
    rnd = random.Random(1)
    cs = 65536
    a = rnd.randbytes(50000) + bytes(cs - 50000)      # compresses to about 50 KiB
    b = rnd.randbytes(30000) + bytes(cs - 30000)
    img = qcow2py.create(str(tmp_path / "c.qcow2"), 4 << 20)
    try:
        img.write_compressed(0, a)
        first = int(img._l2[0][0])
        assert img.read(100, 100) == a[100:200]      # a partial read keeps the cluster
        img.write(0, b"\x11" * cs)                   # the stream is released...
        img.flush()                                  # ...and its host cluster freed
        img.write_compressed(1, b)                   # the next stream lands there
        mask = (1 << 54) - 1
        assert int(img._l2[0][1]) & mask == first & mask
        assert img.read(cs + 100, 100) == b[100:200]
    finally:
        img.close()
