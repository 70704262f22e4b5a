"""The command line under QEMU's locks: while qemu-nbd serves an image
read-write, every qcow2py command that reads it fails as the qemu-img command
does (its message, its exit code); with ``-U`` both read it; ``-U`` with a
command that writes is refused with qemu-img's words.  Also: two qcow2py
writers racing for one image never both get it, and data files that are the
image itself or a file of its chain are refused.
"""

from __future__ import annotations

import multiprocessing
import shutil

import pytest

import qcow2py
from qcow2py import cli
from qcow2py.cli import copy as copy_cli
from qemu import create, need, qemu_img, qemu_io
from test_write_locks import qemu_nbd_holding

#: (qemu-img arguments, the qcow2py command running the same; "-" is qcow2py-copy)
COMMANDS = [
    (["info", "IMG"], ["info", "IMG"]),
    (["info", "--output=json", "IMG"], ["info", "--output=json", "IMG"]),
    (["check", "IMG"], ["check", "IMG"]),
    (["map", "--output=json", "IMG"], ["map", "--output=json", "IMG"]),
    (["compare", "IMG", "OTHER"], ["compare", "IMG", "OTHER"]),
    (["measure", "-O", "qcow2", "IMG"], ["measure", "-O", "qcow2", "IMG"]),
    (["snapshot", "-l", "IMG"], ["snapshot", "-l", "IMG"]),
    (["convert", "-O", "raw", "IMG", "OUT"], ["-", "-O", "raw", "IMG", "OUT"]),
]


def _ours(argv, capsys) -> tuple:
    capsys.readouterr()
    try:
        code = copy_cli.main(argv[1:]) if argv[0] == "-" else cli.main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, err


def _fill(args, tmp_path, tag):
    out = tmp_path / f"out-{tag}.raw"
    if out.exists():
        out.unlink()
    m = {"IMG": str(tmp_path / "img.qcow2"), "OTHER": str(tmp_path / "other.qcow2"),
         "OUT": str(out)}
    return [m.get(a, a) for a in args]


@pytest.fixture
def served(tmp_path):
    create(tmp_path / "img.qcow2", "1M")
    qemu_io(tmp_path / "img.qcow2", "write -P 3 0 64k")
    create(tmp_path / "other.qcow2", "1M")
    holder = qemu_nbd_holding(tmp_path / "img.qcow2", tmp_path / "nbd.sock")
    yield tmp_path
    holder.close()


def _norm(err: str) -> str:
    return err.replace("qcow2py-copy:", "X:").replace("qcow2py:", "X:").replace(
        "qemu-img:", "X:")


def test_commands_under_qemu_nbd_fail_as_qemu_img(served, capsys):
    need("qemu-nbd")
    for theirs_args, ours_args in COMMANDS:
        for extra in ([], ["-U"]):
            t = _fill(theirs_args[:1] + extra + theirs_args[1:], served, "q")
            o = _fill(ours_args[:1] + extra + ours_args[1:], served, "o")
            p = qemu_img(*t, check=False)
            code, err = _ours(o, capsys)
            assert code == p.returncode, (t, p.returncode, p.stderr, code, err)
            if not extra:
                assert p.returncode != 0 and 'Failed to get shared "write" lock' in p.stderr
                assert "Is another process using the image [" in err, (o, err)
                # the same two lines, the command's own prefix aside
                assert _norm(err).split(":", 1)[1].strip() == \
                    _norm(p.stderr).split(":", 1)[1].strip() or \
                    _norm(err).splitlines()[-1] == _norm(p.stderr).splitlines()[-1], (o, err)
    assert (served / "out-o.raw").read_bytes()[:65536] == b"\x03" * 65536   # -U copied


@pytest.mark.parametrize("argv", [["check", "-U", "-r", "all", "IMG"],
                                  ["snapshot", "-U", "-c", "s1", "IMG"]])
def test_force_share_with_a_writer_is_refused_as_qemu_img(tmp_path, capsys, argv):
    create(tmp_path / "img.qcow2", "1M")
    p = qemu_img(*_fill(argv, tmp_path, "q"), check=False)
    code, err = _ours(_fill(argv, tmp_path, "o"), capsys)
    assert p.returncode == code == 1, (p, code, err)
    msg = "force-share=on can only be used with read-only images"
    assert msg in p.stderr and msg in err, (p.stderr, err)
    assert qcow2py.open(str(tmp_path / "img.qcow2")).snapshots == []


def _racer(path, barrier, results, trials):
    for trial in range(trials):
        barrier.wait()
        try:
            img = qcow2py.open(path, "r+")
        except qcow2py.ImageLockedError:
            results.put((trial, 0))
            barrier.wait()
            continue
        results.put((trial, 1))
        barrier.wait()                  # both have tried: now let go
        img.close()


def test_racing_writers_never_both_win(tmp_path):
    """Take the locks, then test: of two writers opening at the same instant at
    most one gets the image, in every trial."""
    path = str(tmp_path / "img.qcow2")
    create(path, "1M")
    trials = 60
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(path, barrier, results, trials))
             for _ in range(2)]
    for p in procs:
        p.start()
    wins = [0] * trials              # the queue's order mixes trials: count by trial
    for _ in range(2 * trials):
        trial, won = results.get(timeout=60)
        wins[trial] += won
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert max(wins) <= 1, wins
    assert sum(wins) > 0                # and the image is not simply always refused


def _patch_name(path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    assert data.count(old) == 1 and len(old) == len(new)
    path.write_bytes(data.replace(old, new))


def test_data_file_that_is_the_image_itself_is_refused(tmp_path):
    img = tmp_path / "im.qcow2"
    create(img, "1M", f"data_file={tmp_path / 'xx.qcow2'}")
    _patch_name(img, b"/xx.qcow2", b"/im.qcow2")
    before = img.read_bytes()
    for mode in ("r", "r+"):
        with pytest.raises(qcow2py.BackingChainError, match="image itself or a file"):
            qcow2py.open(str(img), mode)
    assert img.read_bytes() == before


def test_data_file_in_the_backing_chain_is_refused(tmp_path):
    base = tmp_path / "base.qcow2"
    create(base, "1M")
    # the overlay's data file is its own backing file
    top = tmp_path / "top.qcow2"
    create(top, "1M", f"data_file={tmp_path / 'dd.qcow2x'}")
    _patch_name(top, b"dd.qcow2x", b"base.qcow2"[:9])       # same length: "base.qcow"
    shutil.copy(base, tmp_path / "base.qcow")
    qemu_img("rebase", "-u", "-b", str(tmp_path / "base.qcow"), "-F", "qcow2", str(top))
    with pytest.raises(qcow2py.BackingChainError, match="loops back|image itself or a file"):
        qcow2py.open(str(top))


def test_data_file_names_go_through_the_backing_policy(tmp_path):
    img = tmp_path / "df.qcow2"
    create(img, "1M", f"data_file={tmp_path / 'd.raw'}")
    with pytest.raises(qcow2py.BackingChainError, match="data file"):
        qcow2py.open(str(img), backing_policy=qcow2py.NO_BACKING)
    with qcow2py.open(str(img), "r+") as w:
        w.write(0, b"\x07" * 512)
    assert (tmp_path / "d.raw").read_bytes()[:512] == b"\x07" * 512


def test_overlay_r_plus_locks_its_backing(tmp_path):
    """The issue's reproducer: qemu-io may not write the base under a qcow2py overlay."""
    need("qemu-io")
    base, ov = tmp_path / "base.qcow2", tmp_path / "ov.qcow2"
    create(base, "1M")
    create(ov, "1M", backing=base)
    with qcow2py.open(str(ov), "r+") as img:
        import subprocess
        p = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x55 0 4096", str(base)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert p.returncode != 0 and 'Failed to get "write" lock' in p.stderr, p
        assert img.read(0, 4) == bytes(4)


def test_every_interleaving_of_two_openers_leaves_one_winner(tmp_path, monkeypatch):
    """Deterministic twin of the race above: the second writer opens completely at
    each of the first one's lock calls in turn.  Testing before taking (the old
    order) lets both win when the second one slips in between; taking first
    never does."""
    import fcntl as fcntl_module
    from qcow2py.io import locking
    path = str(tmp_path / "img.qcow2")
    create(path, "1M")
    real = fcntl_module.fcntl
    calls = []

    def count(fd, cmd, arg=0):
        calls.append(cmd)
        return real(fd, cmd, arg)
    monkeypatch.setattr(locking.fcntl, "fcntl", count)
    qcow2py.open(path, "r+").close()
    n = len(calls)
    assert n >= 8
    for k in range(n):
        state = {"i": 0, "other": None, "other_error": None}

        def hooked(fd, cmd, arg=0):
            state["i"] += 1
            if state["i"] == k + 1 and state["other"] is None:
                state["other"] = "running"
                try:
                    state["other"] = qcow2py.open(path, "r+")
                except qcow2py.ImageLockedError as e:
                    state["other_error"] = e
            return real(fd, cmd, arg)
        monkeypatch.setattr(locking.fcntl, "fcntl", hooked)
        try:
            first = qcow2py.open(path, "r+")
        except qcow2py.ImageLockedError:
            first = None
        finally:
            monkeypatch.setattr(locking.fcntl, "fcntl", real)
        other = state["other"] if state["other_error"] is None else None
        winners = [x for x in (first, other) if x is not None and x != "running"]
        for w in winners:
            w.close()
        assert len(winners) <= 1, f"both writers got the image when the second came at call {k}"


def test_qcow2py_nbd_force_share(tmp_path, capsys):
    """qcow2py-nbd -r -U serves an image qemu-io writes; -U without -r is refused, and
    without -U the read-only server is refused as qemu-nbd -r is."""
    from nbdtest import nbd, qcow2py_nbd
    from qcow2py.nbd import cli as nbd_cli
    from test_write_locks import qemu_io_holding
    need("nbdinfo")
    img = tmp_path / "img.qcow2"
    create(img, "1M")
    qemu_io(img, "write -P 9 0 4k")
    assert nbd_cli.main(["-U", "-k", str(tmp_path / "x.sock"), str(img)]) == 1
    assert "force-share=on can only be used with read-only images" in capsys.readouterr().err
    holder = qemu_io_holding(img)
    try:
        ref = qemu_img("info", "-U", img)                  # qemu-img -U reads it too
        assert ref.returncode == 0
        assert nbd_cli.main(["-r", "-k", str(tmp_path / "y.sock"), str(img)]) == 1
        assert 'Failed to get shared "write" lock' in capsys.readouterr().err
        with qcow2py_nbd(img, tmp_path, "-r", "-U") as served:
            assert "1048576" in nbd("nbdinfo", "--size", served.uri())
    finally:
        holder.close()


def test_rebase_force_share_as_qemu_img(tmp_path, capsys):
    """qemu-img rebase refuses a new backing file that a VM writes, unless -U."""
    from test_write_locks import qemu_io_holding
    new = tmp_path / "new.qcow2"
    create(new, "1M")
    for who in ("q", "o"):
        create(tmp_path / f"old-{who}.qcow2", "1M")
        create(tmp_path / f"top-{who}.qcow2", "1M", backing=tmp_path / f"old-{who}.qcow2")
    holder = qemu_io_holding(new)
    try:
        for extra in ([], ["-U"]):
            argv = ["rebase", *extra, "-b", str(new), "-F", "qcow2"]
            p = qemu_img(*argv, tmp_path / "top-q.qcow2", check=False)
            code, err = _ours([*argv, str(tmp_path / "top-o.qcow2")], capsys)
            assert code == p.returncode == (0 if extra else 1), (extra, p.stderr, err)
            if not extra:
                assert 'Failed to get shared "write" lock' in p.stderr
                assert 'Failed to get shared "write" lock' in err, err
    finally:
        holder.close()
    with qcow2py.open(str(tmp_path / "top-o.qcow2")) as top:
        assert top.backing.filename == str(new)
