"""format/l2.py is where the L1/L2 entry bits live; csrc/l2.h repeats them as
#defines.  Parse the C sources and check both say the same (and that no other csrc
file declares them again), and round-trip the compressed descriptor codec."""

import os
import re

import numpy as np

from qcow2py.format import l2

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
L2_NAMES = ("L2E_OFFSET_MASK", "L2E_STD_RESERVED_MASK", "OFLAG_COPIED", "OFLAG_COMPRESSED",
            "OFLAG_ZERO", *("QP_" + kind.name for kind in l2.ClusterKind))


def _defines(name: str) -> dict:
    with open(os.path.join(CSRC, name)) as fh:
        return {m.group(1): m.group(2) for m in
                re.finditer(r"^#define\s+(\w+)\s+(.+?)\s*(?:/\*.*)?$", fh.read(), re.M)}


def _value(text: str) -> int:
    text = re.sub(r"(?<=[0-9a-fA-F])U?LL\b|(?<=\d)U\b", "", text.strip())
    m = re.fullmatch(r"\(\s*(\w+)\s*<<\s*(\d+)\s*\)", text)
    if m:
        return int(m.group(1), 0) << int(m.group(2))
    return int(text, 0)


def test_cluster_kinds_match_csrc():
    d = _defines("l2.h")
    for kind in l2.ClusterKind:
        assert _value(d["QP_" + kind.name]) == kind.value, kind


def test_entry_bits_match_csrc():
    d = _defines("l2.h")
    assert _value(d["L2E_OFFSET_MASK"]) == l2.L2E_OFFSET_MASK
    assert _value(d["L2E_STD_RESERVED_MASK"]) == l2.L2E_STD_RESERVED_MASK
    assert _value(d["OFLAG_COPIED"]) == l2.OFLAG_COPIED
    assert _value(d["OFLAG_COMPRESSED"]) == l2.OFLAG_COMPRESSED
    assert _value(d["OFLAG_ZERO"]) == l2.OFLAG_ZERO


def test_csrc_declares_the_l2_bits_once():
    for name in sorted(os.listdir(CSRC)):
        if name.endswith((".c", ".h")) and name != "l2.h":
            again = set(_defines(name)) & set(L2_NAMES)
            assert not again, f"csrc/{name} declares {sorted(again)} again (l2.h has them)"


def test_compressed_descriptor_round_trips():
    rng = np.random.default_rng(7)
    for cluster_bits in (9, 12, 16, 21):
        shift = l2.csize_shift(cluster_bits)
        for _ in range(50):
            host = int(rng.integers(0, 1 << min(shift, 56)))
            nsect = int(rng.integers(1, 1 << (cluster_bits - 8)))
            e = l2.compressed_entry(host, nsect, cluster_bits)
            assert e & l2.OFLAG_COMPRESSED and not e & l2.OFLAG_COPIED
            assert l2.compressed_fields(e, cluster_bits) == (host, nsect - 1)
            arr = np.array([e], dtype=np.uint64)
            coff, ns = l2.compressed_fields(arr, cluster_bits)
            assert (int(coff[0]), int(ns[0])) == (host, nsect - 1)
