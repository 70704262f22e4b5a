"""Jobs that run over nodes: backup (fleecing, push)."""
