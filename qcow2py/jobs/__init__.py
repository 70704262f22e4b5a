"""Jobs that move guest data between nodes: block-copy, backup (fleecing, push), commit, rebase, compare, measure."""
