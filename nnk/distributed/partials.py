"""The per-shard partials of the cosine cross-entropy.

A rank that holds classes ``[class_start, class_start + C_local)`` contributes
to each row i three numbers, from which the ranks' sums give the exact loss:

- ``lse_i``: log-sum-exp of the shard's logits, the margin applied on the
  target column when the target is in the shard. The heavy O(N C_local D)
  part: computed by the local backend (torch, triton or cuda) through
  ``nnk.cosine_cross_entropy(..., return_lse=True)``, whose lse is
  differentiable with gradient ``softmax`` of the shard's logits.
- ``z_t``: the target logit ``s_t psi + b_t`` where the target is in the
  shard, else 0, taken from the same backend call as ``lse - row_loss``
  (its row loss is ``lse - z_t``). Not recomputed on the side: for a confident
  row (softmax of the target ~ 1) the loss ``lse - z_t`` and its gradient
  ``p_t - 1`` are differences of nearly equal numbers, and only the backend's
  own pair cancels exactly. A recomputed z_t differs from the backend's by
  fp32 rounding times s, which was the whole loss of such rows (measured
  before this design, test_confident_rows_as_exact_as_single_process, fp32,
  s=64, cuda backend: row-loss error 3e-5 and dW error 2.2e-5 against 1.5e-6
  and 7.8e-6 for the single-process op). Through ``lse - row_loss`` the gradients
  of both outputs reach the backend as per-row coefficients, which it merges
  into ``g (softmax - onehot) + coef softmax`` in fp32 (math.h dlogit), as the
  single-process op does.
- ``sum_z``: the sum of the shard's logits, for label smoothing, without the
  N x C_local logits: ``sum_c (s_c xn . wn_c + b_c) = xn . (sum_c s_c wn_c)
  + sum_c b_c``, plus ``z_t - (s_t cos_t + b_t)`` where the target is in the
  shard, z_t again the backend's (O((N + C_local) D)).

The class-parallel loss combines :class:`ShardTerms` (the backend's row loss
itself rather than z_t, see loss.py); :class:`CCEPartials` is the public form.
"""
from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch

from .._options import (
    CCEOptions, _value_check, check_tensors, deterministic_flag, float32_options, int_option, invalid_targets,
    make_options,
)
from .._dispatch import autocast_operands, run_backend
from ..ops import row_normalize
from ..reference import acc_dtype, scale_tensor_ref

# What the local backend sees as the target of rows whose class is elsewhere.
LOCAL_IGNORE = -1


class ShardTerms(NamedTuple):
    """What the class-parallel loss combines from one shard, (N,) each: the
    backend's ``lse`` and ``row_loss`` (``lse - z_t`` on the rows whose target
    is here, 0 elsewhere), ``here`` (bool) marking those rows, and
    ``sum_logits`` (None unless asked)."""

    lse: torch.Tensor
    row_loss: torch.Tensor
    here: torch.Tensor
    sum_logits: torch.Tensor | None


class CCEPartials(NamedTuple):
    """Per-row partials of one class shard, each (N,) float32 (float64 for
    float64 input) and differentiable."""

    lse: torch.Tensor
    target_logit: torch.Tensor
    sum_logits: torch.Tensor | None


def local_targets(target: torch.Tensor, class_start: int, num_local: int, ignore_index: int) -> torch.Tensor:
    """Targets relative to the shard: ``target - class_start`` for rows whose
    (non-ignored) class is in ``[class_start, class_start + num_local)``, else
    ``LOCAL_IGNORE``."""
    target = target.long()
    inside = (target != ignore_index) & (target >= class_start) & (target < class_start + num_local)
    return torch.where(inside, target - class_start, torch.full_like(target, LOCAL_IGNORE))


def check_shard(x, weight_shard, target, scale, bias, opts: CCEOptions, class_start, num_classes, *,
                check_finite: bool = False):
    """All the local checks of a sharded call (before any collective);
    ``check_finite`` as in :func:`nnk.cosine_cross_entropy` (weight: the shard).

    Returns ``(local_target, scale)``: the targets relative to the shard (see
    :func:`local_targets`) and the scale as ``check_tensors`` returns it."""
    int_option("class_start", class_start, lo=0)
    int_option("num_classes", num_classes, lo=1)
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must be int64 or int32, got {target.dtype}")
    num_local = weight_shard.shape[0] if isinstance(weight_shard, torch.Tensor) and weight_shard.dim() == 2 else 0
    local = local_targets(target, class_start, num_local, opts.ignore_index)
    # The shard's own checks (shapes, dtypes, devices, scale and bias per local class).
    local, scale = check_tensors(x, weight_shard, local, scale, bias, replace(opts, ignore_index=LOCAL_IGNORE),
                                 check_finite=check_finite)
    if class_start + num_local > num_classes:
        raise ValueError(
            f"the shard [class_start, class_start + weight_shard.shape[0]) = [{class_start}, "
            f"{class_start + num_local}) must lie in [0, num_classes={num_classes})"
        )
    if target.numel() > 0:
        t = target.long()
        bad = invalid_targets(t, num_classes, opts.ignore_index)
        msg = f"target values must be in [0, num_classes={num_classes}) or ignore_index={opts.ignore_index}"
        _value_check(~bad.any(), ValueError, msg, lambda: f"{msg}, got {int(t[bad][0])}")
    return local, scale


@autocast_operands  # x and the shard in the autocast dtype, as nnk.cosine_cross_entropy casts them
def shard_partials(x, weight_shard, local_target, scale, bias, opts: CCEOptions, *,
                   impl: str = "auto", deterministic: bool | None = None,
                   with_sum_logits: bool = True) -> ShardTerms:
    """The :class:`ShardTerms` of one shard, on checked arguments and
    shard-local targets (``LOCAL_IGNORE`` for rows whose class is elsewhere or
    ignored)."""
    deterministic = deterministic_flag(deterministic)
    # Arguments were checked by check_shard: straight to the backend (one round
    # of checks and device syncs per call, not two).
    local_opts = replace(opts, ignore_index=LOCAL_IGNORE, label_smoothing=0.0, z_loss=0.0,
                         deterministic=deterministic)
    row_loss, lse = run_backend(impl, x, weight_shard, local_target, scale, bias, local_opts)
    acc = acc_dtype(x.dtype)
    here = local_target != LOCAL_IGNORE
    terms = ShardTerms(lse.to(acc), row_loss.to(acc), here, None)
    if not with_sum_logits:
        return terms

    # The sum of the shard's logits through the scaled class sum (no N x
    # C_local tile); on the rows whose class is here, the target's plain
    # logit s_t cos_t + b_t swapped for the backend's own z_t = lse -
    # row_loss. Not s_t psi(cos_t) of a recomputed cos_t: ArcFace's exact
    # d psi / d cos grows as 1 / sin(theta), and at rows near their class the
    # recomputed cosine's rounding moved it enough to put up to 191x the
    # single-process op's error into d x or d W (cuda backend's CPU kernels,
    # C = 2, D = 3, smoothing 0.29, 20 seeds; d x alone: 71x;
    # test_smoothing_takes_the_backends_margin).
    xn = row_normalize(x.to(acc), opts.eps)[0] if opts.normalize_input else x.to(acc)
    wn = row_normalize(weight_shard.to(acc), opts.eps)[0] if opts.normalize_weight else weight_shard.to(acc)
    s = scale_tensor_ref(scale, acc, x.device)
    t = torch.where(here, local_target, torch.zeros_like(local_target))
    s_t = s[t] if s.dim() == 1 else s
    plain_t = s_t * (xn * wn[t]).sum(dim=1)
    if bias is not None:
        plain_t = plain_t + bias.to(acc)[t]
    class_sum = (wn * s[:, None]).sum(dim=0) if s.dim() == 1 else wn.sum(dim=0) * s
    z_t = terms.lse - terms.row_loss
    sum_logits = xn @ class_sum + torch.where(here, z_t - plain_t, torch.zeros_like(z_t))
    if bias is not None:
        sum_logits = sum_logits + bias.to(acc).sum()
    return terms._replace(sum_logits=sum_logits)


def cosine_cross_entropy_partials(
    x: torch.Tensor,
    weight_shard: torch.Tensor,
    target: torch.Tensor,
    *,
    class_start: int,
    num_classes: int,
    scale: float | torch.Tensor = 1.0,
    bias: torch.Tensor | None = None,
    normalize_input: bool = True,
    normalize_weight: bool = True,
    additive_margin: float = 0.0,
    angular_margin: float = 0.0,
    margin_grad: str = "exact",
    ignore_index: int = -100,
    eps: float = 1e-12,
    sum_logits: bool = True,
    impl: str = "auto",
    deterministic: bool | None = None,
) -> CCEPartials:
    """Per-row partials of the cosine cross-entropy over one shard of classes
    (no communication). With z the logits of :func:`nnk.cosine_cross_entropy`
    (margins on each row's target column), restricted to the shard's columns
    ``S = [class_start, class_start + C_local)``, it replaces::

        lse          = torch.logsumexp(z[:, S], dim=1)
        target_logit = torch.where(target in S, z[i, target_i], 0)   # 0 on ignored rows
        sum_logits   = z[:, S].sum(dim=1)

    without materializing ``z``. Summing ``exp(lse)``, ``target_logit`` and
    ``sum_logits`` over a partition of the classes gives the full row's
    log-sum-exp, target logit and sum of logits (see
    :func:`nnk.distributed.cosine_cross_entropy`).

    Args:
        x: (N, D) float16 / bfloat16 / float32 features (float64 on impl="torch").
        weight_shard: (C_local, D) rows ``class_start ...`` of the classifier, x's dtype.
        target: (N,) int64 / int32 *global* class indices in [0, num_classes),
            or ``ignore_index``.
        class_start: first global class of the shard.
        num_classes: total number of classes C.
        scale: float, 0-d tensor, or (C_local,) tensor of the shard's scales.
        bias: (C_local,) floating tensor of the shard's biases, or None.
        normalize_input, normalize_weight, additive_margin, angular_margin,
        margin_grad, ignore_index, eps, impl, deterministic: as
            :func:`nnk.cosine_cross_entropy`.
        sum_logits: compute ``sum_logits`` (needed only for label smoothing).

    Returns:
        :class:`CCEPartials` ``(lse, target_logit, sum_logits)``, each (N,)
        float32 (float64 for float64 x), differentiable with respect to x,
        weight_shard, scale and bias; ``sum_logits`` is None when not asked.
        Rows whose target is ignored or elsewhere get the plain (margin-free) lse.
        Like the torch code it replaces, a loss formed as ``lse - target_logit``
        from these float32 numbers keeps up to an ulp of ``|target_logit|``
        (a confident row at s = 64: ~1.5e-6 on a loss of 1e-6);
        :func:`nnk.distributed.cosine_cross_entropy` combines the backends' row
        losses instead and is as exact as the single-process op, but for label
        smoothing's sum of logits, formed here in float32 beside the backend
        (on ArcFace rows near their class: up to 5x the op's gradient error,
        a third of the float32 reference's; test_smoothing_takes_the_backends_margin).

    Raises:
        TypeError / ValueError naming the argument, as nnk.cosine_cross_entropy,
        and for a shard outside [0, num_classes) or targets >= num_classes.
    """
    opts = make_options(
        normalize_input=normalize_input, normalize_weight=normalize_weight,
        additive_margin=additive_margin, angular_margin=angular_margin, margin_grad=margin_grad,
        ignore_index=ignore_index, label_smoothing=0.0, z_loss=0.0, eps=eps,
        float32=float32_options(getattr(x, "dtype", None)),
    )
    local, scale = check_shard(x, weight_shard, target, scale, bias, opts, class_start, num_classes)
    terms = shard_partials(x, weight_shard, local, scale, bias, opts, impl=impl,
                           deterministic=deterministic, with_sum_logits=sum_logits)
    target_logit = torch.where(terms.here, terms.lse - terms.row_loss, torch.zeros_like(terms.lse))
    return CCEPartials(terms.lse, target_logit, terms.sum_logits)
