"""Benchmarks of nnk against PyTorch, its peers and the GEMM bound.

``python -m bench --help``; see bench/README.md. Nothing here is imported by
nnk itself, and nothing here asserts a figure: the harness measures what the
running machine has and reports what it could not measure.
"""
