"""The disk model of benchmarks/diskmodel*.py: its arithmetic, and the strace parser."""

import os

import numpy as np
import pytest


from benchmarks.diskmodel import IO, Layout
from benchmarks.diskmodel_hdd import HDD, fit_seek_curve
from benchmarks.diskmodel_ssd import NVME_SSD, SATA_SSD, SSD
from benchmarks.diskmodel_strace import parse_strace, parse_strace_calls

SAMPLE = os.path.join(os.path.dirname(__file__), "data", "strace_sample.log")
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


@pytest.fixture(scope="module")
def hdd():
    return HDD()


def random_reads(hdd, n, span=1.0, size=4096, seed=1):
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, int(hdd.capacity * span) // size - 1, n)
    return [IO("disk", int(b) * size, size) for b in blocks]


def test_seek_curve_meets_the_datasheet(hdd):
    p = hdd.p
    assert float(hdd.seek_time(1)) == pytest.approx(p.track_to_track_ms / 1e3, rel=1e-6)
    assert float(hdd.seek_time(p.cylinders - 1)) == pytest.approx(p.full_stroke_ms / 1e3,
                                                                   rel=1e-6)
    d = np.arange(1, p.cylinders, dtype=np.float64)
    t = hdd.seek_time(d)
    w = p.cylinders - d                       # the datasheets' weighting of seek lengths
    assert float((t * w).sum() / w.sum()) == pytest.approx(p.average_seek_ms / 1e3, rel=0.01)
    assert np.all(np.diff(t) >= -1e-12)       # longer seeks never faster
    a, b, x0, c, e = hdd.seek_params
    assert a + b * np.sqrt(x0) == pytest.approx(c + e * x0)      # the two pieces join
    assert float(hdd.seek_time(0)) == 0.0


def test_seek_curve_extremes():
    # an average below the linear curve or above the square-root one is clamped to it
    lin = fit_seek_curve(0.001, 0.0001, 0.02, 1000)
    assert lin[2] == pytest.approx(1.0)
    sq = fit_seek_curve(0.001, 0.019, 0.02, 1000)
    assert sq[2] == pytest.approx(1000.0)


def test_zones_outer_tracks_are_faster(hdd):
    assert hdd.rate_at(0) == pytest.approx(175e6, rel=1e-3)
    assert hdd.rate_at(hdd.capacity - 1) == pytest.approx(83e6, rel=1e-3)
    assert hdd.rate_at(0) > hdd.rate_at(hdd.capacity // 2) > hdd.rate_at(hdd.capacity - 1)


def test_sequential_stream_is_one_seek_plus_transfer(hdd):
    start, n, size = 1 << 40, 2000, 64 * KiB
    ios = [IO("disk", start + i * size, size) for i in range(n)]
    r = hdd.simulate(ios, detail=True)
    transfer = n * size / hdd.rate_at(start)
    assert r["seeks"] == 1 and r["streamed"] == n - 1
    assert r["transfer"] == pytest.approx(transfer, rel=1e-3)
    # the one positioning: command overhead, a seek from cylinder 0, at most a turn
    extra = r["seconds"] - transfer
    assert hdd.p.overhead_ms / 1e3 < extra <= (hdd.p.overhead_ms + hdd.p.full_stroke_ms) / 1e3 \
        + hdd.rev


def test_random_4k_reads_at_qd1(hdd):
    n = 600
    iops = n / hdd.simulate(random_reads(hdd, n), qd=1)
    # average seek + half a turn + overhead: ~12.8 ms a request over the whole disk
    assert 75 <= iops <= 120, iops
    # a shorter span (a 10% partition) seeks less
    short = n / hdd.simulate(random_reads(hdd, n, span=0.1), qd=1)
    assert iops < short < 200


def test_queue_depth_helps_random_reads_not_sequential(hdd):
    ios = random_reads(hdd, 600)
    t1, t32 = hdd.simulate(ios, qd=1), hdd.simulate(ios, qd=32)
    assert t32 < t1 / 2                      # rotational-position ordering
    assert hdd.simulate(ios, qd=4) < t1
    seq = [IO("disk", GiB + i * 128 * KiB, 128 * KiB) for i in range(1000)]
    s1, s32 = hdd.simulate(seq, qd=1), hdd.simulate(seq, qd=32)
    assert s32 == pytest.approx(s1, rel=0.01)


def test_rotational_position_is_tracked(hdd):
    x = 10 ** 12
    first = hdd.simulate([IO("d", x, 4 * KiB)], detail=True)["seconds"]
    # the sector just behind the head: almost a full turn; just ahead: streamed
    behind = hdd.simulate([IO("d", x, 4 * KiB), IO("d", x - 8 * KiB, 4 * KiB)])
    ahead = hdd.simulate([IO("d", x, 4 * KiB), IO("d", x + 16 * KiB, 4 * KiB)])
    assert 0.9 * hdd.rev < behind - first < 1.01 * hdd.rev + 1e-3
    assert ahead - first < 0.5e-3


def test_readahead_hop_and_buffer_hit(hdd):
    x, n = 1 << 38, 64 * KiB
    r = hdd.simulate([IO("d", x, n), IO("d", x + n + 256 * KiB, n)], detail=True)
    assert r["streamed"] == 1 and r["seeks"] == 1
    far = hdd.simulate([IO("d", x, n), IO("d", x + 100 * MiB, n)], detail=True)
    assert far["seeks"] == 2
    again = hdd.simulate([IO("d", x, 4 * n), IO("d", x + n, n)], detail=True)
    assert again["hits"] == 1
    # a request that starts inside what was just read and goes on (compressed clusters
    # whose sector-rounded lengths overlap the next stream) continues the stream
    overlap = hdd.simulate([IO("d", x, n), IO("d", x + n - 512, n)], detail=True)
    assert overlap["streamed"] == 1 and overlap["positioning"] < 0.03


def test_layout_places_files_contiguously(hdd):
    lay = Layout.contiguous({"a": 3 * GiB + 5, "b": 10, "c": 1}, base=GiB)
    assert lay.starts == {"a": GiB, "b": 5 * GiB, "c": 6 * GiB}
    ios = [IO("b", 4096, 512), IO("a", 0, 512)]
    assert lay.addresses(ios).tolist() == [5 * GiB + 4096, GiB]
    with pytest.raises(KeyError):
        lay.addresses([IO("zzz", 0, 1)])
    # two files far apart cost a seek each time the reader hops between them
    hops = [IO("a" if i % 2 else "c", (i // 2) * 65536, 65536) for i in range(200)]
    one = [IO("a", i * 65536, 65536) for i in range(200)]
    assert hdd.simulate(hops, lay) > 5 * hdd.simulate(one, lay)


def test_ssd_latency_and_bandwidth():
    sata, nvme = SSD(SATA_SSD), SSD(NVME_SSD)
    big = [IO("f", i * MiB, MiB) for i in range(1024)]
    assert sata.simulate(big, qd=32) == pytest.approx(GiB / 560e6, rel=0.01)
    # at QD1 each request also waits its latency once
    assert GiB / 560e6 < sata.simulate(big, qd=1) < 1.05 * GiB / 560e6
    assert nvme.simulate(big, qd=32) == pytest.approx(GiB / 3500e6, rel=0.02)
    small = [IO("f", (i * 7919 % 100000) * 4096, 4096) for i in range(10000)]
    assert 10000 / sata.simulate(small, qd=1) == pytest.approx(13000, rel=1e-6)
    assert 10000 / sata.simulate(small, qd=32) == pytest.approx(98000, rel=1e-6)
    assert 10000 / nvme.simulate(small, qd=32) == pytest.approx(600000, rel=1e-6)
    assert sata.simulate(small[::-1], qd=1) == sata.simulate(small, qd=1)   # order-blind
    assert sata.floor(GiB) == pytest.approx(GiB / 560e6)


def test_strace_parser_on_a_captured_log():
    with open(SAMPLE) as f:
        calls = parse_strace_calls(f)
    assert len(calls) == 56
    by = {(c.pid, c.syscall, c.offset): c for c in calls}
    # preadv2 with two iovecs: the lengths are summed
    two = by[(4795, "preadv2", 327680)]
    assert two.file == "/images/s.qcow2" and two.requested == 65536 and two.result == 65536
    # <unfinished ...> / <... resumed> of two threads stitched back together
    assert by[(4794, "preadv2", 65536)].requested == 4096 + 61440
    assert by[(4795, "preadv2", 262144)].result == 65536
    # an iovec array strace abbreviated: the total is unknown, the result is not
    abbrev = by[(4792, "preadv2", 0)]
    assert abbrev.requested is None and abbrev.result == 20480
    # pread64 as qemu-img issues it, and a failed call without a path
    assert by[(4786, "pread64", 458752)].requested == 131072
    assert by[(4792, "pread64", 0)].file == "fd9999" and by[(4792, "pread64", 0)].result == -1
    with open(SAMPLE) as f:
        ios = parse_strace(f, files=["/images/s.qcow2"])
    assert all(io.file == "/images/s.qcow2" and io.length > 0 and not io.write for io in ios)
    assert len(ios) == 21 and sum(io.length for io in ios) == 1069704
    with open(SAMPLE) as f:
        everything = parse_strace(f)
    writes = [io for io in everything if io.write]
    assert writes and all(io.file == "/images/o.qcow2" for io in writes)
    assert not any(io.file == "fd9999" for io in everything)      # failed calls dropped


def test_strace_parser_keeps_issue_order():
    log = [
        '11 pread64(3</d/f>,  <unfinished ...>',
        '12 pread64(3</d/f>, "\\0\\0"..., 4096, 8192) = 4096',
        '13 preadv(3</d/f>, [{iov_base="a\\"b, c", iov_len=512}, {iov_base="", iov_len=512}], 2,'
        ' 65536 <unfinished ...>',
        '11 <... pread64 resumed>"\\1"..., 4096, 0) = 4096',
        '13 <... preadv resumed>) = 1024',
    ]
    calls = parse_strace_calls(log)
    assert [(c.pid, c.offset, c.requested, c.result) for c in calls] == [
        (11, 0, 4096, 4096), (12, 8192, 4096, 4096), (13, 65536, 1024, 1024)]
    assert [io.stream for io in parse_strace(log)] == [11, 12, 13]


def test_tracelog_records_every_layer_in_order(tmp_path):
    import qcow2py
    from qcow2py.io.wrappers import TraceLog

    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    with qcow2py.create(str(base), 4 * MiB) as img:
        img.write(0, b"\x01" * 65536)
    with qcow2py.create(str(top), 4 * MiB, backing_file="base.qcow2",
                        backing_format="qcow2") as img:
        img.write(65536, b"\x02" * 65536)
    log = TraceLog()
    with qcow2py.open(str(top), storage_wrapper=log.wrap, wrap_chain=True) as img:
        assert img.read(0, 131072) == b"\x01" * 65536 + b"\x02" * 65536
    files = [os.path.basename(f) for f, _, _ in log.reads()]
    assert "base.qcow2" in files and "top.qcow2" in files
    assert files[0] == "top.qcow2"                 # the top is opened first
    # without wrap_chain only the top image is traced
    log2 = TraceLog()
    with qcow2py.open(str(top), storage_wrapper=log2.wrap) as img:
        img.read(0, 131072)
    assert {os.path.basename(f) for f, _, _ in log2.reads()} == {"top.qcow2"}
