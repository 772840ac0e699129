"""Benchmarks on one harness (tools/bench/harness.py); see README.md."""
