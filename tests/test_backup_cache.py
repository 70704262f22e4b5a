"""The RAM cache in front of the temp, and push orders."""

from __future__ import annotations

import json
import os

import pytest

import qcow2py
from qcow2py import backup
from qemu import need, qemu_img, qemu_io

K64 = 65536
MiB = 1 << 20
SIZE = 8 * MiB


def _disk(tmp_path) -> str:
    need("qemu-img")
    path = str(tmp_path / "disk.qcow2")
    qemu_img("create", "-f", "qcow2", path, str(SIZE))
    qemu_io(path, f"write -P 0x5d 0 {SIZE}")
    return path


def _temp_data_at_depth0(temp: str) -> list:
    m = json.loads(qemu_img("map", "-U", "--output=json", temp).stdout)
    return [(e["start"], e["length"]) for e in m if e["depth"] == 0 and e["data"]]


def test_writes_that_fit_never_reach_the_temp(tmp_path):
    path = _disk(tmp_path)
    temp, target = str(tmp_path / "temp.qcow2"), str(tmp_path / "t.qcow2")
    ref = str(tmp_path / "ref.qcow2")
    qemu_img("convert", "-O", "qcow2", path, ref)
    with qcow2py.open(path, "r+") as disk:
        with backup.fleece(disk, temp, ram_cache=2 * MiB, keep_temp=True) as fl:
            for i in range(16):                           # 1 MiB in 16 guest writes
                fl.disk.write(3 * MiB + i * K64 + 10, b"\xee" * 100)
            st = fl.stats
            assert st.bytes_in_ram == MiB and st.cbw_bytes == MiB
            assert st.bytes_in_temp == 0 and st.temp_bytes_written == 0
            res = backup.push(fl.snapshot, target, order="priority", discard_source=True)
            assert res.phases == [("ram", MiB), ("disk", SIZE - MiB)]
            assert res.bytes_from_ram == MiB and res.bytes_from_temp == 0
            assert fl.stats.bytes_in_ram == 0
            fl.disk.write(0, b"\xff" * MiB)               # pushed and discarded: no copy
            assert fl.stats.cbw_bytes == MiB
    assert _temp_data_at_depth0(temp) == []
    assert os.path.getsize(temp) < 1 * MiB
    qemu_img("check", temp)
    qemu_img("compare", ref, target)


def test_smaller_cache_spills_only_the_overflow(tmp_path):
    path = _disk(tmp_path)
    temp, target = str(tmp_path / "temp.qcow2"), str(tmp_path / "t.qcow2")
    ref = str(tmp_path / "ref.qcow2")
    qemu_img("convert", "-O", "qcow2", path, ref)
    with qcow2py.open(path, "r+") as disk:
        with backup.fleece(disk, temp, ram_cache=256 * 1024) as fl:
            for i in range(16):
                fl.disk.write(2 * MiB + i * K64, b"\xee" * K64)
            st = fl.stats
            assert st.bytes_in_ram == 256 * 1024
            assert st.temp_bytes_written == st.bytes_in_temp == MiB - 256 * 1024
            # the oldest spilled: the last four writes are the ones still in RAM
            assert fl.snapshot.map(2 * MiB + 12 * K64, 4 * K64)[0]["data"]
            assert "offset" not in fl.snapshot.map(2 * MiB + 12 * K64, 4 * K64)[0]
            assert "offset" in fl.snapshot.map(2 * MiB, K64)[0]
            res = backup.push(fl.snapshot, target, order="priority", discard_source=True)
            assert [p for p, _ in res.phases] == ["ram", "disk", "temp"]
            assert dict(res.phases) == {"ram": 256 * 1024, "disk": SIZE - MiB,
                                        "temp": MiB - 256 * 1024}
            assert res.bytes_from_temp == MiB - 256 * 1024
            assert fl.snapshot.accessible_extents() == []
    qemu_img("compare", ref, target)
    qemu_img("check", target)


def test_oversized_copy_goes_straight_to_temp(tmp_path):
    path = _disk(tmp_path)
    with qcow2py.open(path, "r+") as disk:
        with backup.fleece(disk, str(tmp_path / "temp.qcow2"), ram_cache=256 * 1024) as fl:
            fl.disk.write(0, b"\1" * MiB)                 # one copy bigger than the cache
            assert fl.stats.bytes_in_ram == 0 and fl.stats.bytes_in_temp == MiB
            assert fl.snapshot.read(0, MiB) == b"\x5d" * MiB


@pytest.mark.parametrize("order", ["guest", "host", "priority"])
def test_orders_push_the_point_in_time(tmp_path, order):
    path = _disk(tmp_path)
    ref, target = str(tmp_path / "ref.qcow2"), str(tmp_path / f"t-{order}.raw")
    qemu_img("convert", "-O", "qcow2", path, ref)
    with qcow2py.open(path, "r+") as disk:
        disk.discard(5 * MiB, MiB)                        # a hole: known zeros
        disk.flush()
        qemu_img("convert", "-U", "-O", "qcow2", path, ref)
        with backup.fleece(disk, str(tmp_path / "temp.qcow2"), ram_cache=MiB) as fl:
            for i in range(0, 24, 3):
                fl.disk.write(i * K64 * 5, b"\x77" * 3000)
            got = []
            res = backup.push(fl.snapshot, target, target_format="raw", order=order,
                              progress=lambda d, t: got.append((d, t)))
            assert got[-1] == (SIZE, SIZE)
            assert res.bytes_zero >= MiB
            # the hole is not read, except the one cluster a guest write copied (i=18)
            assert res.bytes_from_ram + res.bytes_from_disk + res.bytes_from_temp == SIZE - MiB + K64
    qemu_img("compare", "-f", "qcow2", "-F", "raw", ref, target)


def test_push_into_an_open_image_writes_zeros(tmp_path):
    path = _disk(tmp_path)
    with qcow2py.open(path, "r+") as disk:
        disk.write_zeroes(0, MiB)
        tgt = qcow2py.create(str(tmp_path / "t.qcow2"), SIZE)
        tgt.write(0, b"\x99" * MiB)                       # stale data the push must zero
        with backup.fleece(disk, str(tmp_path / "temp.qcow2")) as fl:
            backup.push(fl.snapshot, tgt)
        assert tgt.read(0, MiB) == bytes(MiB)
        assert tgt.read(MiB, 1) == b"\x5d"
        tgt.close()
