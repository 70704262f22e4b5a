"""Jobs that move guest data between nodes: block-copy (later backup, commit)."""
