"""Benchmarks (see bench/README.md); scripts run as `python bench/<script>.py` from the repository root."""
