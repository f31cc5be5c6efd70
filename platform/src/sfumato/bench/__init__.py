"""Benchmarks: each runs the project and a baseline on the same machine in one run."""
