"""Benchmarks of avidfast against the reference implementation's formulation (`avidfast bench`)."""
