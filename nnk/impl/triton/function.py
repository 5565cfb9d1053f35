"""The autograd.Function over the Triton kernels and the backend entry that
``nnk.functional`` dispatches ``impl="triton"`` to."""
from __future__ import annotations

import torch

from ..._options import CCEOptions
from .. import first_order
from . import configs
from .backward import cce_backward
from .forward import cce_forward
from .launch import on_device


def _scale_buffer(scale, device: torch.device) -> torch.Tensor:
    """The scale as the kernels read it: (1,) or (C,) float32, contiguous."""
    if isinstance(scale, torch.Tensor):
        return scale.detach().to(torch.float32).reshape(-1).contiguous()
    return torch.full((1,), float(scale), dtype=torch.float32, device=device)


class _TritonCCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, scale, bias, target, opts: CCEOptions, tuning: dict):
        s = _scale_buffer(scale, x.device)
        b = bias.detach().to(torch.float32).contiguous() if bias is not None else None
        with on_device(x):
            fwd = cce_forward(x, weight, target, s, b, opts, class_splits=tuning.get("class_splits"))
        ctx.save_for_backward(x, weight, target, s, b, fwd.cos_t, fwd.lse, fwd.lse_lo, fwd.xnorm, fwd.wnorm)
        ctx.opts, ctx.tuning = opts, tuning
        ctx.scale_meta = (scale.dtype, scale.shape) if isinstance(scale, torch.Tensor) else None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return fwd.row, fwd.lse

    @staticmethod
    @first_order
    def backward(ctx, g_row, g_lse):
        x, weight, target, s, b, cos_t, lse, lse_lo, xnorm, wnorm = ctx.saved_tensors
        need_dx, need_dw, need_ds, need_db = ctx.needs_input_grad[:4]
        with on_device(x):
            grads = cce_backward(
                x, weight, target, s, b, lse, lse_lo, cos_t, xnorm, wnorm, g_row, g_lse, ctx.opts,
                need_dx=need_dx, need_dw=need_dw, need_ds=need_ds, need_db=need_db, **ctx.tuning,
            )
        ds = None
        if grads.ds is not None:
            dtype, shape = ctx.scale_meta
            ds = (grads.ds if len(shape) == 1 else grads.ds.sum()).to(dtype).reshape(shape)
        db = grads.db.to(ctx.bias_dtype) if grads.db is not None else None
        return grads.dx, grads.dw, ds, db, None, None, None


def cosine_cross_entropy_triton(x, weight, target, scale, bias, opts: CCEOptions, *,
                                class_splits: int | None = None, row_splits: int | None = None,
                                class_chunk: int | None = None, grad_filter: float | None = None):
    """Backend entry of ``nnk.cosine_cross_entropy(..., impl="triton")``
    (arguments already checked by ``nnk._options.check_tensors``).

    Args:
        x: (N, D) float16 / bfloat16 / float32, any strides, on a CUDA device
            (or the CPU under TRITON_INTERPRET=1).
        weight: (C, D) in x's dtype.
        target: (N,) int64 in [0, C) or ``opts.ignore_index``.
        scale: a Python float, or a float32/float64 tensor of shape () or (C,)
            (may require grad).
        bias: (C,) floating tensor or None.
        opts: the checked options (``opts.deterministic``: bitwise-reproducible
            gradients, class-ordered instead of atomic accumulation).
        class_splits, row_splits, class_chunk: work-splitting overrides (tests,
            benchmarks); the defaults come from ``configs``.
        grad_filter: tolerance of the opt-in sparse backward (0: exact), default
            from NNK_TRITON_GRAD_FILTER as set when the forward runs.

    Returns:
        ``(row_loss, lse)``: (N,) float32 each, both differentiable; row_loss
        is 0 on ignored rows. Replaces the per-row loss and log-sum-exp of
        ``nnk.reference.cosine_cross_entropy_ref`` (see the backend contract).
    """
    tuning = dict(class_splits=class_splits, row_splits=row_splits, class_chunk=class_chunk,
                  grad_filter=configs.grad_filter() if grad_filter is None else grad_filter)
    return _TritonCCE.apply(x, weight, scale, bias, target, opts, tuning)
