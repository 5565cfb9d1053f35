"""A GPU's float32 ``tl.exp`` for the Triton interpreter.

On NVIDIA GPUs Triton lowers a float32 ``tl.exp(x)`` to ``ex2.approx.f32``
of the float32 product ``x * log2(e)`` (read in the PTX of nnk's kernels),
the same approximation as CUDA's ``__expf``, whose documented error is
2 + floor(|1.173 x|) ulp (CUDA C++ Programming Guide, intrinsic functions).
The interpreter calls numpy's exp, within half an ulp, so a kernel whose
accuracy rests on its exps passes on the CPU and fails on a GPU. Here the
argument is rounded as the GPU rounds it, and every result that is not an
exact power of two (ex2 of an integer) is taken 2^-23 high, one ulp above 1
and two just below it: on a confident row's target, p_t = 1 - 1e-6, that
is 10% of p_t - 1. tests/conftest.py gives it to every kernel of a CPU run;
the whole suite passes with it (checked at its introduction, 1158 tests).
"""
from __future__ import annotations

import numpy as np

_LOG2E = np.float32(1.4426950408889634)


def gpu_exp(a: np.ndarray) -> np.ndarray:
    if a.dtype != np.float32:
        return np.exp(a)
    t = (a * _LOG2E).astype(np.float32)
    r = np.exp2(t.astype(np.float64))
    return np.where(t == np.round(t), r, r * (1.0 + 2.0**-23)).astype(np.float32)


def emulate(monkeypatch) -> str | None:
    """Patch the interpreter's exp (undone with monkeypatch). Returns None,
    or why this triton's interpreter cannot be given a GPU's exp."""
    try:
        from triton.runtime import interpreter as ti

        builder = ti.InterpreterBuilder
        builder.create_exp  # noqa: B018
    except (ImportError, AttributeError) as e:
        return f"this triton's interpreter cannot be given a GPU's exp: {e}"
    monkeypatch.setattr(builder, "create_exp", lambda self, arg: self.unary_op(arg, gpu_exp))
    return None
