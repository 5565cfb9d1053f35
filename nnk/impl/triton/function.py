"""The autograd.Function over the Triton kernels and the backend entry that
``nnk.functional`` dispatches ``impl="triton"`` to."""
from __future__ import annotations

import torch

from ..._options import CCEOptions, env_chunk_bytes
from ..._dispatch import cublas_accumulates_in_fp16
from ...ops import cce as ext_cce
from ...ops import has_op
from .. import fused_backward
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
        if tuning["gemm_backward"]:
            if not has_op("cosine_cross_entropy_bwd", x.device.type):
                raise ValueError("NNK_TRITON_GEMM_BACKWARD=1 needs the compiled extension's "
                                 f"nnk::cosine_cross_entropy_bwd for {x.device.type} tensors (nnk._C)")
            # Its float16 GEMMs, as impl="cuda"'s (nnk.functional.resolve_impl).
            if cublas_accumulates_in_fp16("cosine_cross_entropy_fwd", x.device, x.dtype):
                raise ValueError("NNK_TRITON_GEMM_BACKWARD=1: the extension's float16 GEMMs cannot run under "
                                 "torch.backends.cuda.matmul.allow_fp16_accumulation = True")
        with on_device(x):
            fwd = cce_forward(x, weight, target, s, b, opts, class_splits=tuning.get("class_splits"))
        ctx.save_for_backward(x, weight, target, s, b, fwd.cos_t, fwd.sin_t, fwd.lse, fwd.lse_lo, fwd.xnorm, fwd.wnorm)
        ctx.opts, ctx.tuning = opts, tuning
        ctx.scale_meta = (scale.dtype, scale.shape) if isinstance(scale, torch.Tensor) else None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return fwd.row, fwd.lse

    @staticmethod
    @fused_backward
    def backward(ctx, g_row, g_lse):
        x, weight, target, s, b, cos_t, sin_t, lse, lse_lo, xnorm, wnorm = ctx.saved_tensors
        need = ctx.needs_input_grad[:4]
        tuning = dict(ctx.tuning)
        chunk_bytes = tuning.pop("chunk_bytes")
        if tuning.pop("gemm_backward"):
            # The forward's lse and lse_lo are the op's own contract: its
            # recomputed logits differ from the Triton tiles' by rounding only.
            s_op = s.reshape(()) if s.numel() == 1 else s
            dx, dw, ds, db = ext_cce.cce_backward(g_row, g_lse, x, weight, target, s_op, b, lse, lse_lo,
                                                  ext_cce.bwd_options(ctx.opts, chunk_bytes=chunk_bytes), need)
        else:
            with on_device(x):
                grads = cce_backward(
                    x, weight, target, s, b, lse, lse_lo, cos_t, sin_t, xnorm, wnorm, g_row, g_lse, ctx.opts,
                    need_dx=need[0], need_dw=need[1], need_ds=need[2], need_db=need[3], **tuning,
                )
            dx, dw, ds, db = grads.dx, grads.dw, grads.ds, grads.db
        if ds is not None:
            dtype, shape = ctx.scale_meta
            ds = (ds if len(shape) == 1 and ds.dim() == 1 else ds.sum()).to(dtype).reshape(shape)
        db = db.to(ctx.bias_dtype) if db is not None else None
        return dx, dw, ds, db, None, None, None


@torch.compiler.disable
def _apply_interpreted(*args):
    """``_TritonCCE.apply`` run eagerly: on CPU tensors the kernels run in
    triton's interpreter, which torch.compile cannot trace (Dynamo failed
    inside it with an internal AttributeError); this is a graph break instead
    (an error under ``fullgraph=True``)."""
    return _TritonCCE.apply(*args)


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
            NNK_TRITON_GEMM_BACKWARD=1 (also read then) takes the extension's
            chunked-GEMM backward instead (configs.gemm_backward), which has
            no filter, with the block budget NNK_CHUNK_MB sets then.

    Returns:
        ``(row_loss, lse)``: (N,) float32 each, both differentiable; row_loss
        is 0 on ignored rows. Replaces the per-row loss and log-sum-exp of
        ``nnk.reference.cosine_cross_entropy_ref`` (see the backend contract).
    """
    gemm_backward = configs.gemm_backward()
    tuning = dict(class_splits=class_splits, row_splits=row_splits, class_chunk=class_chunk,
                  grad_filter=configs.grad_filter() if grad_filter is None else grad_filter,
                  gemm_backward=gemm_backward, chunk_bytes=env_chunk_bytes() if gemm_backward else 0)
    apply = _TritonCCE.apply if x.device.type == "cuda" else _apply_interpreted
    return apply(x, weight, scale, bias, target, opts, tuning)
