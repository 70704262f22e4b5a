"""The one parser of qemu-style sizes and ``-o key=value,...`` option lists, shared by
``qcow2py create``, ``qcow2py bitmap`` and ``qcow2py-copy`` (so they agree on hex
sizes, ``,,`` escapes and y/n booleans, as qemu-img does)."""

from __future__ import annotations

import re
from typing import Dict, List, Optional

SUFFIXES = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
            "p": 1 << 50, "e": 1 << 60}
BOOL_WORDS = {"on": True, "yes": True, "true": True, "y": True,
              "off": False, "no": False, "false": False, "n": False}
#: -o options per format and how to read them (as QEMU 7.2's create options)
CREATE_OPTIONS = {
    "qcow2": {"size": "size", "compat": "str", "backing_file": "str", "backing_fmt": "str",
              "data_file": "str", "data_file_raw": "bool", "cluster_size": "size",
              "extended_l2": "bool", "preallocation": "str", "lazy_refcounts": "bool",
              "refcount_bits": "number", "compression_type": "str"},
    "raw": {"size": "size", "preallocation": "str"},
}


class OptionError(ValueError):
    """An option list qemu-img would refuse, with its message."""


def parse_size(text: str) -> int:
    """A size argument (``-S``, ``--granularity``, ``-m``): qemu's size syntax, trailing
    blanks allowed.  Raises ValueError."""
    return parse_qemu_size(text.rstrip())


def parse_qemu_size(text: str) -> int:
    """A size as qemu-img reads one: decimal bytes (leading blanks allowed), or with a
    k/M/G/T/P/E suffix (powers of 1024, a fraction allowed: ``1.5G``), or 0x hex.
    Raises ValueError."""
    m = re.fullmatch(r"\s*(?:0[xX]([0-9a-fA-F]+)|(\d+)(?:\.(\d*))?)([bBkKmMgGtTpPeE]?)", text)
    if not m:
        raise ValueError(text)
    hexa, whole, frac, suffix = m.groups()
    mul = SUFFIXES[suffix.lower()]
    if hexa is not None:
        return int(hexa, 16) * mul
    value = int(whole) * mul
    if frac and int(frac):
        if mul == 1:
            raise ValueError(text)              # no fractional bytes
        value += int(frac) * mul // 10 ** len(frac)
    return value


def parse_number(text: str) -> int:
    """An unsigned 64-bit number as QEMU's option parser reads it (0x hex, 0 octal)."""
    t = text.lstrip()
    neg = t.startswith("-")
    if neg or t.startswith("+"):
        t = t[1:]
    if len(t) > 2 and t[:2].lower() == "0x":
        value = int(t[2:], 16)
    elif len(t) > 1 and t[0] == "0":
        value = int(t[1:], 8)
    else:
        if not t.isdigit():
            raise ValueError(text)
        value = int(t)
    if value >= 1 << 64:
        raise ValueError(text)
    return -value if neg else value


def split_options(text: str) -> List[str]:
    """``key=value,key=value`` with ",," standing for a comma inside a value."""
    items, cur, i = [], "", 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1:i + 2] == ",":
                cur += ","
                i += 2
                continue
            items.append(cur)
            cur = ""
        else:
            cur += text[i]
        i += 1
    items.append(cur)
    if any(not item for item in items):
        raise OptionError(f"Invalid option list: {text}")
    return items


def parse_options(texts: List[str], kinds: Dict[str, str], name: Optional[str] = None) -> dict:
    """-o lists into {option: (parsed value, text to print)}, later ones winning.
    ``kinds`` maps each accepted key to "size", "bool", "number" or "str"; errors are
    :class:`OptionError` with qemu-img's text (prefixed by ``name``: when given)."""
    at = f"{name}: " if name else ""
    out: dict = {}
    for text in texts:
        for item in split_options(text):
            key, eq, value = item.partition("=")
            if key.startswith("encrypt"):
                raise OptionError(f"{at}qcow2py does not create encrypted images")
            kind = kinds.get(key)
            if kind is None:
                raise OptionError(f"{at}Invalid parameter '{key}'")
            if kind == "bool":
                if not eq:
                    value = "on"
                if value not in BOOL_WORDS:
                    raise OptionError(f"{at}Parameter '{key}' expects 'on' or 'off'")
                out[key] = (BOOL_WORDS[value], value)
            elif kind == "size":
                try:
                    n = parse_qemu_size(value)
                    if n >= 1 << 64:
                        raise ValueError(value)
                except ValueError:
                    raise OptionError(f"{at}Parameter '{key}' expects a non-negative "
                                      f"number below 2^64") from None
                out[key] = (n, str(n))
            elif kind == "number":
                try:
                    n = parse_number(value)
                except ValueError:
                    raise OptionError(f"{at}Parameter '{key}' expects a number") from None
                signed = n - (1 << 64) if n >= 1 << 63 else n
                out[key] = (n, str(signed))
            else:
                out[key] = (value, value)
    return out
