"""``nnk::cosine_cross_entropy_fwd`` / ``_bwd`` / ``_fwd_bwd``: fake kernels
(so that torch.compile traces them) and the argument tuples the backend builds.

The autograd formula is not registered on the ops: the backend
``nnk.impl.extension`` wraps them in torch.autograd.Functions.
"""
from __future__ import annotations

import torch

from .._options import CCEOptions
from ._extension import has_op


def fwd_options(opts: CCEOptions, chunk_rows: int) -> tuple:
    """The scalar arguments of ``cosine_cross_entropy_fwd`` after ``bias``."""
    return (opts.normalize_input, opts.normalize_weight, opts.additive_margin, opts.angular_margin,
            opts.ignore_index, opts.label_smoothing, opts.z_loss, opts.eps, chunk_rows)


def bwd_options(opts: CCEOptions, chunk_rows: int) -> tuple:
    """The scalar arguments of ``cosine_cross_entropy_bwd`` after ``lse_lo``, and
    of ``cosine_cross_entropy_fwd_bwd`` after ``grad_loss`` (``output_mask``
    excluded)."""
    return (opts.normalize_input, opts.normalize_weight, opts.additive_margin, opts.angular_margin,
            opts.exact_margin, opts.ignore_index, opts.label_smoothing, opts.z_loss, opts.eps,
            chunk_rows)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# Only ops this build registered: an older nnk._C must not break `import nnk`.
if has_op("cosine_cross_entropy_fwd", "cpu") and has_op("cosine_cross_entropy_bwd", "cpu"):

    @torch.library.register_fake("nnk::cosine_cross_entropy_fwd")
    def _cce_fwd_fake(x, weight, target, scale, bias, normalize_input, normalize_weight,
                      additive_margin, angular_margin, ignore_index, label_smoothing, z_loss, eps,
                      chunk_rows):
        torch._check(x.dim() == 2 and weight.dim() == 2, lambda: "x and weight must be 2-D")
        torch._check(weight.shape[1] == x.shape[1], lambda: "weight and x must have the same D")
        n = x.shape[0]
        acc = _acc(x.dtype)
        return tuple(x.new_empty((n,), dtype=acc) for _ in range(3))  # loss, lse, lse_lo

    def _grad_like(t, x, on):
        """A gradient of t (shape and dtype of t, contiguous), or the empty
        (0,) tensor the ops return for one that output_mask leaves out."""
        if on and t is not None:
            return torch.empty_like(t, memory_format=torch.contiguous_format)
        return (t if t is not None else x).new_empty((0,))

    @torch.library.register_fake("nnk::cosine_cross_entropy_bwd")
    def _cce_bwd_fake(grad_loss, grad_lse, x, weight, target, scale, bias, lse, lse_lo, normalize_input,
                      normalize_weight, additive_margin, angular_margin, exact_margin, ignore_index,
                      label_smoothing, z_loss, eps, chunk_rows, output_mask):
        return tuple(_grad_like(t, x, on) for t, on in zip((x, weight, scale, bias), output_mask))

    # Builds older than the fused training op lack it.
    if has_op("cosine_cross_entropy_fwd_bwd", "cpu"):

        @torch.library.register_fake("nnk::cosine_cross_entropy_fwd_bwd")
        def _cce_fwd_bwd_fake(x, weight, target, scale, bias, grad_loss, normalize_input,
                              normalize_weight, additive_margin, angular_margin, exact_margin,
                              ignore_index, label_smoothing, z_loss, eps, chunk_rows, output_mask):
            loss, lse, _lse_lo = _cce_fwd_fake(x, weight, target, scale, bias, normalize_input, normalize_weight,
                                      additive_margin, angular_margin, ignore_index, label_smoothing,
                                      z_loss, eps, chunk_rows)
            grads = tuple(_grad_like(t, x, on) for t, on in zip((x, weight, scale, bias), output_mask))
            return (loss, lse, *grads)
