"""Benchmarks of cacheship against raw baselines (run with ``python -m bench``; not tests)."""
