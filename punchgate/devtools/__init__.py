"""Helpers for the demo, benchmarks and tests: running punchgate processes and echo servers."""
