"""Pure on-disk structures of qcow2: bytes <-> objects and arrays, no I/O."""
