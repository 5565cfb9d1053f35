"""Collectives of torch.distributed with the gradients class parallelism needs.

The class-parallel loss is *replicated*: after the forward every rank holds the
same loss value and calls ``backward()`` on it with the same upstream gradient
(Megatron-LM's tensor-parallel convention). Under that convention:

- a sum over ranks (:func:`sum_over_group`) needs no communication in the
  backward: rank r's contribution a_r enters ``y = sum_r a_r`` with
  ``dy/da_r = 1``, and every rank already holds ``dL/dy``;
- an input that every rank holds identically (:func:`replicated`) gets from
  each rank only the part of its gradient that flows through that rank's
  shard, so its backward sums the ranks' parts (an all-reduce);
- rows gathered from the ranks (:func:`gather_rows`) are the same, row block
  by row block: the backward sums the parts and hands each rank its own
  block (a reduce-scatter).

``torch.distributed.nn.functional.all_reduce`` follows the other convention
(each rank's loss is a different term of a global sum) and would return
world-size times the gradient here.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

# torch >= 2.14 renamed the single-tensor collectives; older releases only
# have the *_into_tensor / *_tensor names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_reduce_max(t: torch.Tensor, group=None) -> torch.Tensor:
    """Element-wise max over the ranks of ``group`` (a new tensor, no autograd)."""
    out = t.detach().clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
    return out


class _SumOverGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, group):
        out = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def sum_over_group(t: torch.Tensor, group=None) -> torch.Tensor:
    """``sum_r t_r`` over the ranks of ``group``; differentiable, with the identity
    as backward (the result feeds a loss every rank backpropagates identically)."""
    return _SumOverGroup.apply(t, group)


def _summable(grad: torch.Tensor) -> torch.Tensor:
    # A contiguous copy to reduce into, float32 for 16-bit gradients. Each
    # rank's part is already rounded to its dtype by the backend; a float32
    # sum adds one rounding at the end rather than one per partial sum
    # (log2(W) to W - 1 of them in bfloat16, by the reduction algorithm).
    acc = torch.float32 if grad.dtype in (torch.float16, torch.bfloat16) else grad.dtype
    return grad.to(dtype=acc, memory_format=torch.contiguous_format, copy=True)


class _Replicated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        total = _summable(grad)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        return total.to(grad.dtype), None


def replicated(t: torch.Tensor, group=None) -> torch.Tensor:
    """``t`` unchanged; its gradient becomes the sum over the ranks of ``group``
    of their gradients. For tensors every rank holds identically (the batch of
    the functional loss, a shared learnable scale)."""
    return _Replicated.apply(t, group)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, sizes, group, grad_scale):
        ctx.sizes, ctx.group, ctx.grad_scale = sizes, group, grad_scale
        return _gather(t, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        sizes, rank = ctx.sizes, dist.get_rank(ctx.group)
        width, rest = max(sizes), grad.shape[1:]
        dtype, grad = grad.dtype, _summable(grad)
        if min(sizes) != width:
            padded = grad.new_zeros((len(sizes), width) + rest)
            for r, block in enumerate(grad.split(sizes)):
                padded[r, : sizes[r]] = block
            grad = padded.view((len(sizes) * width,) + rest)
        mine = grad.new_empty((width,) + rest)
        _reduce_scatter_single(mine, grad, op=dist.ReduceOp.SUM, group=ctx.group)
        mine = mine[: sizes[rank]]
        if ctx.grad_scale != 1.0:
            mine = mine * ctx.grad_scale
        return mine.to(dtype), None, None, None


def _gather(t: torch.Tensor, sizes: Sequence[int], group) -> torch.Tensor:
    # Gloo and NCCL gather equal blocks: pad every rank's rows to the largest.
    width, rest = max(sizes), t.shape[1:]
    block = t.contiguous()
    if block.shape[0] != width:
        block = torch.cat([block, block.new_zeros((width - block.shape[0],) + rest)])
    out = block.new_empty((len(sizes) * width,) + rest)
    _all_gather_single(out, block, group=group)
    if min(sizes) == width:
        return out
    out = out.view((len(sizes), width) + rest)
    return torch.cat([out[r, : sizes[r]] for r in range(len(sizes))])


def gather_rows(t: torch.Tensor, sizes: Sequence[int], group=None, grad_scale: float = 1.0) -> torch.Tensor:
    """Concatenate the ranks' ``t`` along dim 0 (rank order), every rank getting all.

    ``sizes[r]`` is the number of rows rank r contributes (they may differ).
    Differentiable: the backward sums the ranks' gradients of the gathered rows
    and returns to each rank the block of its own rows (a reduce-scatter),
    times ``grad_scale`` (the group size cancels DDP's gradient averaging).
    Integer tensors are gathered without autograd."""
    sizes = [int(n) for n in sizes]
    if not (t.is_floating_point() and torch.is_grad_enabled() and t.requires_grad):
        return _gather(t.detach(), sizes, group)
    return _GatherRows.apply(t, sizes, group, float(grad_scale))


def exchange_rows(t: torch.Tensor, sizes: Sequence[int], group=None) -> torch.Tensor:
    """The inverse pattern of :func:`gather_rows`: every rank holds a value for
    every rank's rows (``t``: ``sum(sizes)`` rows in rank order, ``sizes[r]``
    of them rank r's) and sends rank r its block; returns this rank's blocks
    from all ranks, ``(world, sizes[rank], ...)`` in source-rank order (an
    all-to-all; no autograd)."""
    sizes = [int(n) for n in sizes]
    rank, world = dist.get_rank(group), len(sizes)
    rest = t.shape[1:]
    out = t.new_empty((world * sizes[rank],) + rest)
    dist.all_to_all_single(out, t.detach().contiguous(), output_split_sizes=[sizes[rank]] * world,
                           input_split_sizes=sizes, group=group)
    return out.view((world, sizes[rank]) + rest)
