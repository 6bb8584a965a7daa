"""Procedural scenes with known ground truth, for the demo, tests, benchmarks and training data."""
