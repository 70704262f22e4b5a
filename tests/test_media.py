"""The image recipes of benchmarks/media_shapes.py: shapes built alone, the compressed one
fragmented."""

import os
import shutil

import numpy as np
import pytest


from benchmarks import media, media_report, media_shapes

pytestmark = pytest.mark.skipif(not (shutil.which("qemu-img") and shutil.which("qemu-io")),
                                reason="needs qemu-img and qemu-io")
SIZE = 16 << 20


@pytest.fixture
def bench_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("QCOW2PY_BENCH_DIR", str(tmp_path))
    return tmp_path


def test_compressed_shape_is_fragmented(bench_dir):
    import qcow2py
    from qcow2py.jobs.blockcopy.plan import layer_arrays
    from qcow2py.native import COMPRESSED, DATA

    path = media_shapes.build_shape(SIZE, "compressed")
    assert sorted(os.listdir(bench_dir / "media-16M")) == [".done-compressed", "compressed.qcow2"]
    with qcow2py.open(path) as img:
        s, n, k, h, c = layer_arrays(img, 0, img.size)
    comp = k == COMPRESSED
    data = (k == DATA) | comp
    # 80% of the clusters, most of them compressed (the random patterns stay plain)
    assert int(n[data].sum()) == int(SIZE // media_shapes.CLUSTER * 0.8) * media_shapes.CLUSTER
    assert comp.sum() > 0.6 * data.sum()
    # written in shuffled guest order: host offsets in guest order go back about half the time
    hosts = h[comp]
    back = float((np.diff(hosts) < 0).mean())
    assert 0.3 < back < 0.7, back
    # streams packed byte-wise: many share a host cluster
    assert np.unique(hosts // media_shapes.CLUSTER).size < 0.8 * hosts.size
    alloc, visible, spans = media.allocated_bytes(path)
    (name, (first, end)), = spans.items()
    assert alloc[name] == visible[name] < end - first <= os.path.getsize(path)


def test_shape_alone_is_the_same_image(bench_dir, tmp_path_factory):
    """A shape built by itself (--one-at-a-time) equals the one built with the others."""
    one = media_shapes.build_shape(SIZE, "shuffled")
    keep = tmp_path_factory.mktemp("keep") / "shuffled.qcow2"
    shutil.copy(one, keep)
    media_shapes.delete_shape(SIZE, "shuffled")
    assert not os.path.exists(one) and media_shapes.shape_bytes(SIZE, "shuffled") == 0
    for shape in ("longlived", "shuffled"):
        media_shapes.build_shape(SIZE, shape)
    media_shapes.run_checked(["qemu-img", "compare", "-q", str(keep), one])
    # and the cache is reused while the recipe stamp matches
    mtime = os.path.getmtime(one)
    assert media_shapes.build_shape(SIZE, "shuffled") == one and os.path.getmtime(one) == mtime


def test_targets_show_the_span():
    floor = {"hdd": 1.0, "bytes": 100, "span_bytes": 118, "sorted_extents_hdd": 1.17}
    r = {q: 0.0 for q in ("sata_qd1", "sata_qd32", "nvme_qd1", "nvme_qd32")}
    readers = {"qcow2py host": {**r, "hdd_qd1": 1.18}, "qcow2py guest": {**r, "hdd_qd1": 2.4},
               "qemu-img": {**r, "hdd_qd32": 1.3}}
    t = media_report.targets(readers, floor)
    assert t["span_over_allocated"] == pytest.approx(1.18)
    assert t["sorted_extents_over_floor"] == pytest.approx(1.17)
    assert not t["floor_met"] and not t["qemu_met"] and t["ssd_host_le_guest"]
    text = media_report.format_targets({"shapes": {"longlived": {"targets": t}}})
    assert "| longlived | 1.180 (MISSED, ≤ 1.05) | 1.180 | 1.170 |" in text
