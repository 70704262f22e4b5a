"""``python -m benchmarks.media --device PATH``: the real-device mode builds the
images on PATH's disk, drops them from the page cache before each timed copy
and reports qcow2py-copy (host, guest) against qemu-img convert, all with
O_DIRECT, in the model's table form."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from qemu import need

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import device  # noqa: E402


def test_drop_cache_evicts_the_pages(tmp_path):
    need("fincore")
    f = tmp_path / "f"
    f.write_bytes(os.urandom(4 << 20))
    f.read_bytes()                                      # now (at least partly) cached

    def resident() -> int:
        out = subprocess.run(["fincore", "-b", "-n", "-o", "RES", str(f)], check=True,
                             capture_output=True, text=True).stdout
        return int(out.split()[0])

    assert resident() > 0
    device.drop_cache([str(f)])
    assert resident() == 0


def test_device_mode_end_to_end(tmp_path):
    need("qemu-img")
    need("qemu-io")
    disk, out = tmp_path / "disk", tmp_path / "out"
    disk.mkdir()
    p = subprocess.run([sys.executable, "-m", "benchmarks.media", "--device", str(disk),
                        "--size", "16M", "--rounds", "1", "--images", "shuffled,chain",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [ln for ln in p.stdout.splitlines() if ln.startswith("| shuffled") or
            ln.startswith("| chain")]
    assert [r.split(" | ")[1] for r in rows] == ["qcow2py-copy guest", "qcow2py-copy host",
                                                 "qemu-img"] * 2, p.stdout
    assert os.path.isdir(disk / "qcow2py-media" / "media-16M")
    with open(out / "media-device-16M.json") as f:
        result = json.load(f)
    assert result["filesystem"] != "?"
    for shape in ("shuffled", "chain"):
        readers = result["shapes"][shape]["readers"]
        for r in readers.values():
            assert 0 < r["min"] <= r["median"] <= r["max"]
        host, guest = readers["qcow2py-copy host"], readers["qcow2py-copy guest"]
        assert host["stats"]["order"] == "host" and guest["stats"]["order"] == "guest"
        assert host["stats"]["read_requests"] < guest["stats"]["read_requests"]
        assert host["stats"]["bytes_read"] == guest["stats"]["bytes_read"] > 0
    # the copy is removed after the run; the images stay for the next one
    assert not any(n.startswith("device-copy") for n in
                   os.listdir(disk / "qcow2py-media"))
