"""``nnk::cosine_cross_entropy_fwd`` / ``_bwd``: fake kernels (so that
torch.compile traces them) and the argument tuples the backend builds.

The autograd formula is not registered on the op: the backend
``nnk.impl.extension`` wraps the pair in a torch.autograd.Function.
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
    """The scalar arguments of ``cosine_cross_entropy_bwd`` after ``lse``
    (``output_mask`` excluded)."""
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
        return x.new_empty((n,), dtype=acc), x.new_empty((n,), dtype=acc)

    @torch.library.register_fake("nnk::cosine_cross_entropy_bwd")
    def _cce_bwd_fake(grad_loss, grad_lse, x, weight, target, scale, bias, lse, normalize_input,
                      normalize_weight, additive_margin, angular_margin, exact_margin, ignore_index,
                      label_smoothing, z_loss, eps, chunk_rows, output_mask):
        def grad_like(t, on):
            if on and t is not None:
                return torch.empty_like(t, memory_format=torch.contiguous_format)
            return (t if t is not None else x).new_empty((0,))

        return (grad_like(x, output_mask[0]), grad_like(weight, output_mask[1]),
                grad_like(scale, output_mask[2]), grad_like(bias, output_mask[3]))
