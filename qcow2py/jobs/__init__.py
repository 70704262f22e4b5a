"""Jobs: operations that move guest data between nodes (commit, rebase)."""
