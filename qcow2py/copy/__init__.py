"""``python -m qcow2py.copy``: kept so that command keeps working (see qcow2py.cli.copy)."""
