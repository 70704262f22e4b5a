"""A crash at any sync point of snapshot create, apply and delete.

Between the refcount increments and the synced header switch, a cluster may be
counted twice while its L2 entry still says COPIED (QEMU has the same window):
``qemu-img check`` then reports OFLAG_COPIED errors, which ``check -r all``
repairs; the snapshot does not exist yet, so nothing can be written in place
under it.  What must hold at every crash point: no other corruption, the
active state reads as before or after the operation, every snapshot the table
names reads its content, and ``check -r all`` leaves a clean image.
"""

from __future__ import annotations

import json
import random
import shutil

import qcow2py
from qemu import create, qemu_img, qemu_io
from recording import Recorder

SIZE = 1 << 20


def _check_crashed(path, tmp_path, seed, where) -> None:
    p = qemu_img("check", "--output=json", path, check=False)
    assert p.returncode in (0, 2, 3), f"seed {seed} {where}: {p.stdout} {p.stderr}"
    if json.loads(p.stdout).get("corruptions"):
        bad = [line for line in p.stderr.splitlines() if line.startswith("ERROR")]
        assert all("OFLAG_COPIED" in line for line in bad), f"seed {seed} {where}: {bad}"
        fixed = tmp_path / "fixed.qcow2"
        shutil.copyfile(path, fixed)
        qemu_img("check", "-r", "all", fixed, check=False)
        qemu_img("check", fixed)


def test_snapshot_crash_points(tmp_path):
    seed = random.randrange(1 << 30)
    rnd = random.Random(seed)
    path = tmp_path / "img.qcow2"
    create(path, SIZE, "cluster_size=4096")
    qemu_io(path, *[f"write -P {i + 1} {rnd.randrange(SIZE - 9000)} 9000" for i in range(12)])
    qemu_img("snapshot", "-c", "old", path)
    qemu_io(path, "write -P 99 0 100000")
    with qcow2py.open(path, snapshot="old") as v:
        old_view = v.read(0, SIZE)
    views = {"old": old_view}
    for op in ("create", "apply", "delete"):
        wrap = Recorder(path)

        with qcow2py.open(path, "r+", storage_wrapper=wrap, lock=False) as img:
            before = img.read(0, SIZE)
            if op == "create":
                img.create_snapshot("new")
            elif op == "apply":
                img.apply_snapshot("old")
            else:
                img.delete_snapshot("old")
            after = img.read(0, SIZE)
        if op == "create":
            views["new"] = before
        rec = wrap.rec
        crashed = tmp_path / "crash.qcow2"
        n = len(rec.journal) + 1
        points = sorted({p - 1 for p in rec.sync_points()} | set(rnd.sample(range(n), min(n, 8))))
        for upto in points:
            durable = max([p for p in rec.sync_points() if p <= upto], default=0)
            survivors = [i for i in range(durable, upto) if rnd.random() < 0.5]
            crashed.write_bytes(rec.crash_image(upto, survivors))
            where = f"{op}@{upto}"
            _check_crashed(crashed, tmp_path, seed, where)
            with qcow2py.open(crashed) as img:
                assert img.read(0, SIZE) in (before, after), f"seed {seed} {where}"
                names = [s.name for s in img.snapshots]
            for name in names:
                with qcow2py.open(crashed, snapshot=name) as v:
                    assert v.read(0, SIZE) == views[name], f"seed {seed} {where}: {name}"
