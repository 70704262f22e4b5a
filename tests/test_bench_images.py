"""The benchmark images (tests/images.py) build from nothing on a fresh machine:
the three images exist, are clean by qemu-img check and hold what their
recipe says (a_frag's content survives both compressions); a second call
reuses the cache."""

from __future__ import annotations

import os

import images
from qemu import need, qemu_img


def test_benchmark_images_build_from_an_empty_cache(tmp_path, monkeypatch):
    need("qemu-io")
    monkeypatch.setenv("QCOW2PY_BENCH_DIR", str(tmp_path))
    size = 8 << 20
    paths = images.ensure_images(size=size, log=lambda msg: None)
    assert sorted(paths) == sorted(images.IMAGES)
    for p in paths.values():
        qemu_img("check", p)
    assert qemu_img("compare", paths["a_frag"], paths["c_zlib"]).returncode == 0
    assert qemu_img("compare", paths["a_frag"], paths["d_zstd"]).returncode == 0
    leftovers = [f for f in os.listdir(os.path.dirname(paths["a_frag"]))
                 if not f.endswith(".qcow2") and f != ".done"]
    assert leftovers == [], leftovers              # the write patterns are removed
    stamp = os.stat(paths["a_frag"]).st_mtime_ns
    assert images.ensure_images(size=size, log=lambda msg: None) == paths
    assert os.stat(paths["a_frag"]).st_mtime_ns == stamp
