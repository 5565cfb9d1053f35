"""``nnk::row_normalize`` and its backward: fake kernels, autograd, and a
Python front that falls back to the reference when the extension is absent."""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD

from ..reference import acc_dtype, row_normalize_backward_ref, row_normalize_ref
from ._extension import has_extension, has_op
from .fake_checks import check_row_normalize, check_row_normalize_backward


def _setup_context(ctx, inputs, output):
    _, eps = inputs
    y, norm = output
    ctx.save_for_backward(y, norm)
    ctx.eps = eps


def _backward(ctx, grad_y, grad_norm):
    y, norm = ctx.saved_tensors
    if grad_y is None:
        grad_y = torch.zeros_like(y)
    # Grad mode is on here only under create_graph=True (a gradient penalty):
    # then the formula in differentiable torch ops, since the backward kernel
    # has no derivative of its own (it would silently give zeros).
    if torch.is_grad_enabled() or not has_op("row_normalize_backward", y.device.type):
        dx = row_normalize_backward_ref(grad_y, y, norm, ctx.eps)
    else:
        dx = torch.ops.nnk.row_normalize_backward(grad_y, y, norm, ctx.eps)
    if grad_norm is not None:
        # d||x||/dx = x / ||x|| = y * max(||x||, eps) / ||x|| (0 at x = 0).
        tiny = torch.finfo(norm.dtype).tiny
        factor = torch.where(norm > 0, norm.clamp_min(ctx.eps) / norm.clamp_min(tiny), 0.0)
        dx = dx + (grad_norm * factor)[:, None].to(y.dtype) * y
    return dx, None


class _RowNormalizeRef(torch.autograd.Function):
    """The reference forward without autograd inside (the float64 norm
    temporaries are not saved: only y and the norms, as the op saves) and the
    op's backward."""

    @staticmethod
    def forward(x, eps):
        return row_normalize_ref(x, eps)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)


if has_extension():

    @torch.library.register_fake("nnk::row_normalize")
    def _row_normalize_fake(x, eps):
        check_row_normalize(x, eps)
        return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(
            (x.shape[0],), dtype=acc_dtype(x.dtype)
        )

    @torch.library.register_fake("nnk::row_normalize_backward")
    def _row_normalize_backward_fake(grad_y, y, norm, eps):
        check_row_normalize_backward(grad_y, y, norm, eps)
        return torch.empty_like(y, memory_format=torch.contiguous_format)

    torch.library.register_autograd(
        "nnk::row_normalize", _backward, setup_context=_setup_context
    )


def row_normalize(x: torch.Tensor, eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """Row L2-normalization with its norms.

    Args:
        x: (N, D) float16 / bfloat16 / float32 / float64.
        eps: lower bound on the norm, as ``F.normalize``.

    Returns:
        ``(y, norm)``: y (N, D) in x's dtype equal to ``F.normalize(x, dim=1, eps=eps)``
        (computed in float32, float64 for float64), and norm (N,) the row norms
        ``x.norm(dim=1)`` in float32 (float64 for float64 input).
    """
    if _needs_torch_autograd(x):
        return row_normalize_ref(x, eps)
    if has_op("row_normalize", x.device.type):
        return torch.ops.nnk.row_normalize(x, eps)
    return _RowNormalizeRef.apply(x, eps)


def _needs_torch_autograd(x: torch.Tensor) -> bool:
    """Whether a torch.func transform is running or x carries a forward-mode
    tangent: the op's autograd (and _RowNormalizeRef's) has a backward only,
    so torch.func.grad / vmap raised PyTorch's request for a setup_context and
    torch.func.jvp / forward_ad gave a zero or missing tangent, silently,
    through CosineLinear's forward. The reference's torch ops support both.
    torch.compile traces the op (and its own transforms) as it is."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._are_functorch_transforms_active() or fwAD.unpack_dual(x).tangent is not None


def row_normalize_backward(
    grad_y: torch.Tensor, y: torch.Tensor, norm: torch.Tensor, eps: float = 1e-12
) -> torch.Tensor:
    """Gradient of :func:`row_normalize`'s y with respect to x:
    ``(g - y <y, g>) / ||x||`` row-wise where ``||x|| > eps``, else ``g / eps``
    (the rows F.normalize divides by eps).

    Args:
        grad_y: (N, D) float16 / bfloat16 / float32 / float64, the gradient of y.
        y: (N, D), :func:`row_normalize`'s y (any of those dtypes).
        norm: (N,) its norm, float32 (float64 for float64 y).
        eps: the ``eps`` of the forward.

    Returns:
        (N, D) in y's dtype (computed in float32, float64 for float64 y).
    """
    if has_op("row_normalize_backward", y.device.type):
        return torch.ops.nnk.row_normalize_backward(grad_y, y, norm, eps)
    return row_normalize_backward_ref(grad_y, y, norm, eps)
