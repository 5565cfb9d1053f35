"""Class-parallel cosine cross-entropy: classes sharded over the ranks of a
process group, O(N) numbers per rank exchanged per step.

Forward, per row (rank r's terms, see partials.py):

1. ``M = max_r lse_r`` -- an all-reduce(MAX) of N floats, outside autograd:
   ``lse = M + log sum_r exp(lse_r - M)`` does not depend on M, so M needs no
   gradient.
2. one all-reduce(SUM) of the stacked ``[e_r, [lse_r = M], g_r (, sum_z_r)]``:
   3N floats (4N with label smoothing). ``e_r = exp(lse_r - M)``, but
   ``expm1(lse_r - M) = 0`` on a rank holding the max, whose 1 the count
   ``[lse_r = M]`` adds back: ``sum_r exp(lse_r - M) = 1 + rest`` with
   ``rest = sum_r e_r + count - 1``, and ``log1p(rest)`` keeps a confident
   row's small rest exact instead of rounding it against 1 (as the backends'
   own log-sum-exp does, csrc/include/nnk/math.h lse_merge). ``g_r = M - z_t``
   on the rank that holds the row's target (from its backend's row loss
   ``lse_r - z_t``: ``g_r = row_loss_r - (lse_r - M)``), else 0.
3. every rank then holds the full row loss
   ``lse - (1 - ls) z_t - (ls / C) sum_z + zl lse^2`` (0 on ignored rows),
   computed as ``log1p(rest) + g + ls (z_t - sum_z / C) + ...`` so that M
   cancels exactly, and reduces it as ``F.cross_entropy``.

Backward: none of these collectives communicates (see collectives.py): the
gradient of ``lse_r`` is ``exp(lse_r - lse)``, which is local, and the local
backend turns it into the shard's softmax. Only the gradient of x (and of a
shared scalar scale) is summed over the ranks.
"""
from __future__ import annotations


import torch

from .._options import (
    REDUCTIONS, CCEOptions, _choice, _finite_float, deterministic_flag, flag, float32_options, int_option, make_options,
)
from .._dispatch import autocast_dtype, resolve_impl
from ..reference import reduce_rows
from .collectives import all_reduce_max, replicated, sum_over_group
from .partials import CCEPartials, ShardTerms, check_shard, shard_partials
from .rank_checks import agree, check_partition

CALLER = "nnk.distributed.cosine_cross_entropy"


class _Combine(torch.autograd.Function):
    """The (N,) row losses and lse from every rank's per-row terms: ``lse``,
    ``sum_logits`` (None without smoothing) and either the target logit
    (``owner`` None) or, where ``owner`` marks the rank holding the row's
    target, that backend's row loss ``lse_r - z_t``.

    The backward is written out, not left to autograd: on the owner rank
    d row / d lse_r = w_r (1 + 2 zl lse) - (1 - ls), with w_r = exp(lse_r - lse)
    ~ 1 on a confident row, and autograd summed its two paths' terms, rounding
    w_r against 1 (an ulp of 1 is 10% of 1 - w_r ~ 1e-6: 6x the single-process
    op's d x error). Here w_r - 1 = expm1(v_r) with v_r = (lse_r - m) - log_sum,
    not through the rounded lse. It is local: every rank backpropagates the
    same replicated loss, so no collective runs in the backward."""

    @staticmethod
    def forward(ctx, lse, target_term, sum_logits, owner, valid, num_classes, label_smoothing, z_loss, group):
        m = all_reduce_max(lse, group)
        if owner is None:
            gap = target_term
        else:
            # m - z_t = row_loss_r - (lse_r - m): exact when the owner's lse is the
            # max (a confident row), and its gradient reaches the backend as the
            # per-row coefficients of softmax and onehot (see partials.py).
            gap = torch.where(owner, target_term - (lse - m), torch.zeros_like(lse))
        # expm1 on the max: 0, its 1 counted apart.
        at_max = lse == m
        cols = [torch.where(at_max, (lse - m).expm1(), (lse - m).exp()), at_max.to(lse.dtype), gap]
        if label_smoothing:
            cols.append(sum_logits)
        total = sum_over_group(torch.stack(cols), group)
        log_sum = (total[0] + (total[1] - 1)).log1p()
        gap = total[2] if owner is not None else m - total[2]
        # lse - (1 - ls) z_t - (ls / C) sum_z with lse = m + log_sum and z_t = m - gap,
        # written so that m cancels before rounding.
        row = log_sum + gap
        if label_smoothing:
            row = row + label_smoothing * ((m - gap) - total[3] / num_classes)
        lse_all = m + log_sum
        if z_loss:
            row = row + z_loss * lse_all.square()
        row = torch.where(valid, row, torch.zeros_like(row))
        ctx.save_for_backward(lse, m, log_sum, lse_all, owner, valid)
        ctx.consts = (num_classes, label_smoothing, z_loss, sum_logits is not None)
        return row, lse_all

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_row, g_lse):
        lse, m, log_sum, lse_all, owner, valid = ctx.saved_tensors
        num_classes, ls, zl, has_sum = ctx.consts
        g = torch.where(valid, g_row, torch.zeros_like(g_row))
        v = (lse - m) - log_sum
        w = v.exp()
        # d row / d lse_r = w_r (1 + 2 zl lse), d lse / d lse_r = w_r; zl g
        # first (math.h dlogit): a row without upstream gradient gets 0, not
        # 2 zl lse = inf (zl > ~1.7e38) times 0.
        z_term = 2.0 * (zl * g) * lse_all if zl else None
        d_lse = w * ((g + z_term if zl else g) + g_lse)
        if owner is None:
            # gap = m - sum_r z_t,r: d row / d z_t,r = -(1 - ls), on every rank's term.
            d_target = -(1.0 - ls) * g
        else:
            # The owner's row loss enters gap with d row / d gap = 1 - ls, and
            # its lse with -(1 - ls): w_r - (1 - ls) = expm1(v_r) + ls.
            d_target = torch.where(owner, (1.0 - ls) * g, torch.zeros_like(g))
            own = g * (v.expm1() + ls) + g_lse * w
            if zl:
                own = own + z_term * w
            d_lse = torch.where(owner, own, d_lse)
        d_sum = -(ls / num_classes) * g if has_sum and ls else None
        return d_lse, d_target, d_sum, None, None, None, None, None, None


def _combine(lse, target_term, owner, sum_logits, valid, *, num_classes, label_smoothing, z_loss,
             reduction, group):
    """The loss (reduced) and the (N,) lse of :class:`_Combine`."""
    row, lse_all = _Combine.apply(lse, target_term, sum_logits, owner, valid, num_classes, label_smoothing,
                                  z_loss, group)
    return reduce_rows(row, valid, reduction), lse_all


def combine_partials(partials: CCEPartials, valid: torch.Tensor, *, num_classes: int,
                     label_smoothing: float, z_loss: float, reduction: str, group=None):
    """The exact loss from every rank's :class:`CCEPartials` (two all-reduces:
    MAX of N floats, SUM of 3N or 4N floats, after a small all-gather that
    checks the ranks agree).

    Args:
        partials: this rank's :func:`cosine_cross_entropy_partials`.
        valid: (N,) bool, the non-ignored rows (``target != ignore_index``).
        num_classes: C, over all ranks.
        label_smoothing: in [0, 1]; needs the partials' sum_logits when > 0.
        z_loss: >= 0, as :func:`nnk.cosine_cross_entropy`.
        reduction: ``"mean" | "sum" | "none"``.
        group: the process group of the shards (default: the world).

    Returns ``(loss, lse)`` with lse the (N,) log-sum-exp over all classes.

    x.grad: each rank's partials carry the gradient of its own shard only; sum
    x.grad over the ranks (all_reduce) for the full single-process gradient,
    as :func:`cosine_cross_entropy` does in its backward. The same holds for
    a shared (0-d) scale that requires grad: each rank's is its shard's part."""

    def describe():
        if not isinstance(partials, CCEPartials):
            raise TypeError(f"partials must be the CCEPartials of cosine_cross_entropy_partials, "
                            f"got {type(partials).__name__}")
        if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool:
            raise TypeError(f"valid must be a bool tensor (target != ignore_index), got "
                            f"{valid.dtype if isinstance(valid, torch.Tensor) else type(valid).__name__}")
        _choice("reduction", reduction, REDUCTIONS)
        f32 = float32_options(getattr(partials.lse, "dtype", None))
        ls = _finite_float("label_smoothing", label_smoothing, lo=0.0, hi=1.0, float32=f32)
        zl = _finite_float("z_loss", z_loss, lo=0.0, float32=f32)
        int_option("num_classes", num_classes, lo=1)
        n = partials.lse.shape[0] if isinstance(partials.lse, torch.Tensor) and partials.lse.dim() == 1 else None
        if n is None or valid.shape != (n,):
            raise ValueError("partials.lse and valid must be (N,) tensors of the same N")
        if ls and partials.sum_logits is None:
            raise ValueError("label_smoothing needs the partials' sum_logits (sum_logits=True)")
        return None, {"N": n, "dtype": str(partials.lse.dtype), "num_classes": num_classes,
                      "label_smoothing": ls, "z_loss": zl, "reduction": reduction}

    # A rank with other options would send other sizes (4N vs 3N floats) or reduce differently.
    agree("nnk.distributed.combine_partials", group, describe,
          ("N", "dtype", "num_classes", "label_smoothing", "z_loss", "reduction"))
    return _combine(partials.lse, partials.target_logit, None, partials.sum_logits, valid,
                    num_classes=num_classes, label_smoothing=label_smoothing, z_loss=z_loss,
                    reduction=reduction, group=group)


def combine_terms(terms: ShardTerms, valid: torch.Tensor, *, num_classes: int,
                  label_smoothing: float, z_loss: float, reduction: str, group=None):
    """:func:`combine_partials` on the :class:`ShardTerms` of the class-parallel
    loss (the same collectives), which carry the backend's row loss instead
    of the target logit."""
    return _combine(terms.lse, terms.row_loss, terms.here, terms.sum_logits, valid,
                    num_classes=num_classes, label_smoothing=label_smoothing, z_loss=z_loss,
                    reduction=reduction, group=group)


def scale_signature(s) -> dict:
    """The values of a scale (float, 0-d or (C_local,) tensor) the ranks
    must agree on; a per-class scale is each rank's own."""
    shared = not (isinstance(s, torch.Tensor) and s.dim() == 1)
    tensor = shared and isinstance(s, torch.Tensor)
    return {
        "shared scale value": (float(s.detach()) if tensor else s) if shared else None,
        "shared scale requires_grad": tensor and s.requires_grad,
        # Its gradient is all-reduced in this dtype: ranks must send the same bytes.
        "shared scale dtype": str(s.dtype) if tensor else None,
    }


def shard_loss(x, weight_shard, target, local, scale, bias, opts: CCEOptions, *, num_classes: int,
               reduction: str, impl: str, deterministic: bool, group):
    """``(loss, lse)`` of the whole head on x from this rank's shard, after
    the ranks have agreed on the arguments: the shard's partials for the
    shard-local targets ``local`` (see :func:`local_targets`), combined over
    ``group``. A 0-d scale that requires grad gets the sum of the ranks'
    gradients; x's gradient is this shard's part (the caller sums it)."""
    if isinstance(scale, torch.Tensor) and scale.dim() == 0 and scale.requires_grad:
        scale = replicated(scale, group)
    terms = shard_partials(x, weight_shard, local, scale, bias, opts, impl=impl, deterministic=deterministic,
                           with_sum_logits=opts.label_smoothing > 0)
    return combine_terms(terms, target != opts.ignore_index, num_classes=num_classes,
                         label_smoothing=opts.label_smoothing, z_loss=opts.z_loss, reduction=reduction, group=group)


def _target_checksum(target: torch.Tensor) -> int:
    """Cheap evidence that every rank got the same labels: sum (t_i + 1) w_i
    modulo 2^64 (int64 wraps, in any summation order) with odd pseudo-random
    weights w_i (a golden-ratio multiplicative hash of i). The weights 2i + 1
    made small changes collide: targets [1, 4, ...] and [4, 3, ...] summed
    alike and the ranks combined different batches without an error."""
    i = torch.arange(target.numel(), device=target.device, dtype=torch.int64)
    w = (i * -7046029254386353131 + 0x2545F4914F6CDD1D) | 1  # 0x9E3779B97F4A7C15 as an int64
    return int(((target.long() + 1) * w).sum())


def cosine_cross_entropy(
    x: torch.Tensor,
    weight_shard: torch.Tensor,
    target: torch.Tensor,
    *,
    class_start: int,
    num_classes: int,
    group=None,
    scale: float | torch.Tensor = 1.0,
    bias: torch.Tensor | None = None,
    normalize_input: bool = True,
    normalize_weight: bool = True,
    additive_margin: float = 0.0,
    angular_margin: float = 0.0,
    margin_grad: str = "exact",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    z_loss: float = 0.0,
    eps: float = 1e-12,
    return_lse: bool = False,
    impl: str = "auto",
    deterministic: bool | None = None,
    check_finite: bool = False,
):
    """:func:`nnk.cosine_cross_entropy` with the classes sharded over the ranks of
    ``group``: rank r holds rows ``[class_start, class_start + C_local)`` of the
    classifier and the full batch. Replaces, on every rank::

        weight = torch.cat(all ranks' weight_shard, ordered by class_start)   # (C, D)
        nnk.cosine_cross_entropy(x, weight, target, scale=..., bias=cat(bias shards), ...)

    returning exactly that loss on every rank, while exchanging only O(N)
    numbers (an all-reduce MAX of N floats and an all-reduce SUM of 3N floats,
    4N with label smoothing) and never gathering the weights.

    Every rank must pass the same x, target, options and shared scale, and
    call ``backward()`` on the returned loss with the same upstream gradient
    (as ``loss.backward()`` does). Then x.grad is the full single-process
    gradient on every rank (the ranks' parts are all-reduced in the backward;
    the only communication of the backward), and weight_shard, bias and a
    (C_local,) scale get their own rows of the single-process gradient.

    Args:
        x: (N, D) features, identical on every rank; float16 / bfloat16 /
            float32 (float64 on impl="torch").
        weight_shard: (C_local, D) this rank's classes, x's dtype, C_local >= 1.
        target: (N,) int64 / int32 global classes in [0, num_classes) or
            ``ignore_index``, identical on every rank.
        class_start: this rank's first class; the ranks' shards must tile
            [0, num_classes) (any rank order, uneven sizes allowed).
        num_classes: C.
        group: the process group of the class shards (None: the default group).
        scale: float or 0-d tensor (identical on every rank), or this rank's
            (C_local,) per-class scales; may require grad.
        bias: this rank's (C_local,) biases, or None.
        normalize_input, normalize_weight, additive_margin, angular_margin,
        margin_grad, ignore_index, label_smoothing, reduction, z_loss, eps,
        return_lse, impl, deterministic, check_finite: as
            :func:`nnk.cosine_cross_entropy` (impl picks the local backend of
            the partials; check_finite checks this rank's x, shard and bias, and
            every rank raises when one finds NaN or Inf).

    Returns:
        As :func:`nnk.cosine_cross_entropy`; the same value on every rank.

    Raises:
        On every rank, before any collective but one small all-gather of the
        arguments' signature: the errors of nnk.cosine_cross_entropy when any
        rank's arguments are invalid (that rank raises its own, the others a
        ValueError naming it), and a ValueError when the ranks disagree on N,
        D, dtype, options, target contents, which inputs require grad, or when
        their shards do not tile [0, num_classes). RuntimeError without an
        initialized process group.
    """
    def describe():
        # Every check that can raise runs in here, where a failing rank still
        # meets the others (a flag resolved outside left them waiting).
        _choice("reduction", reduction, REDUCTIONS)
        opts = make_options(
            normalize_input=normalize_input, normalize_weight=normalize_weight,
            additive_margin=additive_margin, angular_margin=angular_margin, margin_grad=margin_grad,
            ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, eps=eps,
            deterministic=deterministic_flag(deterministic), float32=float32_options(getattr(x, "dtype", None)),
        )
        local, s = check_shard(x, weight_shard, target, scale, bias, opts, class_start, num_classes,
                               check_finite=flag("check_finite", check_finite))
        values = {
            "N (x.shape[0])": x.shape[0], "D (x.shape[1])": x.shape[1], "x.dtype": str(x.dtype),
            "device type": x.device.type, "num_classes": num_classes, "options": repr(opts),
            "reduction": reduction, "return_lse": flag("return_lse", return_lse),
            "target checksum": _target_checksum(target),
            "x.requires_grad": x.requires_grad,
            # The backward all-reduces x's gradient: a rank without autograd would leave the others waiting.
            "grad mode": torch.is_grad_enabled(),
            "impl (resolved)": resolve_impl(impl, x.device, x.dtype),
            "scale kind": "per-class" if isinstance(s, torch.Tensor) and s.dim() == 1 else type(s).__name__,
            **scale_signature(s),
            "autocast": autocast_dtype(x.device),
            "bias given": bias is not None,
            "class_start": class_start, "C_local": weight_shard.shape[0],
        }
        return (opts, local, s), values

    same = ("N (x.shape[0])", "D (x.shape[1])", "x.dtype", "device type", "num_classes", "options",
            "reduction", "return_lse", "target checksum", "x.requires_grad", "grad mode", "impl (resolved)",
            "scale kind", "shared scale value", "shared scale requires_grad", "shared scale dtype", "autocast",
            "bias given")
    (opts, local, s), shards = agree(CALLER, group, describe, same, info=("class_start", "C_local"))
    check_partition(CALLER, shards["class_start"], shards["C_local"], num_classes)

    if x.requires_grad:
        x = replicated(x, group)
    loss, lse = shard_loss(x, weight_shard, target, local, s, bias, opts, num_classes=num_classes,
                           reduction=reduction, impl=impl, deterministic=opts.deterministic, group=group)
    return (loss, lse) if return_lse else loss
