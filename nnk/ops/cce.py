"""``nnk::cosine_cross_entropy_fwd`` / ``_bwd`` / ``_fwd_bwd``: fake kernels
(so that torch.compile traces them), the argument tuples the backend builds,
and the derivative of ``_fwd`` (through ``_bwd``, with the exact margin
derivative) for callers of the op itself. ``_bwd`` and ``_fwd_bwd`` are not
differentiable (csrc/schema.cpp). The backend ``nnk.impl.extension`` wraps
the ops in torch.autograd.Functions of its own, which also offer the
detached margin gradient and the gradients computed in the forward.
"""
from __future__ import annotations

import torch

from .._options import CCEOptions
from ..impl import fused_backward
from ..reference import acc_dtype
from ._extension import has_extension
from .fake_checks import check_cce_inputs, check_output_mask, check_row_vector


def fwd_options(opts: CCEOptions, chunk_rows: int = 0, chunk_classes: int = 0, chunk_bytes: int = 0) -> tuple:
    """The scalar arguments of ``cosine_cross_entropy_fwd`` after ``bias``
    (block sizes 0: from a budget of chunk_bytes, 0: the extension's default)."""
    return (opts.normalize_input, opts.normalize_weight, opts.additive_margin, opts.angular_margin,
            opts.ignore_index, opts.label_smoothing, opts.z_loss, opts.eps, chunk_rows, chunk_classes,
            chunk_bytes)


def bwd_options(opts: CCEOptions, chunk_rows: int = 0, chunk_classes: int = 0, chunk_bytes: int = 0) -> tuple:
    """The scalar arguments of ``cosine_cross_entropy_bwd`` after ``lse_lo``, and
    of ``cosine_cross_entropy_fwd_bwd`` after ``grad_loss`` (``output_mask``
    excluded)."""
    return (opts.normalize_input, opts.normalize_weight, opts.additive_margin, opts.angular_margin,
            opts.exact_margin, opts.ignore_index, opts.label_smoothing, opts.z_loss, opts.eps,
            chunk_rows, chunk_classes, chunk_bytes)


def cce_backward(g_row, g_lse, x, weight, target, scale, bias, lse, lse_lo, bwd_args: tuple, needs) -> tuple:
    """``(dx, dweight, dscale, dbias)`` of the forward's row losses and lse
    from ``nnk::cosine_cross_entropy_bwd``; None for an input that ``needs``
    (4 flags in that order) leaves out or that is None."""
    mask = [bool(needs[0]), bool(needs[1]), bool(needs[2]), bias is not None and bool(needs[3])]
    grads = torch.ops.nnk.cosine_cross_entropy_bwd(
        g_row, g_lse, x, weight, target, scale, bias, lse, lse_lo, *bwd_args, mask)
    return tuple(g if on else None for g, on in zip(grads, mask))


if has_extension():

    @torch.library.register_fake("nnk::cosine_cross_entropy_fwd")
    def _cce_fwd_fake(x, weight, target, scale, bias, normalize_input, normalize_weight,
                      additive_margin, angular_margin, ignore_index, label_smoothing, z_loss, eps,
                      chunk_rows, chunk_classes, chunk_bytes):
        check_cce_inputs("cosine_cross_entropy_fwd", x, weight, target, scale, bias,
                         normalize_input=normalize_input, normalize_weight=normalize_weight,
                         additive_margin=additive_margin, angular_margin=angular_margin,
                         label_smoothing=label_smoothing, z_loss=z_loss, eps=eps,
                         chunks=(chunk_rows, chunk_classes, chunk_bytes))
        n = x.shape[0]
        acc = acc_dtype(x.dtype)
        return tuple(x.new_empty((n,), dtype=acc) for _ in range(3))  # loss, lse, lse_lo

    def _fwd_setup_context(ctx, inputs, output):
        (x, weight, target, scale, bias, norm_x, norm_w, additive, angular, ignore, ls, zl, eps, rows, classes,
         budget) = inputs
        _, lse, lse_lo = output
        ctx.save_for_backward(x, weight, target, scale, bias, lse, lse_lo)
        ctx.mark_non_differentiable(lse_lo)
        ctx.bwd_args = (norm_x, norm_w, additive, angular, True, ignore, ls, zl, eps, rows, classes, budget)

    @fused_backward
    def _fwd_backward(ctx, g_row, g_lse, _g_lse_lo):
        need = ctx.needs_input_grad
        dx, dw, ds, db = cce_backward(g_row, g_lse, *ctx.saved_tensors, ctx.bwd_args,
                                      (need[0], need[1], need[3], need[4]))
        return (dx, dw, None, ds, db) + (None,) * 11

    torch.library.register_autograd("nnk::cosine_cross_entropy_fwd", _fwd_backward,
                                    setup_context=_fwd_setup_context)

    def _grad_like(t, x, on):
        """A gradient of t (shape and dtype of t, contiguous), or the empty
        (0,) tensor the ops return for one that output_mask leaves out."""
        if on and t is not None:
            return torch.empty_like(t, memory_format=torch.contiguous_format)
        return (t if t is not None else x).new_empty((0,))

    @torch.library.register_fake("nnk::cosine_cross_entropy_bwd")
    def _cce_bwd_fake(grad_loss, grad_lse, x, weight, target, scale, bias, lse, lse_lo, normalize_input,
                      normalize_weight, additive_margin, angular_margin, exact_margin, ignore_index,
                      label_smoothing, z_loss, eps, chunk_rows, chunk_classes, chunk_bytes, output_mask):
        op = "cosine_cross_entropy_bwd"
        check_cce_inputs(op, x, weight, target, scale, bias, normalize_input=normalize_input,
                         normalize_weight=normalize_weight, additive_margin=additive_margin,
                         angular_margin=angular_margin, label_smoothing=label_smoothing, z_loss=z_loss, eps=eps,
                         chunks=(chunk_rows, chunk_classes, chunk_bytes))
        for name, v in (("lse", lse), ("lse_lo", lse_lo), ("grad_loss", grad_loss), ("grad_lse", grad_lse)):
            if v is not None:
                check_row_vector(op, name, v, x)
        check_output_mask(op, output_mask, bias)
        return tuple(_grad_like(t, x, on) for t, on in zip((x, weight, scale, bias), output_mask))

    @torch.library.register_fake("nnk::cosine_cross_entropy_fwd_bwd")
    def _cce_fwd_bwd_fake(x, weight, target, scale, bias, grad_loss, normalize_input,
                          normalize_weight, additive_margin, angular_margin, exact_margin,
                          ignore_index, label_smoothing, z_loss, eps, chunk_rows, chunk_classes,
                          chunk_bytes, output_mask):
        op = "cosine_cross_entropy_fwd_bwd"
        check_cce_inputs(op, x, weight, target, scale, bias, normalize_input=normalize_input,
                         normalize_weight=normalize_weight, additive_margin=additive_margin,
                         angular_margin=angular_margin, label_smoothing=label_smoothing, z_loss=z_loss, eps=eps,
                         chunks=(chunk_rows, chunk_classes, chunk_bytes))
        check_row_vector(op, "grad_loss", grad_loss, x)
        check_output_mask(op, output_mask, bias)
        # cce_driver.h chunk_loop: the CUDA kernels' float16 GEMMs.
        torch._check(not (x.device.type == "cuda" and x.dtype == torch.float16 and any(output_mask)),
                     lambda: f"nnk::{op}: float16 gradients on this device are the backward op's "
                             "(nnk::cosine_cross_entropy_bwd), which scales them against underflow")
        loss, lse = (x.new_empty((x.shape[0],), dtype=acc_dtype(x.dtype)) for _ in range(2))
        grads = tuple(_grad_like(t, x, on) for t, on in zip((x, weight, scale, bias), output_mask))
        return (loss, lse, *grads)
