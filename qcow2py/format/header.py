"""The qcow2 header (cluster 0): fixed fields, extensions, backing name.

This module is the only place that knows the header layout.  Parsing keeps
everything it does not interpret (unknown header fields, unknown extensions,
the feature-name table), so :meth:`Header.encode` writes them back byte for
byte.  It performs no I/O.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from ..errors import FormatError, UnsupportedFeatureError

MAGIC = 0x514649FB
MAGIC_BYTES = MAGIC.to_bytes(4, "big")


def has_magic(buf: bytes) -> bool:
    """Whether ``buf`` (the start of a file) begins with the qcow2 magic."""
    return bytes(buf[:4]) == MAGIC_BYTES
V2_HEADER_LENGTH = 72
V3_MIN_HEADER_LENGTH = 104
QEMU_HEADER_LENGTH = 112          # what QEMU 7.2 writes (compression_type + padding)

MIN_CLUSTER_BITS, MAX_CLUSTER_BITS = 9, 21
MAX_L1_BYTES = 32 << 20           # QCOW_MAX_L1_SIZE
MAX_REFTABLE_BYTES = 8 << 20      # QCOW_MAX_REFTABLE_SIZE
MAX_SNAPSHOTS = 65536
MAX_BACKING_NAME = 1023
MAX_OFFSET = (1 << 56) - 1        # QCOW_MAX_CLUSTER_OFFSET

# Extension magics
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

# Feature bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = 0x1F
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
AUTOCLEAR_KNOWN = 0x3

COMPRESSION_ZLIB, COMPRESSION_ZSTD = 0, 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

#: The feature-name table QEMU 7.2 writes: (type, bit, name).
QEMU_FEATURE_TABLE = [
    (0, 0, "dirty bit"), (0, 1, "corrupt bit"), (0, 2, "external data file"),
    (0, 3, "compression type"), (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"), (2, 0, "bitmaps"), (2, 1, "raw external data"),
]

#: The header's fields in file order: (name, struct code).  Offsets follow from
#: the order; this table is the one place that knows where a field lives.
FIELDS = (
    ("magic", "I"), ("version", "I"), ("backing_file_offset", "Q"),
    ("backing_file_size", "I"), ("cluster_bits", "I"), ("size", "Q"),
    ("crypt_method", "I"), ("l1_size", "I"), ("l1_table_offset", "Q"),
    ("refcount_table_offset", "Q"), ("refcount_table_clusters", "I"),
    ("nb_snapshots", "I"), ("snapshots_offset", "Q"),                  # 0..71: v2 and v3
    ("incompatible_features", "Q"), ("compatible_features", "Q"),
    ("autoclear_features", "Q"), ("refcount_order", "I"), ("header_length", "I"),  # ..103
)
FIELD_OFFSETS = {}
_pos = 0
for _name, _code in FIELDS:
    FIELD_OFFSETS[_name] = _pos
    _pos += struct.calcsize(">" + _code)
_FORMATS = dict(FIELDS)
_FIXED = struct.Struct(">" + "".join(c for _, c in FIELDS[:13]))     # bytes 0..71
_V3 = struct.Struct(">" + "".join(c for _, c in FIELDS[13:]))        # bytes 72..103
assert _FIXED.size == V2_HEADER_LENGTH and _FIXED.size + _V3.size == V3_MIN_HEADER_LENGTH


def field_offset(name: str) -> int:
    """Byte offset of header field ``name`` in the file."""
    return FIELD_OFFSETS[name]


def encode_fields(*names_values) -> Tuple[int, bytes]:
    """``(offset, bytes)`` that rewrite the adjacent header fields given as
    ``(name, value)`` pairs, in file order (one pwrite updates them together)."""
    first = names_values[0][0]
    fmt = ">" + "".join(_FORMATS[n] for n, _ in names_values)
    pos = FIELD_OFFSETS[first]
    for n, _ in names_values:
        assert FIELD_OFFSETS[n] == pos, f"header fields not adjacent at {n}"
        pos += struct.calcsize(">" + _FORMATS[n])
    return FIELD_OFFSETS[first], struct.pack(fmt, *(v for _, v in names_values))


def peek_cluster_bits(buf: bytes) -> int:
    """cluster_bits of a header's first bytes, unchecked (to size the read of cluster 0)."""
    off = FIELD_OFFSETS["cluster_bits"]
    return struct.unpack_from(">I", buf, off)[0]
_EXT_HDR = struct.Struct(">II")
_BITMAPS_EXT = struct.Struct(">IIQQ")
_CRYPTO_EXT = struct.Struct(">QQ")


@dataclass
class BitmapsExtension:
    nb_bitmaps: int
    directory_size: int
    directory_offset: int
    reserved: int = 0

    @classmethod
    def parse(cls, data: bytes) -> "BitmapsExtension":
        if len(data) != _BITMAPS_EXT.size:
            raise FormatError(f"bitmaps extension is too short ({len(data)} bytes, "
                              f"{_BITMAPS_EXT.size} needed)")
        nb, reserved, size, off = _BITMAPS_EXT.unpack_from(data)
        return cls(nb, size, off, reserved)

    def encode(self) -> bytes:
        return _BITMAPS_EXT.pack(self.nb_bitmaps, self.reserved, self.directory_size,
                                 self.directory_offset)


@dataclass
class Header:
    """All of cluster 0, parsed.  Fields keep the spec's names."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LENGTH
    compression_type: int = COMPRESSION_ZLIB
    #: header bytes after compression_type (padding + fields unknown to us), kept verbatim
    unknown_header_fields: bytes = b""
    backing_file: Optional[str] = None
    backing_format: Optional[str] = None
    data_file: Optional[str] = None
    feature_table: List[Tuple[int, int, str]] = field(default_factory=list)
    has_feature_table: bool = False
    bitmaps: Optional[BitmapsExtension] = None
    crypto: Optional[Tuple[int, int]] = None
    #: extensions with unknown magic, in file order: (magic, payload)
    unknown_extensions: List[Tuple[int, bytes]] = field(default_factory=list)

    # ------------------------------------------------------------ derived
    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // self.l2_entry_size

    @property
    def subcluster_bits(self) -> int:
        """log2 of the mapping unit: the subcluster with extended L2, else the cluster."""
        return self.cluster_bits - 5 if self.extended_l2 else self.cluster_bits

    @property
    def has_data_file(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_DATA_FILE)

    @property
    def data_file_raw(self) -> bool:
        return bool(self.autoclear_features & AUTOCLEAR_DATA_FILE_RAW)

    @property
    def compression_name(self) -> str:
        return COMPRESSION_NAMES[self.compression_type]

    def feature_name(self, kind: int, bit: int) -> Optional[str]:
        for t, b, name in self.feature_table:
            if t == kind and b == bit:
                return name
        return None

    # ------------------------------------------------------------ parse
    @classmethod
    def fixed_size_needed(cls) -> int:
        """Bytes to read first: enough to learn cluster_bits and header_length."""
        return V3_MIN_HEADER_LENGTH

    @classmethod
    def parse(cls, cluster0: bytes, file_size: Optional[int] = None,
              lenient: bool = False) -> "Header":
        """Parse cluster 0 (or at least its first ``cluster_size`` bytes available).

        Raises :class:`FormatError` for malformed headers and
        :class:`UnsupportedFeatureError` for images qcow2py cannot read.
        ``lenient`` (for check) accepts what QEMU opens but qcow2py refuses to
        use: an L1 or snapshot table at offset 0.
        """
        buf = bytes(cluster0)
        if len(buf) < V2_HEADER_LENGTH:
            raise FormatError(f"file too short for a qcow2 header ({len(buf)} bytes)")
        (magic, version, bf_off, bf_size, cluster_bits, size, crypt, l1_size, l1_off,
         rt_off, rt_clusters, nb_snap, snap_off) = _FIXED.unpack_from(buf)
        if magic != MAGIC:
            raise FormatError(f"bad magic {magic:#010x}: not a qcow2 image")
        if version not in (2, 3):
            raise UnsupportedFeatureError(f"unsupported qcow2 version {version}")
        if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
            raise FormatError(f"unsupported cluster size: 2^{cluster_bits} "
                              f"(cluster_bits must be {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS})")
        cluster_size = 1 << cluster_bits
        h = cls(version, bf_off, bf_size, cluster_bits, size, crypt, l1_size, l1_off,
                rt_off, rt_clusters, nb_snap, snap_off)
        if version == 3:
            if len(buf) < V3_MIN_HEADER_LENGTH:
                raise FormatError(f"file too short for a qcow2 v3 header ({len(buf)} bytes, "
                                  f"{V3_MIN_HEADER_LENGTH} needed)")
            (h.incompatible_features, h.compatible_features, h.autoclear_features,
             h.refcount_order, h.header_length) = _V3.unpack_from(buf, 72)
            if h.header_length < V3_MIN_HEADER_LENGTH:
                raise FormatError(f"qcow2 header too short (header_length {h.header_length})")
            if h.header_length > cluster_size:
                raise FormatError(f"qcow2 header_length {h.header_length} exceeds the "
                                  f"cluster size ({cluster_size})")
            if h.header_length % 8 and not lenient:
                raise FormatError(f"header_length {h.header_length} is not a multiple of 8")
            if len(buf) < h.header_length:
                raise FormatError(f"file too short for its header_length ({len(buf)} bytes, "
                                  f"header_length {h.header_length})")
            if h.header_length > V3_MIN_HEADER_LENGTH:
                h.compression_type = buf[104]
            # padding and any fields a newer writer added, kept verbatim
            h.unknown_header_fields = buf[105:h.header_length]
        h._lenient = lenient
        h._validate(file_size)
        h._parse_extensions(buf)
        h._validate_features()
        return h

    def _validate(self, file_size: Optional[int]) -> None:
        cs = self.cluster_size
        if self.refcount_order > 6:
            raise FormatError(f"reference count entry width too large (refcount_order "
                              f"{self.refcount_order})")
        if self.version == 2 and self.refcount_order != 4:
            raise FormatError("v2 images must use 16-bit refcounts")
        if self.size > (1 << 63) - 1:
            raise FormatError(f"virtual size too large ({self.size} bytes)")
        # backing file name
        if self.backing_file_offset:
            if self.backing_file_offset > cs:
                raise FormatError(f"invalid backing file offset {self.backing_file_offset} "
                                  f"(past cluster 0 of {cs} bytes)")
            if self.backing_file_size > min(MAX_BACKING_NAME, cs - self.backing_file_offset):
                raise FormatError(f"backing file name too long ({self.backing_file_size} bytes "
                                  f"at offset {self.backing_file_offset}; at most "
                                  f"{min(MAX_BACKING_NAME, cs - self.backing_file_offset)} fit)")
        if self.extended_l2 and self.cluster_bits < 14:
            raise FormatError(f"extended L2 entries need clusters of at least 16 KiB "
                              f"(cluster size {cs})")
        # L1 table
        l2_entries = cs // (16 if self.extended_l2 else 8)
        if self.l1_size * 8 > MAX_L1_BYTES:
            raise FormatError(f"L1 table too large ({self.l1_size} entries; at most "
                              f"{MAX_L1_BYTES // 8})")
        needed = -(-self.size // (cs * l2_entries)) if self.size else 0
        if self.l1_size < needed:
            raise FormatError(f"L1 table is too small ({self.l1_size} entries, "
                              f"{needed} needed for {self.size} bytes)")
        self._check_table("L1 table", self.l1_table_offset, self.l1_size * 8, file_size,
                          required=self.l1_size > 0)
        # refcount table
        if self.refcount_table_offset == 0 and not getattr(self, "_lenient", False):
            raise FormatError("image does not contain a reference count table")
        if self.refcount_table_clusters * cs > MAX_REFTABLE_BYTES:
            raise FormatError(f"refcount table too large ({self.refcount_table_clusters} "
                              f"clusters; at most {MAX_REFTABLE_BYTES // cs})")
        self._check_table("refcount table", self.refcount_table_offset,
                          self.refcount_table_clusters * cs, file_size, required=True)
        # snapshots
        lenient = getattr(self, "_lenient", False)
        if self.nb_snapshots > MAX_SNAPSHOTS and not lenient:    # check -r all drops them
            raise FormatError(f"too many snapshots ({self.nb_snapshots}; at most "
                              f"{MAX_SNAPSHOTS})")
        nb = min(self.nb_snapshots, MAX_SNAPSHOTS)
        # QEMU validates the snapshot table offset even without snapshots
        if self.snapshot_offset_problem() and not (lenient and nb == 0):
            raise FormatError(self.snapshot_offset_problem())
        if nb:
            # each entry is at least 40 bytes
            self._check_table("snapshot table", self.snapshots_offset, 40 * nb,
                              file_size, required=True)
        if self.compression_type not in COMPRESSION_NAMES:
            raise UnsupportedFeatureError(f"unknown compression type {self.compression_type}")
        if bool(self.compression_type) != bool(self.incompatible_features & INCOMPAT_COMPRESSION):
            raise FormatError(f"compression_type field ({self.compression_type}) and "
                              f"incompatible bit 3 (compression type) disagree")

    def snapshot_offset_problem(self) -> Optional[str]:
        """Why QEMU refuses the snapshot table offset (it checks it even without
        snapshots), or None."""
        nb = min(self.nb_snapshots, MAX_SNAPSHOTS)
        if self.snapshots_offset % self.cluster_size:
            return f"snapshot table offset {self.snapshots_offset:#x} is not cluster aligned"
        if self.snapshots_offset > (1 << 63) - 1 - 40 * nb:
            return f"snapshot table offset {self.snapshots_offset:#x} invalid"
        return None

    def _check_table(self, what: str, offset: int, length: int,
                     file_size: Optional[int], required: bool) -> None:
        if offset % self.cluster_size:
            raise FormatError(f"{what} offset {offset:#x} is not cluster aligned")
        limit = (1 << 63) - 1 if getattr(self, "_lenient", False) else MAX_OFFSET
        if offset + length > limit:
            raise FormatError(f"{what} at {offset:#x} lies beyond the maximum offset")
        if required and offset == 0 and not getattr(self, "_lenient", False):
            raise FormatError(f"{what} offset is 0 (overlaps the header)")
        if file_size is not None and required and offset + length > file_size:
            raise FormatError(f"{what} at {offset:#x} (+{length}) extends past the end of "
                              f"the file ({file_size} bytes)")

    def _parse_extensions(self, buf: bytes) -> None:
        cs = self.cluster_size
        pos = self.header_length if self.version == 3 else V2_HEADER_LENGTH
        end = self.backing_file_offset if self.backing_file_offset else cs
        end = min(end, len(buf))
        seen = set()
        while True:
            if pos >= end and end == len(buf) < cs:
                raise FormatError("header extensions run past the end of the file")
            if pos >= end:
                break
            if pos + 8 > end:
                raise FormatError("Header extension too large")
            magic, length = _EXT_HDR.unpack_from(buf, pos)
            pos += 8
            if length > end - pos:       # QEMU checks this before the end marker
                raise FormatError(f"Header extension too large ({magic:#010x} of {length} "
                                  f"bytes runs past the extension area)")
            if magic == EXT_END:
                break
            data = buf[pos:pos + length]
            pos += (length + 7) & ~7
            seen.add(magic)             # QEMU takes a repeated extension too (last wins)
            if magic == EXT_BACKING_FORMAT:
                if length >= 16:
                    raise FormatError(f"ERROR: ext_backing_format: len={length} too large "
                                      f"(>=16)")
                self.backing_format = _decode_name(data, "backing format")
            elif magic == EXT_FEATURE_TABLE:
                self.has_feature_table = True
                for i in range(0, length - length % 48, 48):     # QEMU: any length
                    t, bit = data[i], data[i + 1]
                    name = data[i + 2:i + 48].split(b"\0", 1)[0].decode("utf-8", "replace")
                    self.feature_table.append((t, bit, name))
            elif magic == EXT_BITMAPS:
                self.bitmaps = BitmapsExtension.parse(data)
            elif magic == EXT_CRYPTO:
                if length < 16:
                    raise FormatError(f"crypto header extension is too short ({length} bytes, "
                                      f"16 needed)")
                if self.crypt_method != 2:
                    raise FormatError(f"crypto header extension present but crypt_method is "
                                      f"{self.crypt_method}, not 2 (LUKS)")
                self.crypto = _CRYPTO_EXT.unpack_from(data)
            elif magic == EXT_DATA_FILE:
                if getattr(self, "_lenient", False):      # QEMU takes any bytes
                    self.data_file = bytes(data).decode("utf-8", "replace")
                else:
                    self.data_file = _decode_name(data, "data file")
            else:
                self.unknown_extensions.append((magic, bytes(data)))
        if self.backing_file_offset:
            lo = self.backing_file_offset
            raw = buf[lo:lo + self.backing_file_size]
            if len(raw) != self.backing_file_size:
                raise FormatError(f"backing file name at {lo} (+{self.backing_file_size}) "
                                  f"extends past the end of the file ({len(buf)} bytes "
                                  f"of cluster 0)")
            self.backing_file = _decode_name(raw, "backing file")

    def _validate_features(self) -> None:
        if self.crypt_method:
            kind = {1: "AES", 2: "LUKS"}.get(self.crypt_method, f"method {self.crypt_method}")
            raise UnsupportedFeatureError(f"encrypted images are not supported ({kind} encryption)")
        unknown = self.incompatible_features & ~INCOMPAT_KNOWN
        if unknown:
            names = []
            for bit in range(64):
                if unknown & (1 << bit):
                    names.append(self.feature_name(0, bit) or f"unknown incompatible feature bit {bit}")
            raise UnsupportedFeatureError("unsupported qcow2 feature(s): " + ", ".join(names))
        if self.has_data_file and self.backing_file_offset and self.data_file_raw:
            raise FormatError("a raw external data file cannot have a backing file")
        if self.autoclear_features & AUTOCLEAR_DATA_FILE_RAW and not self.has_data_file:
            raise FormatError("data-file-raw requires a data file")

    # ------------------------------------------------------------ encode
    def encode(self) -> bytes:
        """Cluster 0 as QEMU lays it out; unknown fields and extensions are kept.

        Sets ``header_length``, ``backing_file_offset`` and ``backing_file_size``
        from the content.  Raises :class:`FormatError` if it does not fit.
        """
        cs = self.cluster_size
        if self.version == 3:
            tail = self.unknown_header_fields.ljust(QEMU_HEADER_LENGTH - 105, b"\0")
            self.header_length = 105 + len(tail)
        out = bytearray()
        out += _FIXED.pack(MAGIC, self.version, 0, 0, self.cluster_bits, self.size,
                           self.crypt_method, self.l1_size, self.l1_table_offset,
                           self.refcount_table_offset, self.refcount_table_clusters,
                           self.nb_snapshots, self.snapshots_offset)
        if self.version == 3:
            out += _V3.pack(self.incompatible_features, self.compatible_features,
                            self.autoclear_features, self.refcount_order, self.header_length)
            out += bytes([self.compression_type]) + tail
            assert len(out) == self.header_length

        def ext(magic: int, data: bytes) -> None:
            out.extend(_EXT_HDR.pack(magic, len(data)))
            out.extend(data)
            out.extend(bytes(-len(data) % 8))

        if self.backing_format is not None:
            ext(EXT_BACKING_FORMAT, self.backing_format.encode())
        if self.data_file is not None:
            ext(EXT_DATA_FILE, self.data_file.encode())
        if self.crypto is not None:
            ext(EXT_CRYPTO, _CRYPTO_EXT.pack(*self.crypto))
        if self.version == 3 and (self.has_feature_table or cs > 4096):
            table = self.feature_table or QEMU_FEATURE_TABLE
            ext(EXT_FEATURE_TABLE, b"".join(
                bytes([t, b]) + name.encode()[:46].ljust(46, b"\0") for t, b, name in table))
        if self.bitmaps is not None:
            ext(EXT_BITMAPS, self.bitmaps.encode())
        for magic, data in self.unknown_extensions:
            ext(magic, data)
        out += _EXT_HDR.pack(EXT_END, 0)
        if self.backing_file is not None:
            name = self.backing_file.encode()
            if len(name) > MAX_BACKING_NAME:
                raise FormatError("backing file name too long")
            self.backing_file_offset, self.backing_file_size = len(out), len(name)
            out += name
        else:
            self.backing_file_offset, self.backing_file_size = 0, 0
        if len(out) > cs:
            raise FormatError("header, extensions and backing name do not fit in cluster 0")
        off, data = encode_fields(("backing_file_offset", self.backing_file_offset),
                                  ("backing_file_size", self.backing_file_size))
        out[off:off + len(data)] = data
        return bytes(out) + bytes(cs - len(out))


def _decode_name(data: bytes, what: str) -> str:
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(f"{what} name is not valid UTF-8") from None
