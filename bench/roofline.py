"""FLOP counts of the benchmarked ops, for TFLOP/s and the GEMM bound.

Cosine cross-entropy on (N, D) x (C, D): the forward is one N x C x D GEMM
(2 N C D FLOPs), the backward two (``dlogits @ W`` and ``dlogitsᵀ @ x``, 4 N C D),
forward + backward 6 N C D. These are the model FLOPs: a kernel that recomputes
the logits in its backward (nnk does, to avoid storing them) executes 2 N C D
more, which shows as a lower TFLOP/s, not as a different count. Normalization,
softmax and margins are O((N + C) D + N C) and not counted.

NC statistics of (N, D) features: the D x D Gram, 2 N D² FLOPs (the full
product, as one cuBLAS ``Hᵀ H`` computes it).
"""
from __future__ import annotations

from .shapes import CE_OP, NC_OP, Case

MODES = ("fwdbwd", "fwd", "bwd")   # the order they run and are reported in
NC_MODES = ("fwd",)
_CE_GEMMS = {"fwd": 1, "bwd": 2, "fwdbwd": 3}


def flops(case: Case, mode: str) -> float:
    if case.op == CE_OP:
        return 2.0 * case.N * case.C * case.D * _CE_GEMMS[mode]
    if case.op == NC_OP:
        return 2.0 * case.N * case.D * case.D
    raise ValueError(f"unknown op {case.op!r}")


def tflops(case: Case, mode: str, ms: float) -> float:
    return flops(case, mode) / (ms * 1e-3) / 1e12


def logits_mb(n: int, c: int) -> float:
    """Size of the N x C float32 logits (what a fused kernel avoids), MiB."""
    return n * c * 4 / 2.0 ** 20


def grads_mb(n: int, c: int, d: int, dtype: str, mode: str) -> float:
    """Size of the gradients of x and W, (N + C) D in the input dtype, MiB: what
    a step with a backward (or a forward that computes them) returns, and
    counts in its peak. The memory target (a peak below 5% of the fp32
    logits) is on the peak beyond them; 0 for a forward alone."""
    if mode == "fwd":
        return 0.0
    itemsize = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}[dtype]
    return (n + c) * d * itemsize / 2.0 ** 20
