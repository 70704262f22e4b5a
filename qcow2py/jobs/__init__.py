"""Jobs: operations that move guest data between nodes (backup with fleecing, commit, rebase)."""
