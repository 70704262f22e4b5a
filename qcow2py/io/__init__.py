"""Host files: storage (pread/pwrite/...), its wrappers, QEMU's locks."""
