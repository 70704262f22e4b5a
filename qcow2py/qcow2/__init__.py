"""The qcow2 driver (the only code that knows the on-disk layout beyond format/)."""
