"""A crash at any instant of a commit: the base reads old or new data per cluster,
the overlay keeps reading what it read, ``qemu-img check`` finds no corruption."""

from __future__ import annotations

import json
import random

import numpy as np

import qcow2py
from qcow2py.io.wrappers import RecordingStorage
from qemu import create, qemu_img, qemu_io

SIZE = 2 << 20


def test_commit_crash_points(tmp_path):
    seed = random.randrange(1 << 30)
    rnd = random.Random(seed)
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    create(base, SIZE, "cluster_size=4096")
    qemu_io(base, "write -P 1 0 2M")
    create(top, SIZE, "cluster_size=4096", backing=base.name, cwd=tmp_path)
    ops = [f"write -P {rnd.randrange(2, 250)} {rnd.randrange(SIZE - 70000)} "
           f"{rnd.randrange(1, 70000)}" for _ in range(20)] + ["write -z 1M 64k"]
    qemu_io(top, *ops)
    initial = {p.name: p.read_bytes() for p in (base, top)}
    with qcow2py.open(base) as b:
        old_base = np.frombuffer(b.read(0, SIZE), dtype=np.uint8)
    with qcow2py.open(top) as t:
        view = t.read(0, SIZE)
    recs = {}

    def wrap(st):
        name = st.name.rsplit("/", 1)[-1]
        recs[name] = RecordingStorage(st, initial[name])
        return recs[name]

    qcow2py.commit(top, storage_wrapper=wrap)
    assert len(recs["base.qcow2"].journal) > 10 and len(recs["top.qcow2"].journal) > 3
    new_base = np.frombuffer(view, dtype=np.uint8)
    final_base = recs["base.qcow2"].crash_image(len(recs["base.qcow2"].journal), [])
    cs = 4096
    for name in ("base.qcow2", "top.qcow2"):
        rec = recs[name]
        points = sorted({p - 1 for p in rec.sync_points()} |
                        set(rnd.sample(range(len(rec.journal) + 1), min(12, len(rec.journal) + 1))))
        for upto in points:
            durable = max([p for p in rec.sync_points() if p <= upto], default=0)
            survivors = [i for i in range(durable, upto) if rnd.random() < 0.5]
            crashed = rec.crash_image(upto, survivors)
            files = dict(initial)
            if name == "top.qcow2":            # the base was flushed before the overlay changed
                files["base.qcow2"] = final_base
            files[name] = crashed
            for n, data in files.items():
                (tmp_path / n).write_bytes(data)
            for n in files:
                p = qemu_img("check", "--output=json", tmp_path / n, check=False)
                assert p.returncode in (0, 3), f"seed {seed} {name}@{upto}: {p.stdout}"
                assert not json.loads(p.stdout).get("corruptions"), (seed, name, upto)
            with qcow2py.open(top) as t:
                assert t.read(0, SIZE) == view, f"seed {seed}: overlay changed ({name}@{upto})"
            with qcow2py.open(base) as b:
                got = np.frombuffer(b.read(0, SIZE), dtype=np.uint8).reshape(-1, cs)
            ok = (got == old_base.reshape(-1, cs)).all(1) | (got == new_base.reshape(-1, cs)).all(1)
            assert ok.all(), f"seed {seed}: base cluster {np.flatnonzero(~ok)[0]} torn ({name}@{upto})"
