"""Block-copy: plan a copy from metadata, read in host order, write the target."""
