"""Benchmarks: each module's `main()` returns a dict of figures measured in one run (ratios against a baseline
measured in the same run); `python benchmarks/run.py` runs them all and writes benchmarks/RESULTS.md."""
