"""Benchmarks: `bench/run` prints the table in BENCHMARKS.md; the scripts here print details."""
