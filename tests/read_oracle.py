"""QEMU as the oracle for reads: images built with qemu-img / qemu-io, and
qcow2py's answers about them checked against QEMU 7.2's.

For each case of a catalogue (:class:`Cases`, filled by test_read_qemu.py and
test_read_qemu_chains.py) :func:`agrees_with_qemu` builds a small image
(16-64 MiB virtual, a few MiB of data) with the QEMU tools and checks:

* reads: the whole guest disk (sha256 against ``qemu-img convert -O raw``)
  and many unaligned partial reads that straddle cluster, subcluster and
  extent boundaries, compared byte for byte with the reference;
* ``img.map()`` against ``qemu-img map --output=json``, and the text of
  ``python -m qcow2py map --output=json`` against qemu-img's stdout;
* the text of ``qcow2py info --output=json [--backing-chain]`` against
  ``qemu-img info``, for a relative name (cwd = image folder), a relative
  name with a folder part, and an absolute name.

Writes land in shuffled order (seeded) so images are fragmented.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import random
import struct
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest

import qcow2py
from qcow2py import cli
from qemu import create, map_json, need, qemu_img

KiB = 1 << 10
MiB = 1 << 20


def sources(d: Path, rng: random.Random) -> List[str]:
    """Pattern files for ``write -s``: prime lengths so content shifts from cluster to
    cluster (a mis-mapped cluster or a wrong offset inside one changes the bytes).
    One incompressible, one text-like, one half-compressible."""
    d.mkdir(parents=True, exist_ok=True)
    words = [b"qcow2", b"cluster", b"refcount", b"snapshot", b"guest", b"host ", b"\n",
             b"L2 ", b"table", b"zero ", b"backing"]
    blobs = {
        "src-random.bin": bytes(rng.getrandbits(8) for _ in range(4099)),
        "src-text.bin": b" ".join(rng.choice(words) for _ in range(1500))[:7919],
        "src-mixed.bin": bytes(rng.choice(b"abcdefgh0123") for _ in range(6151)),
    }
    out = []
    for name, blob in blobs.items():
        (d / name).write_bytes(blob)
        out.append(str(d / name))
    return out


def scatter(rng: random.Random, size: int, unit: int, count: int, sources: Sequence[str],
            *, align: int = 512, zero: float = 0.12, zero_unmap: float = 0.05,
            discard: float = 0.05, compressed: float = 0.0, limit: Optional[int] = None
            ) -> List[str]:
    """qemu-io commands touching ``count`` slots of ``unit`` bytes in shuffled order.

    Lengths vary: whole units, a few units, and partial ranges (``align``
    granular, some not even sector aligned) that straddle unit boundaries.
    """
    limit = size if limit is None else limit
    slots = list(range(limit // unit))
    rng.shuffle(slots)
    cmds = []
    for slot in slots[:count]:
        off = slot * unit
        shape = rng.random()
        if shape < 0.4:
            length = unit
        elif shape < 0.6:
            length = unit * rng.randint(2, 4)
        else:                                   # partial, crossing into the next unit
            off += rng.randrange(0, unit, align) if unit > align else 0
            length = rng.randint(1, 3 * unit // align) * align
            if rng.random() < 0.2:              # odd byte offsets too
                off += rng.randrange(1, 512)
                length -= rng.randrange(1, 300)
        length = max(1, min(length, limit - off))
        if length <= 0 or off >= limit:
            continue
        op = rng.random()
        if op < zero:
            cmds.append(f"write -z {off} {length}")
        elif op < zero + zero_unmap:
            cmds.append(f"write -z -u {off} {length}")
        elif op < zero + zero_unmap + discard:
            cmds.append(f"discard {off} {length}")
        elif op < zero + zero_unmap + discard + compressed and shape < 0.4 \
                and off % unit == 0:
            cmds.append(f"write -c -P {rng.randrange(1, 256)} {off} {unit}")
        elif rng.random() < 0.5:
            cmds.append(f"write -s {rng.choice(sources)} {off} {length}")
        else:
            cmds.append(f"write -P {rng.randrange(1, 256)} {off} {length}")
    return cmds


def run_io(image, cmds: Sequence[str], fmt: str = "qcow2", batch: int = 200) -> None:
    """qemu-io commands in batches, run in the image's folder (QEMU 7.2 resolves a
    relative external data file name against the working directory)."""
    need("qemu-io")
    image = Path(image)
    for i in range(0, len(cmds), batch):
        args = ["qemu-io", "-f", fmt]
        for c in cmds[i:i + batch]:
            args += ["-c", c]
        p = subprocess.run(args + [str(image)], cwd=str(image.parent), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
        bad = [ln for ln in (p.stdout + p.stderr).splitlines()
               if "error" in ln.lower() or "failed" in ln.lower()]
        assert p.returncode == 0 and not bad, \
            f"qemu-io on {image.name} failed ({p.returncode}): {bad[:5]} {p.stderr[-500:]}"


def populate(path, d: Path, seed: int, size: int, unit: int, count: int, fmt: str = "qcow2",
             **kw) -> None:
    rng = random.Random(seed)
    run_io(path, scatter(rng, size, unit, count, sources(d / "src", rng), **kw), fmt=fmt)


def run_io_abort(image, cmds: Sequence[str]) -> None:
    """Run qemu-io commands, then ``abort``: the image is left as a crash leaves it."""
    args = ["qemu-io", "-f", "qcow2"]
    for c in list(cmds) + ["abort"]:
        args += ["-c", c]
    p = subprocess.run(args + [str(image)], cwd=str(Path(image).parent),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.returncode == -6, (p.returncode, p.stderr)


def qcow2_image(d: Path, name: str, size: int, *opts, unit: int = 64 * KiB,
                count: int = 60, seed: int = 1, backing=None, backing_fmt=None,
                **kw) -> Path:
    p = d / name
    create(p, size, *opts, backing=backing, backing_fmt=backing_fmt, cwd=d)
    if count:
        populate(p, d, seed, size, unit, count, **kw)
    return p


def patch_backing_format_away(path: Path, replacement_magic: int) -> None:
    """Make QEMU probe the backing format: overwrite the magic of the backing-format
    header extension (with 0 = end of extensions, or an unknown magic that QEMU keeps
    and skips).  qemu-img 7.2 no longer creates such images itself."""
    data = bytearray(path.read_bytes()[:4096])
    version = struct.unpack_from(">I", data, 4)[0]
    pos = struct.unpack_from(">I", data, 100)[0] if version == 3 else 72
    magic = struct.unpack_from(">I", data, pos)[0]
    assert magic == 0xE2792ACA, hex(magic)
    with open(path, "r+b") as f:
        f.seek(pos)
        f.write(struct.pack(">I", replacement_magic))


class Cases(dict):
    """A catalogue of images: name -> builder (a function of the test's folder that
    returns the top image it made there)."""

    def __init__(self) -> None:
        super().__init__()
        #: cases qemu-img can map and convert only from the image's folder (it opens a
        #: relative external data file name against its working directory)
        self.image_dir_only: set = set()

    def case(self, name: str, image_dir_only: bool = False):
        def register(fn):
            assert name not in self, name
            self[name] = fn
            if image_dir_only:
                self.image_dir_only.add(name)
            return fn
        return register


def settle(d: Path) -> None:
    """fsync every file: until writeback has converted a file's extents, SEEK_DATA /
    SEEK_HOLE answers (which QEMU's block status reports) can change between calls."""
    for root, _, files in os.walk(d):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                os.fsync(fh.fileno())
                # Warm the page cache too: SEEK_DATA reports an unwritten extent
                # (fallocate) as data where the cache holds its pages, so the first
                # read of such a range would change later answers.
                while fh.read(8 << 20):
                    pass


def reference(path: Path, d: Path) -> bytes:
    out = d / "reference.raw"
    qemu_img("convert", "-O", "raw", path.name, out, cwd=path.parent)
    data = out.read_bytes()
    out.unlink()
    return data


def _boundaries(qemu_map: List[dict]) -> List[int]:
    return [e["start"] for e in qemu_map[1:]]


def check_read(path: Path, d: Path, qmap: List[dict], image_dir_only: bool = False) -> None:
    ref = reference(path, d)
    with qcow2py.open(str(path)) as img:
        assert img.size == len(ref), (img.size, len(ref))
        whole = img.read(0, img.size)
        assert hashlib.sha256(whole).hexdigest() == hashlib.sha256(ref).hexdigest(), \
            _first_difference(whole, ref, img.cluster_size or 65536)
        size = img.size
        cs = img.cluster_size or 65536
        sub = cs >> 5 if getattr(img, "extended_l2", False) else cs
        rng = random.Random(size ^ cs)
        reads = [(size - 1, 1), (0, 1), (max(0, size - 3 * cs - 5), min(size, 3 * cs + 5))]
        for unit in {cs, sub, 512}:
            for _ in range(12):
                b = rng.randrange(1, max(2, size // unit)) * unit
                off = max(0, b - rng.randrange(1, min(unit, 4096) + 1))
                reads.append((off, rng.randrange(1, 3 * unit + 2)))
        edges = _boundaries(qmap)
        for b in rng.sample(edges, min(40, len(edges))):
            reads.append((max(0, b - rng.randrange(1, 1500)), rng.randrange(2, 5000)))
        for _ in range(20):
            off = rng.randrange(size)
            reads.append((off, rng.randrange(1, 5 * cs)))
        for off, n in reads:
            n = min(n, size - off)
            got = img.read(off, n)
            assert got == ref[off:off + n], f"read({off}, {n}) differs: " + \
                _first_difference(got, ref[off:off + n], cs, base=off)
        # read_into a reused, dirty buffer
        buf = bytearray(b"\xee" * min(size, 3 * cs + 777))
        off = min(size - len(buf), cs - 333) if size > len(buf) else 0
        img.read_into(buf, off)
        assert bytes(buf) == ref[off:off + len(buf)], "read_into differs"


def _first_difference(got: bytes, want: bytes, cs: int, base: int = 0) -> str:
    if len(got) != len(want):
        return f"length {len(got)} != {len(want)}"
    step = 4096
    bad = []
    for i in range(0, len(want), step):
        if got[i:i + step] != want[i:i + step]:
            g, w = got[i:i + step], want[i:i + step]
            bad.append(f"@{base + i:#x} got {'zeros' if not any(g) else g[:8].hex()} "
                       f"want {'zeros' if not any(w) else w[:8].hex()}")
            if len(bad) >= 6:
                break
    return "; ".join(bad)


def cli_output(args: List[str], cwd: Path, subprocess_: bool) -> str:
    if subprocess_:
        p = subprocess.run([sys.executable, "-m", "qcow2py", *args], cwd=str(cwd),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert p.returncode == 0, f"qcow2py {' '.join(args)} failed: {p.stderr}"
        return p.stdout
    out = io.StringIO()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out):
            rc = cli.main(list(args))
    finally:
        os.chdir(old)
    assert rc == 0, f"qcow2py {' '.join(args)} returned {rc}"
    return out.getvalue()


#: which command the current case runs as a real ``python -m qcow2py`` process (the
#: other ways of naming the image call the same ``cli.main`` in-process); cases
#: alternate between map and info to keep the suite fast
SUBPROCESS = ["map"]


def _names(path: Path, image_dir_only: bool = False):
    """(cwd, filename, run-as-subprocess) for each way of naming the image."""
    names = [(path.parent, path.name, True),
             (path.parent.parent, f"{path.parent.name}/{path.name}", False),
             (Path("/"), str(path), False),
             (path.parent.parent, f"./{path.parent.name}//{path.name}", False)]
    return names[:1] if image_dir_only else names


def check_map(path: Path, d: Path, qmap: List[dict], image_dir_only: bool = False) -> None:
    with qcow2py.open(str(path)) as img:
        ours = img.map()
    qmap = map_json(path.name, cwd=path.parent)
    assert ours == qmap, _diff_list(ours, qmap)
    for cwd, name, sub in _names(path, image_dir_only):
        want = qemu_img("map", "--output=json", name, cwd=cwd).stdout
        got = cli_output(["map", "--output=json", name], cwd,
                         sub and SUBPROCESS[0] == "map")
        assert got == want, f"map text for {name!r} differs:\n" + _diff_text(got, want)
    # windows with odd bounds, and the human table (in-process: cheap)
    cwd, name = path.parent, path.name
    size = qmap[-1]["start"] + qmap[-1]["length"]
    rng = random.Random(size)
    for _ in range(3):
        start = rng.randrange(size)
        window = ["--start-offset", str(start), "--max-length", str(rng.randrange(1, size))]
        want = qemu_img("map", "--output=json", *window, name, cwd=cwd).stdout
        got = cli_output(["map", "--output=json", *window, name], cwd, False)
        assert got == want, f"map {' '.join(window)} differs:\n" + _diff_text(got, want)
    q = qemu_img("map", name, cwd=cwd, check=False)
    if q.returncode == 0:
        got = cli_output(["map", name], cwd, False)
        assert got == q.stdout, "human map differs:\n" + _diff_text(got, q.stdout)
    else:       # compressed clusters: both refuse the human table
        assert "compressed" in q.stderr, q.stderr
        with pytest.raises(AssertionError, match="returned 1"):
            cli_output(["map", name], cwd, False)


def check_info(path: Path, d: Path, qmap: List[dict], image_dir_only: bool = False) -> None:
    # qemu-img info does not open an external data file: every name works
    for cwd, name, sub in _names(path):
        for extra in ([], ["--backing-chain"]):
            before = _allocations(path.parent)
            want = qemu_img("info", "--output=json", *extra, name, cwd=cwd).stdout
            got = cli_output(["info", "--output=json", *extra, name], cwd,
                             sub and SUBPROCESS[0] == "info" and not extra)
            if got != want and _without_actual_size(got) == _without_actual_size(want):
                # the one field allowed to differ, and only if a file changed meanwhile
                assert _allocations(path.parent) != before, \
                    f"actual-size differs for {name!r}:\n" + _diff_text(got, want)
                continue
            assert got == want, f"info {' '.join(extra)} for {name!r} differs:\n" + \
                _diff_text(got, want)


def _allocations(folder: Path) -> Dict[str, int]:
    return {str(f): f.stat().st_blocks for f in folder.rglob("*") if f.is_file()}


def _without_actual_size(text: str) -> str:
    return "\n".join(ln for ln in text.splitlines() if '"actual-size":' not in ln)


def _diff_list(got: List[dict], want: List[dict]) -> str:
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            return f"entry {i}: got {g}\n          want {w} ({len(got)} vs {len(want)} entries)"
    return f"{len(got)} entries, want {len(want)}; first extra: " \
           f"{(got + want)[min(len(got), len(want))]}"


def _diff_text(got: str, want: str) -> str:
    import difflib
    return "".join(list(difflib.unified_diff(want.splitlines(True), got.splitlines(True),
                                             "qemu-img", "qcow2py", n=2))[:60])


def agrees_with_qemu(cases: Cases, name: str, tmp_path: Path) -> None:
    """Build the image with QEMU, then compare reads, map and info with qemu-img."""
    need("qemu-img")
    need("qemu-io")
    path = cases[name](tmp_path)
    settle(tmp_path)
    qmap = map_json(path.name, cwd=path.parent)
    SUBPROCESS[0] = ("map", "info")[list(cases).index(name) % 2]
    problems = []
    for check in (check_read, check_map, check_info):
        try:
            check(path, tmp_path, qmap, name in cases.image_dir_only)
        except AssertionError as e:
            problems.append(f"{check.__name__}: {e}")
    assert not problems, "\n\n".join(problems)


def pure_python_twins_agree(cases: Cases, name: str, tmp_path: Path, monkeypatch) -> None:
    """The same reads and maps with the C hot path replaced by its numpy twins."""
    from qcow2py import native
    from qcow2py.native import backend_pure
    monkeypatch.setattr(native, "decode_l2", backend_pure.decode_l2)
    monkeypatch.setattr(native, "pread_runs", backend_pure.pread_runs)
    path = cases[name](tmp_path)
    settle(tmp_path)
    qmap = map_json(path.name, cwd=path.parent)
    check_read(path, tmp_path, qmap)
    with qcow2py.open(str(path)) as img:
        assert img.map() == qmap
