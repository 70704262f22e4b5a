"""The crash tests' recorder: a ``storage_wrapper`` that journals every write
and fsync of the file it wraps (:class:`qcow2py.io.wrappers.RecordingStorage`),
starting from the bytes the file holds when the recorder is made.

    recorder = Recorder(path)
    with qcow2py.open(path, "r+", storage_wrapper=recorder, lock=False) as img:
        ...
    rec = recorder.rec          # sync_points(), crash_image(upto, survivors)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from qcow2py.io.wrappers import RecordingStorage


class Recorder:
    """Wraps the storage the image opens in a RecordingStorage (kept as ``rec``)."""

    def __init__(self, path) -> None:
        self.initial = Path(path).read_bytes()
        self.rec: Optional[RecordingStorage] = None

    def __call__(self, storage) -> RecordingStorage:
        self.rec = RecordingStorage(storage, self.initial)
        return self.rec


def crashed_images(rec: RecordingStorage, path, rnd, samples: int):
    """Replay crashes of the recorded run into the file ``path``: just before every
    sync point and at ``samples`` random instants, each with a random half of the
    writes since the last sync surviving.  Each image is checked by ``qemu-img
    check`` (clean or leaks only, never a corruption); yields the instant after
    the image is written, so the caller checks its content."""
    from qemu import qemu_img

    n = len(rec.journal) + 1
    syncs = rec.sync_points()
    for upto in sorted({p - 1 for p in syncs} | set(rnd.sample(range(n), min(n, samples)))):
        durable = max([p for p in syncs if p <= upto], default=0)
        survivors = [i for i in range(durable, upto) if rnd.random() < 0.5]
        Path(path).write_bytes(rec.crash_image(upto, survivors))
        p = qemu_img("check", "--output=json", path, check=False)
        assert p.returncode in (0, 3), (upto, p.stdout, p.stderr)
        assert not json.loads(p.stdout).get("corruptions"), upto
        yield upto
