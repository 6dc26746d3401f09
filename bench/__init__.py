"""Benchmarks. Results from real runs live in bench/results/ as JSON."""
