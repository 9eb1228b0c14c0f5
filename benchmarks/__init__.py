"""Benchmarks (speed and registration quality against baselines); each module runs with ``python -m benchmarks.NAME``."""
