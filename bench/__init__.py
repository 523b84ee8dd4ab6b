"""Benchmarks: each script measures qusd against its baseline, alternately,
in one run, and prints medians and ratios (`make bench` runs them all;
bench/RESULTS.md keeps the figures). Run one with `python -m bench.NAME`."""
