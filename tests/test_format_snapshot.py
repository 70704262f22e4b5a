"""The snapshot table codec (format/snapshot.py): what encode makes, parse reads
back; the size function agrees with encode without encoding."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from qcow2py.format.snapshot import (Snapshot, encode_snapshot_table, parse_snapshot_table,
                                     snapshot_table_size)

_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
                max_size=40)
_snapshot = st.builds(
    Snapshot, l1_table_offset=st.integers(0, (1 << 55) - 1).map(lambda x: x * 512),
    l1_size=st.integers(0, 1 << 20), id=_text, name=_text, date_sec=st.integers(0, 2**32 - 1),
    date_nsec=st.integers(0, 999_999_999), vm_clock_nsec=st.integers(0, 2**63 - 1),
    vm_state_size=st.integers(0, 2**32 - 1), disk_size=st.none(), icount=st.none(),
    extra_data=st.binary(max_size=64).map(lambda b: b[:len(b) // 8 * 8]))


@settings(max_examples=200, deadline=None)
@given(st.lists(_snapshot, max_size=6))
def test_encode_parse_and_size_agree(snapshots):
    data = encode_snapshot_table(snapshots)
    assert len(data) == snapshot_table_size(snapshots)
    back = parse_snapshot_table(data, len(snapshots))
    assert [(s.l1_table_offset, s.l1_size, s.id, s.name, s.date_sec, s.date_nsec,
             s.vm_clock_nsec, s.extra_data) for s in back] == \
        [(s.l1_table_offset, s.l1_size, s.id, s.name, s.date_sec, s.date_nsec,
          s.vm_clock_nsec, s.extra_data) for s in snapshots]
