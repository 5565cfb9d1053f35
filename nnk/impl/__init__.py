"""The backends of ``nnk.cosine_cross_entropy``: torch_blockwise (pure
PyTorch), triton, extension (the compiled ops)."""
from __future__ import annotations

import functools

import torch


def fused_backward(backward):
    """The decorator of the fused ops' backward methods.

    - Autocast off, as the forward ran (``_dispatch.autocast_operands``): a
      backward runs under the autocast state of the code that calls
      ``.backward()``, often still inside the ``torch.autocast`` block, where
      the float32 gradient GEMMs would be cast to 16 bits.
    - ``once_differentiable``, plus a clear error where a higher-order
      gradient is asked for (``create_graph=True``, e.g. a gradient penalty).
      ``once_differentiable`` alone only raises when an upstream gradient
      requires grad; otherwise the gradients would come back silently
      detached and the penalty's own gradient would be dropped."""
    inner = torch.autograd.function.once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "nnk.cosine_cross_entropy is differentiable once: its gradient has no graph "
                "(create_graph=True / double backward is not supported). For gradient penalties "
                "use nnk.reference.cosine_cross_entropy_ref, which materializes the logits.")
        dev = next(g.device.type for g in grads if isinstance(g, torch.Tensor))
        # (meta tensors, of the ops called directly, have no autocast state;
        # torch.amp.is_autocast_available is not traceable in torch 2.11.)
        if dev == "meta" or not torch.is_autocast_enabled(dev):
            return inner(ctx, *grads)
        with torch.autocast(dev, enabled=False):
            return inner(ctx, *grads)

    return wrapper
