"""Cluster-path integration tests: `ray job submit`, s3:// roots, and faults, all through the real CLI."""
