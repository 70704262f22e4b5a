"""Host-order copy of an image mixing compressed and plain clusters: one sweep per file."""

import os

import qcow2py
from qcow2py.jobs.blockcopy.blockcopy import BlockCopy
from qcow2py.io.wrappers import TraceLog
from qemu import create, qemu_img, qemu_io

KiB, MiB = 1 << 10, 1 << 20


def mixed_image(tmp_path):
    """``qemu-img convert -c`` stores clusters that do not compress as plain data."""
    plain = tmp_path / "plain.qcow2"
    create(plain, "16M")
    noise = tmp_path / "noise.bin"
    noise.write_bytes(os.urandom(64 * KiB))
    cmds = []
    for c in range(0, 200):
        if c % 5 == 0:
            cmds.append(f"write -s {noise} {c * 64 * KiB} 64k")          # incompressible
        elif c % 7:
            cmds.append(f"write -P {c % 250 + 1} {c * 64 * KiB} 64k")     # compresses
    qemu_io(plain, *cmds)
    src = tmp_path / "mixed.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", plain, src)
    return src


def traced_copy(src, out, fmt, order="host"):
    log = TraceLog()
    with qcow2py.open(str(src), storage_wrapper=log.wrap, wrap_chain=True) as img:
        tgt = qcow2py.create(str(out), img.size, format=fmt)
        stats = BlockCopy(img, tgt, order=order).run()
        tgt.close()
    assert qemu_img("compare", src, out, check=False).returncode == 0
    data_reads = log.reads()[-stats.read_requests:]
    # how far back a read starts from the furthest point read so far
    furthest, back = 0, 0
    for _, off, n in data_reads:
        back = max(back, furthest - off)
        furthest = max(furthest, off + n)
    return stats, back


def test_mixed_image_is_read_in_one_sweep(tmp_path, monkeypatch):
    src = mixed_image(tmp_path)
    for fmt in ("qcow2", "raw"):
        stats, back = traced_copy(src, tmp_path / f"out.{fmt}", fmt)
        # neighbours may swap between the two reader threads; no second pass
        assert back < 256 * KiB, back
        # and no more requests than in guest order (plain extents that continue each
        # other are still read as one)
        guest, _ = traced_copy(src, tmp_path / f"guest.{fmt}", fmt, order="guest")
        assert stats.read_requests <= guest.read_requests
        assert stats.bytes_written == guest.bytes_written
    # the check sees a second pass: all the plain data first, then the compressed clusters
    monkeypatch.setattr(BlockCopy, "_copy_mixed", lambda self, d, dd, c, dc, s, m: (
        self._copy_data(d, dd, s, mark=m), self._copy_compressed(c, dc, s, m)))
    stats, back = traced_copy(src, tmp_path / "two-pass.raw", "raw")
    assert back > 1 * MiB, back


def test_guest_order_is_one_pass_over_a_mixed_image(tmp_path):
    """Guest order reads plain and compressed clusters as the guest sees them, as QEMU
    does (it read all the plain data first, then came back for the compressed)."""
    from qcow2py.jobs.blockcopy.plan import P_COMPRESSED, P_DATA, plan_copy
    src = mixed_image(tmp_path)
    log = TraceLog()
    with qcow2py.open(str(src), storage_wrapper=log.wrap, wrap_chain=True) as img:
        plan = plan_copy(img.chain())
        tgt = qcow2py.create(str(tmp_path / "g.raw"), img.size, format="raw")
        stats = BlockCopy(img, tgt, order="guest").run()
        tgt.close()
    assert qemu_img("compare", src, tmp_path / "g.raw", check=False).returncode == 0
    stored = (plan.kind == P_DATA) | (plan.kind == P_COMPRESSED)
    guest_of = dict(zip(plan.host[stored].tolist(), plan.guest[stored].tolist()))
    reads = log.reads()[-stats.read_requests:]
    guests = [guest_of[off] for _, off, _ in reads]     # each read starts an extent
    assert len(set(plan.kind[stored].tolist())) == 2 and len(guests) > 2
    assert guests == sorted(guests)
