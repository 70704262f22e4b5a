"""The benchmarks leave the published results alone unless asked, and the media
chart's floor is a real floor (no modelled reader below it)."""

from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import media, media_report  # noqa: E402

PUBLISHED = [os.path.join(ROOT, "benchmarks", n)
             for n in ("media.json", "media-16G.json", "media-24G.json")]


def _stub_measure(monkeypatch):
    with open(PUBLISHED[0]) as f:
        result = json.load(f)
    monkeypatch.setattr(media, "measure", lambda *a, **k: dict(result))
    monkeypatch.setattr(media, "chart", lambda result, path: open(path, "wb").close() or True)


def test_media_writes_outside_the_tracked_files_by_default(tmp_path, monkeypatch):
    assert media.OUT_DIR == os.path.join(ROOT, "benchmarks", ".out")
    with open(os.path.join(ROOT, ".gitignore")) as f:
        assert "benchmarks/.out/" in f.read().split()
    out, tracked = tmp_path / "out", tmp_path / "tracked"
    monkeypatch.setattr(media, "OUT_DIR", str(out))
    monkeypatch.setattr(media, "HERE", str(tracked))
    monkeypatch.delenv("QCOW2PY_BENCH_OUT", raising=False)
    _stub_measure(monkeypatch)
    assert media.main(["--no-wall"]) == 0
    assert sorted(os.listdir(out)) == ["media.json", "media.png"]
    assert not tracked.exists()
    assert media.main(["--no-wall", "--update-tracked"]) == 0
    assert sorted(os.listdir(tracked)) == ["media.json", "media.png"]


@pytest.mark.parametrize("path", PUBLISHED, ids=os.path.basename)
def test_chart_floor_lies_under_every_bar(path):
    with open(path) as f:
        result = json.load(f)
    for shape, s in result["shapes"].items():
        for key in ("hdd", "sata", "nvme"):
            floor = media_report.visible_floor(result, shape, key)
            bars = [r[f"{key}_qd{qd}"] for r in s["readers"].values() for qd in media_report.QDS
                    if f"{key}_qd{qd}" in r]
            assert floor > 0 and min(bars) >= floor * (1 - 1e-6), (shape, key, floor, bars)
