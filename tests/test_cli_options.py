"""cli/options.py is the one size and -o parser: qcow2py create and qcow2py-copy agree."""

import pytest

from qcow2py.cli.copy import parse_create_options
from qcow2py.cli.options import OptionError, parse_options, parse_qemu_size, parse_size
from qcow2py.opener import CreateError


def test_sizes_hex_suffix_fraction():
    assert parse_qemu_size("0x10") == 16
    assert parse_qemu_size("0x10k") == 16 << 10
    assert parse_qemu_size("1.5G") == 3 << 29
    assert parse_size("64k ") == 65536
    for bad in ("1.5", "k", "-1", "1 k"):
        with pytest.raises(ValueError):
            parse_qemu_size(bad)


def test_copy_and_create_read_options_alike():
    text = "cluster_size=0x1000,lazy_refcounts=y,extended_l2=n,data_file=a,,b,refcount_bits=0x10"
    opts = parse_create_options(text)
    assert opts == {"cluster_size": 4096, "lazy_refcounts": True, "extended_l2": False,
                    "data_file": "a,b", "refcount_bits": 16}
    parsed = parse_options([text], {"cluster_size": "size", "lazy_refcounts": "bool",
                                    "extended_l2": "bool", "data_file": "str",
                                    "refcount_bits": "number"}, "x.qcow2")
    assert {k: v for k, (v, _) in parsed.items()} == opts


def test_option_errors():
    with pytest.raises(CreateError, match="Invalid parameter 'bogus'"):
        parse_create_options("bogus=1")
    with pytest.raises(CreateError, match="expects 'on' or 'off'"):
        parse_create_options("lazy_refcounts=maybe")
    with pytest.raises(OptionError, match="Invalid option list"):
        parse_options(["a=1,,,"], {"a": "str"})
    with pytest.raises(OptionError, match="^t.qcow2: Parameter 'cluster_size'"):
        parse_options(["cluster_size=x"], {"cluster_size": "size"}, "t.qcow2")
