"""``impl="cuda"``: the compiled extension's fused cosine cross-entropy
(``nnk::cosine_cross_entropy_fwd`` / ``_bwd``, CUDA kernels on CUDA tensors
and their CPU twins on CPU tensors).

Blocks of rows x classes cover the logits (all C classes per block when they
fit the memory budget with 1024 rows or N, else class chunks, each walked
over all rows so that W is read once per pass). Per block, one GEMM gives the
raw products ``x_r @ W_k^T`` (fp32 output), one fused epilogue applies the
norms, scale, margins and bias and merges each row's log-sum-exp, finished
by the row's last class chunk. Gradients then come one of two ways:

* ``_ExtensionCCE`` (the default): the forward computes no gradient and saves only its inputs, the
  (N,) lse and the (N,) residue of its rounding, so evaluation costs one GEMM pass; the backward recomputes each
  block's GEMM, turns the block into ``d cos`` in one fused epilogue, then
  ``d xn (+)= dcos @ Wn`` and ``d Wn += dcos^T @ xn`` (fp32 accumulators: the
  class chunk's rows of W, and, with class chunks, all of x's) and the
  normalization backwards: 4 GEMM passes (8 N C D flops) for training.
* ``_ExtensionCCEReduced`` (opt-in, ``NNK_GRAD_IN_FORWARD=1``: a "mean"/"sum"
  loss that autograd records, float32 or bfloat16): the upstream gradient of
  each row is known before the forward up to one scalar, so
  ``nnk::cosine_cross_entropy_fwd_bwd`` computes the gradients from each
  block while it is in memory (as Liger's fused linear cross-entropy does)
  and the backward only multiplies them by that scalar, in place: 3 GEMM
  passes (6 N C D flops). Only where the logits fit one class chunk: with
  class chunks a row's gradients need its lse over all of them, so the op
  would run the forward and then the backward (4 passes) and hold the
  gradients for nothing; ``grad_in_forward`` then declines. Not the default,
  because the gradients then live from the forward to the backward: several
  losses before one backward each hold their d x and d W (d W, in W's
  dtype, within one class chunk: at most about 128 MiB in float32, 85 MiB
  in bfloat16 on CUDA and 43 MiB on the CPU, by ``nnk.ops.cce_block_shape``),
  activation checkpointing reruns the whole fused forward, a forward that
  is never differentiated did 3 passes instead of 1, and the loss can be
  differentiated once only (the backward scales the gradients in place).
  float16 is left out: its gradients at an upstream gradient of 1 would
  underflow before a GradScaler's scale reaches them.

Peak extra memory: one (rows x classes) fp32 block (+ a 16-bit copy for
fp16/bf16 GEMMs), the class chunk's (classes x D) normalized rows and fp32
d Wn, the row chunk's (rows x D) normalized rows and, with one class chunk,
its fp32 d xn: within a budget of 256 MiB, or the ``NNK_CHUNK_MB`` MiB the
environment sets; with class chunks d xn accumulates in an (N x D) fp32
buffer outside it (csrc/include/nnk/cce_driver.h tiling); never
N x C, and no (C x D) buffer once W needs class chunks (on a CPU, 16-bit
inputs are first converted to float32 copies, W's included).

Gradients are bitwise reproducible whatever ``opts.deterministic`` says: the
column sums (d bias, d scale) go through per-band partials summed in a fixed
order, never float atomics. With fp16 inputs, ``d cos = d z * s * dpsi/dcos``
is rounded to fp16 for the GEMMs: the backward op first scales the upstream
gradients by a power of two chosen on the device (csrc/include/nnk/cce_driver.h
grad_scale) so that d cos neither underflows (a mean's 1/N times p ~ 1/C) nor
overflows (a large GradScaler scale), and divides the gradients by it
afterwards (exact). ``_fwd_bwd`` cannot (it needs every row's lse first) and
refuses fp16 gradients on CUDA; float16 never takes the gradients-in-forward
path.
"""
from __future__ import annotations


import torch

from . import fused_backward
from .._options import CCEOptions, env_chunk_bytes, env_flag
from ..ops._extension import cce_block_shape
from ..ops.cce import bwd_options, cce_backward, fwd_options
from ..reference import acc_dtype, reduce_rows


class _ExtensionCCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, scale, bias, target, fwd_args, bwd_args):
        row, lse, lse_lo = torch.ops.nnk.cosine_cross_entropy_fwd(x, weight, target, scale, bias, *fwd_args)
        ctx.save_for_backward(x, weight, target, scale, bias, lse, lse_lo)
        ctx.bwd_args = bwd_args
        return row, lse

    @staticmethod
    @fused_backward
    def backward(ctx, g_row, g_lse):
        grads = cce_backward(g_row, g_lse, *ctx.saved_tensors, ctx.bwd_args, ctx.needs_input_grad[:4])
        return (*grads, None, None, None)


# Elements per float32 temporary of the in-place scaling of 16-bit gradients.
_SCALE_BLOCK = 1 << 24


def _scale_(t: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``t *= g`` in place, computed in float32 (or t's float64) with one
    rounding to t's dtype, exact when g is 1, in blocks for 16-bit t (g is
    never rounded to bfloat16 first, and the temporary stays <= 64 MiB)."""
    if t.dtype in (torch.float32, torch.float64):
        return t.mul_(g)
    flat = t.view(-1)
    for i in range(0, flat.numel(), _SCALE_BLOCK):
        blk = flat[i:i + _SCALE_BLOCK]
        blk.copy_(blk.float() * g)
    return t


class _ExtensionCCEReduced(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, scale, bias, target, reduction, opts, block):
        valid = target != opts.ignore_index
        acc = acc_dtype(x.dtype)
        # d loss / d row_i for an upstream gradient of 1, as reduce_rows
        # differentiates (inf for "mean" without valid rows: every row is then
        # ignored and gets no gradient).
        row_grad = torch.ones((), dtype=acc, device=x.device)
        if reduction == "mean":
            row_grad = row_grad / valid.sum().to(acc)
        mask = list(ctx.needs_input_grad[:4])
        row, _lse, *grads = torch.ops.nnk.cosine_cross_entropy_fwd_bwd(
            x, weight, target, scale, bias, row_grad.expand(target.shape), *bwd_options(opts, *block),
            mask)
        ctx.save_for_backward(*grads)
        ctx.mask = mask
        return reduce_rows(row, valid, reduction)

    @staticmethod
    @fused_backward
    def backward(ctx, g):
        try:
            grads = ctx.saved_tensors
        except RuntimeError as e:  # scaled in place by an earlier backward (retain_graph=True)
            raise RuntimeError(
                "nnk: this loss computed its gradients in the forward (NNK_GRAD_IN_FORWARD=1) and an "
                "earlier backward already used them; backpropagate through it once, or unset "
                "NNK_GRAD_IN_FORWARD") from e
        # The saved gradients are scaled in place and handed to autograd: no
        # second copy of d x and d W.
        return (*[_scale_(t, g) if on else None for t, on in zip(grads, ctx.mask)], None, None, None, None)


def grad_in_forward(x, weight, scale, bias) -> bool:
    """Whether a reduced loss on the extension takes the fused training op
    (``_ExtensionCCEReduced``): ``NNK_GRAD_IN_FORWARD=1``, autograd is
    recording, an input requires grad, x is not float16, and the logits fit
    one class chunk (with class chunks a row's gradients need its lse over
    all of them first: the op would run the forward and then the backward,
    saving nothing while holding the gradients; not checked while
    torch.compile traces, which cannot call into the extension's module)."""
    if not env_flag("NNK_GRAD_IN_FORWARD") or not torch.is_grad_enabled():
        return False
    if x.dtype == torch.float16:
        return False
    if not any(isinstance(t, torch.Tensor) and t.requires_grad for t in (x, weight, scale, bias)):
        return False
    if torch.compiler.is_compiling():
        return True
    (n, d), c = x.shape, weight.shape[0]
    return cce_block_shape(n, c, d, x.dtype, x.device.type, env_chunk_bytes())[1] == c


def cosine_cross_entropy_extension_reduced(x, weight, target, scale, bias, opts: CCEOptions,
                                           reduction: str, *, chunk_rows: int | None = None,
                                           chunk_classes: int | None = None):
    """Backend entry for a reduced loss that will be differentiated, with its
    gradients computed in the forward (see :func:`grad_in_forward` for when
    nnk.functional takes it).

    Args:
        x, weight, target, scale, bias, opts, chunk_rows, chunk_classes: as
            :func:`cosine_cross_entropy_extension`.
        reduction: ``"mean"`` or ``"sum"``.

    Returns:
        The reduced loss, 0-d float32 (float64 for float64 x), differentiable:
        ``reduce_rows(row_loss, target != ignore_index, reduction)``.
    """
    if not isinstance(scale, torch.Tensor):
        scale = torch.full((), float(scale), dtype=torch.float32, device=x.device)
    return _ExtensionCCEReduced.apply(x, weight, scale, bias, target, reduction, opts,
                                      (int(chunk_rows or 0), int(chunk_classes or 0), env_chunk_bytes()))


def cosine_cross_entropy_extension(x, weight, target, scale, bias, opts: CCEOptions,
                                   *, chunk_rows: int | None = None,
                                   chunk_classes: int | None = None):
    """Backend entry (arguments already checked by nnk.functional).

    Args:
        x: (N, D) float16 / bfloat16 / float32 (float64 also runs: the tests use it).
        weight: (C, D), x's dtype.
        target: (N,) int64 in [0, C) or ``opts.ignore_index``.
        scale: Python float, or float32 (float64) tensor of shape () or (C,).
        bias: (C,) floating tensor or None.
        opts: the checked options.
        chunk_rows, chunk_classes: the shape of the blocks of logits the op
            computes at a time (testing and tuning); None sizes them to the
            extension's memory budget (256 MiB, or ``NNK_CHUNK_MB``).

    Returns:
        ``(row_loss, lse)``: (N,) float32 (float64 for float64 x), the loss of each
        row (0 on ignored rows) and its log-sum-exp, both differentiable.
    """
    if not isinstance(scale, torch.Tensor):
        scale = torch.full((), float(scale), dtype=torch.float32, device=x.device)
    block = (int(chunk_rows or 0), int(chunk_classes or 0), env_chunk_bytes())
    return _ExtensionCCE.apply(x, weight, scale, bias, target,
                               fwd_options(opts, *block), bwd_options(opts, *block))
