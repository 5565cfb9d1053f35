"""``impl="cuda"``: the compiled extension's fused cosine cross-entropy
(``nnk::cosine_cross_entropy_fwd`` / ``_bwd``, CUDA kernels on CUDA tensors
and their CPU twins on CPU tensors).

Per chunk of rows, one GEMM gives the raw products ``x_c @ W^T`` (fp32
output), one fused epilogue applies the norms, scale, margins and bias and
reduces each row to its log-sum-exp and loss. The forward computes no
gradient: it saves only its inputs and the (N,) lse, so a call without
backward (evaluation, ``no_grad``) costs one GEMM pass. The backward recomputes
each chunk's GEMM, turns the block into ``d cos`` in one fused epilogue, then
``d xn = dcos @ Wn`` and ``d Wn += dcos^T @ xn`` (fp32 accumulator) and the
normalization backward. Peak extra memory: one chunk of (rows x C) fp32 (+ a
16-bit copy for fp16/bf16 GEMMs), never N x C.

Gradients are bitwise reproducible whatever ``opts.deterministic`` says: the
column sums (d bias, d scale) go through per-band partials summed in a fixed
order, never float atomics. With fp16 inputs, ``d cos = d z * s * dpsi/dcos``
is rounded to fp16 for the GEMMs; it overflows only when the upstream gradient
exceeds ~65504 / (s * dpsi/dcos) (e.g. a large GradScaler scale), which
GradScaler sees as an inf step and backs off from.
"""
from __future__ import annotations

import torch

from .._options import CCEOptions
from ..ops.cce import bwd_options, fwd_options


class _ExtensionCCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, scale, bias, target, fwd_args, bwd_args):
        row, lse = torch.ops.nnk.cosine_cross_entropy_fwd(x, weight, target, scale, bias, *fwd_args)
        ctx.save_for_backward(x, weight, target, scale, bias, lse)
        ctx.bwd_args = bwd_args
        return row, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_row, g_lse):
        x, weight, target, scale, bias, lse = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[0], need[1], need[2], bias is not None and need[3]]
        dx, dw, ds, db = torch.ops.nnk.cosine_cross_entropy_bwd(
            g_row, g_lse, x, weight, target, scale, bias, lse, *ctx.bwd_args, mask)
        return (dx if mask[0] else None, dw if mask[1] else None, ds if mask[2] else None,
                db if mask[3] else None, None, None, None)


def cosine_cross_entropy_extension(x, weight, target, scale, bias, opts: CCEOptions,
                                   *, chunk_rows: int | None = None):
    """Backend entry (arguments already checked by nnk.functional).

    Args:
        x: (N, D) float16 / bfloat16 / float32 (float64 also runs: the tests use it).
        weight: (C, D), x's dtype.
        target: (N,) int64 in [0, C) or ``opts.ignore_index``.
        scale: Python float, or float32 (float64) tensor of shape () or (C,).
        bias: (C,) floating tensor or None.
        opts: the checked options.
        chunk_rows: rows per chunk; None sizes chunks to a 1 GiB budget.

    Returns:
        ``(row_loss, lse)``: (N,) float32 (float64 for float64 x), the loss of each
        row (0 on ignored rows) and its log-sum-exp, both differentiable.
    """
    if not isinstance(scale, torch.Tensor):
        scale = torch.tensor(float(scale), dtype=torch.float32, device=x.device)
    rows = int(chunk_rows or 0)
    return _ExtensionCCE.apply(x, weight, scale, bias, target,
                               fwd_options(opts, rows), bwd_options(opts, rows))
