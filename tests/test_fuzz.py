"""Seeded mutation fuzzing of real images' metadata.

Small base images are built once per module with qemu-img/qemu-io (v2, v3,
512-byte clusters, extended L2, zlib and zstd compression, a backing file,
bitmaps, snapshots, 2 MiB clusters with 1-bit refcounts).  Each case copies
one, mutates its metadata -- header fields (interesting values: 0, all ones,
2^31, 2^32-1, 2^63, file size, ...), the extension area, the backing name,
L1/L2 entries, the refcount table, the snapshot table, snapshot L1 tables,
the bitmap directory and bitmap tables, compressed streams, or truncates the
file -- then opens it and runs info(), map() and reads the guest data in
1 MiB chunks; then ``check``, ``check -r all`` and an "r+" write workload on
copies (fuzz_worker.check_case).  An image whose check is clean must stay
clean by ``qemu-img check`` after our writes.

A case passes when everything succeeds or a Qcow2Error subclass with a real
message is raised.  Anything else fails: another exception, a worker killed
by a signal (segfault), a case slower than CASE_TIMEOUT (hang), an
allocation beyond the RLIMIT_AS headroom (MemoryError) or a peak RSS above
PEAK_LIMIT.  Cases run in subprocess workers (fuzz_worker.py).

Reproduce: ``QCOW2PY_FUZZ_SEED=<seed> pytest tests/test_fuzz.py -k <image>``;
a failing case's image is saved next to the base images (path in the
message).  ``QCOW2PY_FUZZ_CASES=<n>`` changes the number of cases per image (default 120,
half that for the 2 MiB-cluster image: 1140 cases in all).
"""

from __future__ import annotations

import json
import os
import queue
import random
import select
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import qcow2py
from qcow2py.format.bitmap import parse_bitmap_directory
from qcow2py.format.header import MAGIC, Header
from qcow2py.format.snapshot import parse_snapshot_table

from qemu import create, need, qemu_img, qemu_io

SEED = int(os.environ.get("QCOW2PY_FUZZ_SEED", "20261130"))
CASES = int(os.environ.get("QCOW2PY_FUZZ_CASES", "120"))
CASE_TIMEOUT = 8.0                     # seconds per case, wall clock (typical: 0.02)
AS_HEADROOM = 768 << 20                # RLIMIT_AS above the warmed-up worker
PEAK_LIMIT = 256 << 20                 # peak RSS growth per case
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fuzz_worker.py")

COPIED, COMPRESSED = 1 << 63, 1 << 62
U64 = (1 << 64) - 1


# ------------------------------------------------------------------ base images
def _build(d, name: str) -> List[str]:
    """Create base image ``name`` in folder ``d``; returns the files it made."""
    p = os.path.join(d, name + ".qcow2")
    if name == "v2":
        create(p, "4M", "compat=0.10")
        qemu_io(p, "write -P 0x11 0 192k", "write -P 0x12 1M 64k", "write -z 2M 64k",
                "write -P 0x13 3M 4k")
    elif name == "v3":
        create(p, "6M")
        qemu_io(p, "write -P 0x21 0 128k", "write -z 256k 128k", "write -c -P 0x22 1M 64k",
                "write -P 0x23 2M 8k", "write -P 0x24 5M 64k", "discard 5M 64k")
    elif name == "c512":
        create(p, "1M", "cluster_size=512")
        qemu_io(p, "write -P 0x31 0 3k", "write -z 8k 2k", "write -P 0x32 100k 1k",
                "write -c -P 0x33 200k 512", "write -P 0x34 600k 40k")
    elif name == "extl2":
        create(p, "4M", "extended_l2=on", "cluster_size=64k")
        qemu_io(p, "write -P 0x41 0 6k", "write -z 66k 4k", "write -P 0x42 130k 2k",
                "write -c -P 0x43 1M 64k", "write -P 0x44 3M 128k", "write -z 3M 2k")
    elif name == "zlib":
        create(p, "4M")
        qemu_io(p, *[f"write -c -P {0x50 + i} {i * 192}k 64k" for i in range(8)],
                "write -c -P 0x5f 2M 128k")
    elif name == "zstd":
        create(p, "4M", "compression_type=zstd")
        qemu_io(p, *[f"write -c -P {0x60 + i} {i * 128}k 64k" for i in range(8)],
                "write -P 0x6f 3M 64k")
    elif name == "backing":
        base = os.path.join(d, "backing-base.qcow2")
        create(base, "4M")
        qemu_io(base, "write -P 0x71 0 1M", "write -c -P 0x72 2M 64k")
        create(p, "4M", backing="backing-base.qcow2", backing_fmt="qcow2", cwd=d)
        qemu_io(p, "write -P 0x73 64k 64k", "write -z 256k 64k", "write -P 0x74 3M 4k")
        return [p, base]
    elif name == "bitmaps":
        create(p, "4M")
        qemu_img("bitmap", "--add", p, "first")
        qemu_img("bitmap", "--add", "-g", "512k", p, "second")
        qemu_io(p, "write -P 0x81 0 128k", "write -P 0x82 2M 64k")
        qemu_img("bitmap", "--add", "--disable", p, "third")
    elif name == "snapshots":
        create(p, "4M")
        qemu_io(p, "write -P 0x91 0 128k")
        qemu_img("snapshot", "-c", "one", p)
        qemu_io(p, "write -P 0x92 64k 128k", "write -P 0x93 3M 64k")
        qemu_img("snapshot", "-c", "second snapshot", p)
        qemu_io(p, "write -z 0 64k")
    elif name == "big":
        create(p, "16M", "cluster_size=2M", "refcount_bits=1")
        qemu_io(p, "write -P 0xa1 0 64k", "write -P 0xa2 5M 4k", "write -c -P 0xa3 8M 2M")
    else:
        raise KeyError(name)
    return [p]


BASE_NAMES = ["v2", "v3", "c512", "extl2", "zlib", "zstd", "backing", "bitmaps", "snapshots",
              "big"]

# header fields: (name, offset, size), v2 part then v3 part
_V2_FIELDS = [("magic", 0, 4), ("version", 4, 4), ("backing_file_offset", 8, 8),
              ("backing_file_size", 16, 4), ("cluster_bits", 20, 4), ("size", 24, 8),
              ("crypt_method", 32, 4), ("l1_size", 36, 4), ("l1_table_offset", 40, 8),
              ("refcount_table_offset", 48, 8), ("refcount_table_clusters", 56, 4),
              ("nb_snapshots", 60, 4), ("snapshots_offset", 64, 8)]
_V3_FIELDS = [("incompatible_features", 72, 8), ("compatible_features", 80, 8),
              ("autoclear_features", 88, 8), ("refcount_order", 96, 4),
              ("header_length", 100, 4), ("compression_type", 104, 1)]
_SNAP_FIELDS = [(0, 8), (8, 4), (12, 2), (14, 2), (16, 4), (20, 4), (24, 8), (32, 4), (36, 4),
                (40, 8), (48, 8)]
_BITMAP_FIELDS = [(0, 8), (8, 4), (12, 4), (16, 1), (17, 1), (18, 2), (20, 4)]


@dataclass
class Base:
    name: str
    path: str
    data: bytes                       # the pristine file
    header: Header
    fields: List[Tuple[str, int, int]]
    extensions: List[Tuple[int, int, int]]       # (offset, magic, length)
    ext_area: Tuple[int, int]
    #: entry tables: kind -> [(offset, length)], 8-byte big-endian entries
    tables: Dict[str, List[Tuple[int, int]]] = field(default_factory=dict)
    snapshot_entries: List[int] = field(default_factory=list)
    bitmap_entries: List[int] = field(default_factory=list)
    compressed: List[Tuple[int, int]] = field(default_factory=list)

    @property
    def cs(self) -> int:
        return self.header.cluster_size

    @property
    def fsize(self) -> int:
        return len(self.data)


def _analyse(name: str, path: str) -> Base:
    data = open(path, "rb").read()
    cs = 1 << struct.unpack_from(">I", data, 20)[0]
    h = Header.parse(data[:cs], len(data))
    fields = list(_V2_FIELDS) + (list(_V3_FIELDS) if h.version == 3 else [])
    pos = h.header_length if h.version == 3 else 72
    exts = []
    while True:
        magic, length = struct.unpack_from(">II", data, pos)
        if magic == 0:
            break
        exts.append((pos, magic, length))
        pos += 8 + ((length + 7) & ~7)
    ext_area = (h.header_length if h.version == 3 else 72, pos + 8)
    b = Base(name, path, data, h, fields, exts, ext_area)
    if h.backing_file_offset:
        b.tables["backing_name"] = [(h.backing_file_offset, h.backing_file_size)]
    with qcow2py.open(path, backing_policy=qcow2py.NO_BACKING if h.backing_file is None
                      else qcow2py.DEFAULT_POLICY) as img:
        b.tables["l1"] = [(h.l1_table_offset, h.l1_size * 8)]
        l2s = [int(o) for o in img._l1 if o]
        b.tables["l2"] = [(o, cs) for o in l2s]
        b.tables["reftable"] = [(h.refcount_table_offset, h.refcount_table_clusters * cs)]
        rt = data[h.refcount_table_offset:h.refcount_table_offset + h.refcount_table_clusters * cs]
        b.tables["refblocks"] = [(e & ~511 & U64, cs) for (e,) in struct.iter_unpack(">Q", rt)
                                 if e]
        pos = h.snapshots_offset
        for s in img.snapshots:
            b.snapshot_entries.append(pos)
            pos += 40 + len(s.extra_data) + len(s.id.encode()) + len(s.name.encode())
            pos += -pos % 8
            b.tables.setdefault("snapshot_l1", []).append((s.l1_table_offset, s.l1_size * 8))
        if img.snapshots:
            b.tables["snapshot_table"] = [(h.snapshots_offset, pos - h.snapshots_offset)]
        if img.bitmaps:
            pos = h.bitmaps.directory_offset
            b.tables["bitmap_dir"] = [(pos, h.bitmaps.directory_size)]
            for bm in img.bitmaps:
                b.bitmap_entries.append(pos)
                pos += 24 + len(bm.extra_data) + len(bm.name.encode())
                pos += -pos % 8
                b.tables.setdefault("bitmap_table", []).append((bm.table_offset,
                                                                bm.table_size * 8))
        shift = 62 - (h.cluster_bits - 8)
        step = h.l2_entry_size
        for off in l2s:
            for i in range(0, cs, step):
                (e,) = struct.unpack_from(">Q", data, off + i)
                if e & COMPRESSED:
                    coff = e & ((1 << shift) - 1)
                    nsect = ((e >> shift) & ((1 << (h.cluster_bits - 8)) - 1)) + 1
                    b.compressed.append((coff, nsect * 512 - (coff & 511)))
    return b


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    need("qemu-img")
    need("qemu-io")
    folder = str(tmp_path_factory.mktemp("fuzz-bases"))
    built: Dict[str, Base] = {}

    def get(name: str) -> Base:
        if name not in built:
            files = _build(folder, name)
            built[name] = _analyse(name, files[0])
        return built[name]

    get.folder = folder
    return get


# ------------------------------------------------------------------ mutations
def _interesting(rng: random.Random, size: int, cur: int, b: Base, name: str = "") -> int:
    bits = 8 * size
    top = (1 << bits) - 1
    cands = [0, 1, top, 1 << (bits - 1), (1 << (bits - 1)) - 1, (cur + 1) & top,
             (cur - 1) & top, cur ^ (1 << rng.randrange(bits)), (cur * 2) & top,
             rng.getrandbits(bits)]
    if bits >= 32:
        cands += [1 << 31, (1 << 32) - 1, (1 << 31) - 1, 1 << 16, cur + 8, cur - 8]
    if bits == 64:
        cs, fs = b.cs, b.fsize
        cands += [1 << 32, 1 << 63, fs, fs - cs, fs + cs, cs * rng.randrange(1, 64),
                  1 << 40, 1 << 56, (1 << 56) - cs, (fs // cs) * cs]
    extra = {
        "version": [1, 2, 3, 4],
        "cluster_bits": [8, 9, 12, 14, 16, 20, 21, 22, 31, 32, 64],
        "refcount_order": [0, 3, 4, 6, 7, 64],
        "header_length": [0, 72, 100, 104, 108, 112, 120, b.cs, b.cs + 8, 4096],
        "crypt_method": [1, 2, 3],
        "l1_size": [(b.fsize - b.header.l1_table_offset) // 8, 1 << 22, (1 << 22) + 1,
                    cur * 64, cur + 1],
        "nb_snapshots": [65536, 65537, cur + 1, cur + 100],
        "refcount_table_clusters": [128, 129, cur + 1],
        "backing_file_size": [1023, 1024, b.cs, cur + 1],
        "backing_file_offset": [b.cs, b.cs - 1, b.cs + 8, 72, 104, 112],
        "incompatible_features": [1 << rng.randrange(64), 1, 2, 4, 8, 16, 32, cur | 1,
                                  cur | 4, cur ^ 16, cur | 8],
        "autoclear_features": [0, 1, 2, 3, 1 << rng.randrange(64)],
        "compression_type": [0, 1, 2, 255],
        "size": [1 << 40, 1 << 50, (1 << 63) - 1, cur * 2, cur + 1, cur - 1, 1 << 30],
        "snapshots_offset": [b.header.l1_table_offset, b.header.refcount_table_offset],
    }.get(name, [])
    return rng.choice(cands + extra * 2) & top


def _table_entry(rng: random.Random, cur: int, b: Base, siblings: bytes) -> int:
    cs, fs = b.cs, b.fsize
    some = rng.randrange(0, max(fs // cs, 1)) * cs
    past = -(-fs // cs) * cs
    shift = 62 - (b.header.cluster_bits - 8)
    cands = [0, COPIED | some, some, COPIED | past, COPIED | (1 << 55), COPIED | (cs * 3),
             (cur + 512) & U64, cur | 1, cur | 2, cur | (1 << rng.choice([1, 5, 8, 56, 60, 61])),
             cur ^ (1 << rng.randrange(64)), COMPRESSED | rng.getrandbits(62),
             COMPRESSED | (rng.randrange(1 << (62 - shift)) << shift) | rng.randrange(fs + 4096),
             COMPRESSED | (((1 << (62 - shift)) - 1) << shift) | max(fs - 600, 0),
             U64, 1 << 63, rng.getrandbits(64), (cur + cs) & U64, COPIED | 1,
             COPIED | (past - cs)]
    if len(siblings) >= 8:
        i = rng.randrange(len(siblings) // 8)
        cands.append(struct.unpack_from(">Q", siblings, i * 8)[0])
    return rng.choice(cands)


def _bitmap_word(rng: random.Random, cur: int) -> int:
    return rng.choice([0, 0xFFFFFFFF, 0xFFFFFFFF00000000, U64, 1 | (1 << 32),
                       rng.getrandbits(64), cur ^ (1 << rng.randrange(64)), cur << 32 & U64,
                       cur >> 32, 0x0000FFFF0000FFFF])


def _mutations(b: Base, rng: random.Random):
    """One mutation: ([(offset, bytes)], truncate_or_None, description)."""
    data = b.data
    kinds = ["header"] * 6 + ["header_bits"] * 2 + ["ext"] * 3 + ["l1"] * 3 + ["l2"] * 6 \
        + ["reftable", "refblocks"] + ["bytes"] * 2 + ["truncate"]
    if b.snapshot_entries:
        kinds += ["snapshot"] * 4 + ["snapshot_l1"]
    if b.bitmap_entries:
        kinds += ["bitmap"] * 4 + ["bitmap_table"] * 2
    if b.compressed:
        kinds += ["compressed"] * 3
    if "backing_name" in b.tables:
        kinds += ["backing_name"] * 2
    kind = rng.choice(kinds)

    def u(off, size):
        return int.from_bytes(data[off:off + size], "big")

    if kind == "header":
        name, off, size = rng.choice(b.fields)
        v = _interesting(rng, size, u(off, size), b, name)
        return [(off, v.to_bytes(size, "big"))], None, f"header {name}={v:#x}"
    if kind == "header_bits":
        end = b.header.header_length if b.header.version == 3 else 72
        off = rng.randrange(end)
        v = data[off] ^ (1 << rng.randrange(8))
        return [(off, bytes([v]))], None, f"header byte {off} ^= -> {v:#x}"
    if kind == "ext":
        if b.extensions and rng.random() < 0.7:
            off, magic, length = rng.choice(b.extensions)
            what = rng.choice(["length", "magic"])
            if what == "length":
                v = rng.choice([0, 1, length - 1, length + 1, length + 8, 0xFFFFFFFF, 1 << 31,
                                b.cs, b.cs - off, rng.getrandbits(16)]) & 0xFFFFFFFF
                return [(off + 4, struct.pack(">I", v))], None, \
                    f"ext {magic:#x}@{off} length={v}"
            others = [m for _, m, _ in b.extensions] + [0, 0x12345678, 0x0537BE77, 0x44415441,
                                                        0x23852875, 0xE2792ACA]
            v = rng.choice(others)
            return [(off, struct.pack(">I", v))], None, f"ext {magic:#x}@{off} magic={v:#x}"
        lo, hi = b.ext_area
        off = rng.randrange(lo, hi)
        blob = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 8)))
        return [(off, blob)], None, f"ext area bytes @{off}={blob.hex()}"
    if kind == "refblocks" and b.tables.get(kind):
        toff, tlen = rng.choice(b.tables[kind])
        off = toff + rng.randrange(tlen)
        v = rng.choice([0, 0xFF, 1, rng.getrandbits(8)])
        return [(off, bytes([v]))], None, f"refblock@{toff} byte {off - toff}={v:#x}"
    if kind in ("l1", "l2", "reftable", "snapshot_l1", "bitmap_table", "backing_name") and \
            b.tables.get(kind):
        toff, tlen = rng.choice(b.tables[kind])
        if tlen <= 0:
            return _mutations(b, rng)
        if kind == "backing_name":
            off = toff + rng.randrange(tlen)
            v = rng.choice([0, 0x2F, 0x3A, 0xFF, 0x2E, rng.getrandbits(8)])
            return [(off, bytes([v]))], None, f"backing name byte {off - toff}={v:#x}"
        entry = 16 if (kind == "l2" and b.header.extended_l2) else 8
        idx = rng.randrange(max(tlen // entry, 1))
        # prefer entries that are in use
        if rng.random() < 0.7:
            used = [i for i in range(tlen // entry)
                    if u(toff + i * entry, 8) or (entry == 16 and u(toff + i * entry + 8, 8))]
            if used:
                idx = rng.choice(used)
        off = toff + idx * entry
        if entry == 16 and rng.random() < 0.4:
            v = _bitmap_word(rng, u(off + 8, 8))
            return [(off + 8, v.to_bytes(8, "big"))], None, f"{kind}@{toff} entry {idx} " \
                f"bitmap={v:#x}"
        v = _table_entry(rng, u(off, 8), b, data[toff:toff + min(tlen, 4096)])
        return [(off, v.to_bytes(8, "big"))], None, f"{kind}@{toff} entry {idx}={v:#x}"
    if kind == "snapshot":
        e = rng.choice(b.snapshot_entries)
        rel, size = rng.choice(_SNAP_FIELDS)
        v = _interesting(rng, size, u(e + rel, size), b)
        return [(e + rel, v.to_bytes(size, "big"))], None, f"snapshot@{e}+{rel}={v:#x}"
    if kind == "bitmap":
        e = rng.choice(b.bitmap_entries)
        rel, size = rng.choice(_BITMAP_FIELDS)
        v = _interesting(rng, size, u(e + rel, size), b)
        if rel == 17 and rng.random() < 0.5:
            v = rng.choice([0, 8, 9, 31, 32, 63, 255])
        return [(e + rel, v.to_bytes(size, "big"))], None, f"bitmap entry@{e}+{rel}={v:#x}"
    if kind == "compressed":
        coff, csize = rng.choice(b.compressed)
        off = coff + rng.randrange(max(min(csize, 64), 1))
        blob = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 16)))
        return [(off, blob)], None, f"compressed stream @{coff}+{off - coff}={blob.hex()}"
    if kind == "truncate":
        cs, fs = b.cs, b.fsize
        n = rng.choice([0, 72, 104, 112, cs // 2, cs, 2 * cs, fs // 2, fs - 1, fs - cs,
                        rng.randrange(fs)])
        return [], max(n, 0), f"truncate to {max(n, 0)}"
    # random bytes anywhere in the metadata of cluster 0 or a table
    regions = [(0, b.ext_area[1])] + [r for k in ("l1", "l2", "reftable") for r in b.tables[k]]
    toff, tlen = rng.choice(regions)
    off = toff + rng.randrange(max(tlen, 1))
    blob = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 8)))
    return [(off, blob)], None, f"bytes @{off}={blob.hex()}"


def make_case(b: Base, index: int) -> dict:
    rng = random.Random(f"{SEED}/{b.name}/{index}")
    edits, truncate, desc = [], None, []
    for _ in range(rng.choice([1, 1, 1, 2, 2, 3, 4])):
        e, t, d = _mutations(b, rng)
        edits += [(off, blob.hex()) for off, blob in e]
        if t is not None:
            truncate = t if truncate is None else min(t, truncate)
        desc.append(d)
    return {"id": f"{b.name}-{index}", "base": b.path, "edits": edits, "truncate": truncate,
            "desc": desc}


# ------------------------------------------------------------------ the worker pool
def read_line(fd: int, buf: bytes, timeout: float) -> Tuple[Optional[bytes], bytes]:
    """(next line of a worker's stdout or None after ``timeout`` or b"" at its end,
    the bytes read past it)."""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            return None, buf
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                return b"", buf
            buf += chunk
    line, buf = buf.split(b"\n", 1)
    return line, buf


class _Worker:
    def __init__(self, folder: str, wid: int):
        self.folder, self.wid = folder, wid
        self.proc: Optional[subprocess.Popen] = None
        self._buf = b""

    def _start(self) -> None:
        env = dict(os.environ, MALLOC_ARENA_MAX="2", OPENBLAS_NUM_THREADS="1",
                   OMP_NUM_THREADS="1")
        self.stderr = open(os.path.join(self.folder, f"worker-{self.wid}.err"), "ab")
        self.proc = subprocess.Popen([sys.executable, WORKER, self.folder, str(self.wid),
                                      str(AS_HEADROOM)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, env=env)
        self._buf = b""
        line = self._readline(60.0)
        if line is None or not json.loads(line).get("ready"):
            raise RuntimeError(f"fuzz worker did not start: {self._stderr_tail()}")

    def _stderr_tail(self) -> str:
        try:
            with open(os.path.join(self.folder, f"worker-{self.wid}.err"), "rb") as f:
                return f.read()[-2000:].decode("utf-8", "replace")
        except OSError:
            return ""

    def _readline(self, timeout: float) -> Optional[bytes]:
        line, self._buf = read_line(self.proc.stdout.fileno(), self._buf, timeout)
        return line

    def _kill(self) -> int:
        self.proc.kill()
        rc = self.proc.wait()
        self.proc.stdout.close()
        self.proc.stdin.close()
        self.stderr.close()
        self.proc = None
        return rc

    def run(self, case: dict) -> dict:
        if self.proc is None:
            self._start()
        t0 = time.monotonic()
        try:
            self.proc.stdin.write(json.dumps(case).encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        line = self._readline(CASE_TIMEOUT)
        if line:
            return json.loads(line)
        if line is None:
            self._kill()
            return {"id": case["id"], "status": "bad", "stage": "?",
                    "detail": f"timeout: no result after {time.monotonic() - t0:.1f} s (hang?)",
                    "elapsed": time.monotonic() - t0, "peak": 0}
        self.proc.wait()
        rc = self.proc.returncode
        tail = self._stderr_tail()
        self._kill()
        return {"id": case["id"], "status": "bad", "stage": "?",
                "detail": f"worker died (returncode {rc}; a negative one is a signal, "
                          f"-11 a segfault): {tail}",
                "elapsed": time.monotonic() - t0, "peak": 0}

    def close(self) -> None:
        if self.proc is not None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except Exception:
                self.proc.kill()
                self.proc.wait()
            self.stderr.close()
            self.proc = None


def run_pool(items: List[dict], make_worker, handle) -> List[dict]:
    """``handle(worker, item)`` for every item, on 2 threads (1 per pytest-xdist worker),
    each with its own ``make_worker(tag)`` (closed at the end); the first exception
    of a thread is raised here, not lost in the thread."""
    n = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
    todo: "queue.Queue[dict]" = queue.Queue()
    for c in items:
        todo.put(c)
    results: List[dict] = []
    lock = threading.Lock()
    errors: List[BaseException] = []

    def loop(wid: str) -> None:
        w = make_worker(wid)
        try:
            while True:
                try:
                    c = todo.get_nowait()
                except queue.Empty:
                    return
                r = handle(w, c)
                with lock:
                    results.append(r)
        except BaseException as e:
            errors.append(e)
        finally:
            w.close()

    tag = os.environ.get("PYTEST_XDIST_WORKER", "main")
    threads = [threading.Thread(target=loop, args=(f"{tag}-{i}",)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def run_cases(folder: str, cases: List[dict]) -> List[dict]:
    """Run cases on a pool of subprocess workers: 2, or 1 per pytest-xdist worker."""
    def handle(w: "_Worker", c: dict) -> dict:
        r = w.run(c)
        r["case"] = c
        return r

    results = run_pool(cases, lambda wid: _Worker(folder, wid), handle)
    return sorted(results, key=lambda r: int(r["id"].rsplit("-", 1)[1]))


def _describe(r: dict) -> str:
    c = r["case"]
    return (f"case {r['id']} (seed {SEED}): {r['status']} at {r['stage']} in "
            f"{r['elapsed']:.2f} s, peak +{r['peak'] >> 20} MiB\n"
            f"  mutations: {'; '.join(c['desc'])}\n  saved: {r.get('saved')}\n"
            f"  {r['detail']}")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", BASE_NAMES)
def test_fuzz_metadata(bases, name):
    b = bases(name)
    pristine = {"id": f"{name}-0", "base": b.path, "edits": [], "truncate": None,
                "desc": ["none (pristine image)"]}
    n = CASES // 2 if name == "big" else CASES        # 2 MiB clusters: slower cases
    cases = [pristine] + [make_case(b, i) for i in range(1, n)]
    t0 = time.monotonic()
    results = run_cases(bases.folder, cases)
    took = time.monotonic() - t0
    assert len(results) == len(cases)
    assert results[0]["status"] == "ok", _describe(results[0])
    bad = [r for r in results if r["status"] == "bad" or r["peak"] > PEAK_LIMIT]
    counts = {s: sum(r["status"] == s for r in results) for s in ("ok", "rejected", "bad")}
    print(f"\nfuzz {name}: {len(results)} cases in {took:.1f} s (seed {SEED}): {counts}; "
          f"slowest {max(r['elapsed'] for r in results):.2f} s, "
          f"max peak +{max(r['peak'] for r in results) >> 20} MiB")
    assert not bad, f"{len(bad)} of {len(results)} cases failed:\n\n" + \
        "\n\n".join(_describe(r) for r in bad[:8])
    # writes never make an image that qemu-img finds clean corrupt (qemu-img's verdict)
    broken = []
    for r in results:
        if r.get("written"):
            p = qemu_img("check", r["written"], check=False)
            if p.returncode in (1, 2):
                broken.append(f"{_describe(r)}\n  qemu-img check after our writes: "
                              f"{p.stderr[-500:]}")
            os.unlink(r["written"])
    assert not broken, "\n\n".join(broken[:5])
    # the fuzzer must exercise both outcomes, or it is not testing anything
    assert counts["ok"] > 1 and counts["rejected"] > 1, counts


def test_harness_catches_misbehaviour(bases):
    """Exceptions, segfaults, hangs, huge allocations and RSS peaks all fail a case."""
    global CASE_TIMEOUT
    b = bases("v3")
    kinds = ["raise", "segv", "alloc", "rss", "", "hang", ""]
    cases = [{"id": f"selftest-{i}", "base": b.path, "edits": [], "truncate": None,
              "desc": [k or "none"], "selftest": k} for i, k in enumerate(kinds)]
    w = _Worker(bases.folder, f"selftest-{os.getpid()}")
    res = []
    try:
        for c in cases:
            old = CASE_TIMEOUT
            if c["selftest"] == "hang":
                CASE_TIMEOUT = 1.5
            try:
                res.append(w.run(c))
            finally:
                CASE_TIMEOUT = old
    finally:
        w.close()
    by = {k or f"none{i}": r for i, (k, r) in enumerate(zip(kinds, res))}
    assert by["raise"]["status"] == "bad" and "IndexError" in by["raise"]["detail"]
    assert by["segv"]["status"] == "bad" and "returncode -11" in by["segv"]["detail"]
    assert by["alloc"]["status"] == "bad" and "MemoryError" in by["alloc"]["detail"]
    assert by["rss"]["peak"] > PEAK_LIMIT, by["rss"]
    assert by["hang"]["status"] == "bad" and "timeout" in by["hang"]["detail"]
    assert by["none4"]["status"] == "ok" and by["none6"]["status"] == "ok"   # restarted


# ------------------------------------------------------------------ pure parsers
_u32 = st.integers(0, (1 << 32) - 1)
_u64 = st.one_of(st.integers(0, (1 << 64) - 1),
                 st.sampled_from([0, 1, 1 << 31, (1 << 32) - 1, 1 << 63, (1 << 64) - 1]))


@st.composite
def _header_bytes(draw):
    """Cluster 0 with a plausible start and arbitrary everything else."""
    version = draw(st.sampled_from([2, 3, 3, 3, 1, 4]))
    cluster_bits = draw(st.sampled_from([9, 10, 12, 16, 8, 22, 9, 9]))
    fixed = struct.pack(">IIQIIQIIQQIIQ", MAGIC, version, draw(_u64), draw(_u32), cluster_bits,
                        draw(_u64), draw(st.sampled_from([0, 0, 0, 1, 2])), draw(_u32),
                        draw(_u64), draw(_u64), draw(_u32), draw(_u32), draw(_u64))
    v3 = struct.pack(">QQQII", draw(st.sampled_from([0, 1, 8, 16, 1 << 40]) | _u64),
                     draw(_u64), draw(_u64), draw(st.integers(0, 8)),
                     draw(st.sampled_from([104, 112, 120, 72, 108, 4096, 1 << 20]) | _u32))
    total = draw(st.integers(112, 4096))
    rest = draw(st.binary(min_size=0, max_size=total - 104))
    return (fixed + v3 + rest)[:total]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_header_bytes(), st.one_of(st.none(), st.integers(0, 1 << 40)))
def test_header_parse_never_crashes(buf, file_size):
    try:
        h = Header.parse(buf, file_size)
    except qcow2py.Qcow2Error as e:
        assert len(str(e)) >= 10
        return
    assert 9 <= h.cluster_bits <= 21 and h.version in (2, 3)
    assert h.l1_size * 8 <= 32 << 20


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=112, max_size=4096), st.one_of(st.none(), st.integers(0, 1 << 40)))
def test_header_parse_arbitrary_bytes(buf, file_size):
    buf = struct.pack(">I", MAGIC) + buf[4:]
    try:
        Header.parse(buf, file_size)
    except qcow2py.Qcow2Error:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600), st.integers(0, 70000))
def test_snapshot_table_parse_never_crashes(buf, count):
    try:
        snaps = parse_snapshot_table(buf, count)
    except qcow2py.Qcow2Error as e:
        assert len(str(e)) >= 10
        return
    assert len(snaps) == count
    for s in snaps:
        s.info()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600), st.integers(0, 70000))
def test_bitmap_directory_parse_never_crashes(buf, count):
    try:
        entries = parse_bitmap_directory(buf, count)
    except qcow2py.Qcow2Error as e:
        assert len(str(e)) >= 10
        return
    assert len(entries) == count
    for e in entries:
        e.info()
