"""The crash tests' recorder: a ``storage_wrapper`` that journals every write
and fsync of the file it wraps (:class:`qcow2py.io.wrappers.RecordingStorage`),
starting from the bytes the file holds when the recorder is made.

    recorder = Recorder(path)
    with qcow2py.open(path, "r+", storage_wrapper=recorder, lock=False) as img:
        ...
    rec = recorder.rec          # sync_points(), crash_image(upto, survivors)
"""

from __future__ import annotations

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
