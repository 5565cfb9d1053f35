"""The public functional API of nnk."""
from __future__ import annotations

import torch

from . import _dispatch
from ._dispatch import autocast_operands, resolve_impl, saveable
from ._options import (
    FLOAT_DTYPES, REDUCTIONS, CCEOptions, _choice, _finite_float, _is_real, check_dense, check_tensors,
    deterministic_flag, flag, float32_options, int_option, make_options,
)
from .inference import logits_topk, normalized_rows
from .reference import cosine_logits_ref, reduce_rows

__all__ = ["cosine_cross_entropy", "cosine_logits", "cosine_topk", "resolve_impl"]


@autocast_operands
def cosine_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
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
    """Cross-entropy of a cosine (normalized) classification head, fused: the
    (N, C) logits are never materialized.

    Replaces, in float32 accumulation whatever the input dtype::

        xn, wn = F.normalize(x, dim=1, eps=eps), F.normalize(weight, dim=1, eps=eps)
        cos = xn @ wn.T
        theta = acos(clamp(cos[i, y_i], -1, 1))                       # target column only
        psi = cos(theta + angular_margin) if theta + angular_margin <= pi
              else cos[i, y_i] - angular_margin * sin(angular_margin)  # ArcFace fallback
        psi = psi - additive_margin                                    # CosFace
        logits = scale * cos, with scale[y_i] * psi at [i, y_i]; logits += bias
        loss = F.cross_entropy(logits, target, ignore_index=ignore_index,
                               label_smoothing=label_smoothing, reduction="none")
        loss += z_loss * logsumexp(logits, 1) ** 2   (non-ignored rows), then reduced.

    Args:
        x: (N, D) float32 / float16 / bfloat16 features (float64 on the torch impl).
        weight: (C, D) class weights, same dtype as x (the ``nn.Linear`` layout).
        target: (N,) int64 or int32 class indices in [0, C), or ``ignore_index``.
        scale: s; a Python float, a 0-d tensor, or a (C,) tensor (per-class scale,
            as nGPT's); tensors may require grad. Must be finite and > 0.
        bias: (C,) floating tensor or None.
        normalize_input: L2-normalize the rows of x (gradient flows through it).
        normalize_weight: L2-normalize the rows of weight.
        additive_margin: CosFace m: the target cosine becomes ``cos - m``.
        angular_margin: ArcFace m in radians, in [0, pi]: the target cosine
            becomes ``cos(theta + m)``; needs both normalizations. sin(theta)
            and the branch (theta + m <= pi or the fallback) come from float64
            sums over x and the target's weight row
            (``nnk.reference.target_sine_ref``): sin(theta) accurate to
            float32 rounding on rows close to their class, where sqrt(1 -
            cos^2) of a float32 cosine is not, and the branch right unless the
            cosine is within float64 rounding of -cos m (float64 inputs: both
            from their own cosine).
        margin_grad: ``"exact"`` differentiates the margins (the ArcFace derivative
            ``cos m + sin m cos(theta) / sin(theta)`` with sin(theta) clamped at
            1e-3 so it stays finite), ``"detached"`` treats ``psi - cos`` as a
            constant (insightface's straight-through gradient).
        ignore_index: rows with this target contribute no loss and no gradient.
        label_smoothing: in [0, 1], as ``F.cross_entropy``.
        reduction: ``"mean"`` (over non-ignored rows; NaN if all are ignored, as
            ``F.cross_entropy``), ``"sum"`` or ``"none"`` ((N,) with 0 on ignored rows).
        z_loss: coefficient of ``lse**2`` added to each non-ignored row's loss.
        eps: lower bound on the norms, as ``F.normalize``.
        return_lse: also return the (N,) float32 (float64 for float64 x) log-sum-exp of the logits
            (margins included; differentiable: d lse / d logits = softmax).
        impl: ``"auto" | "cuda" | "triton" | "torch"``; ``NNK_IMPL`` sets what
            ``"auto"`` means for the process. ``"cuda"`` is the compiled
            extension (its CPU kernels on CPU tensors); with
            ``NNK_GRAD_IN_FORWARD=1`` it computes the gradients of a ``"mean"``
            / ``"sum"`` loss that autograd records (float32 / bfloat16, no
            ``return_lse``) during the forward where the logits fit one of its
            class chunks, saving the backward's recomputation of the logits
            (see README: the gradients are then held from forward to backward).
        deterministic: bitwise-reproducible results on GPU backends (a fixed
            reduction order instead of atomics, and fixed Triton block sizes
            instead of autotuned ones); default ``NNK_DETERMINISTIC=1``.
        check_finite: raise ValueError if x, weight or bias hold NaN/Inf (one
            device sync). By default non-finite inputs propagate to the loss
            and gradients as they do in PyTorch.

    Under ``torch.autocast``, x and weight are first cast to the autocast
    dtype (as ``nn.Linear``'s operands; float64 is left alone): features of
    an autocast backbone meet the float32 master weight of the head, and the
    gradient of the weight comes back in float32.

    Returns:
        The float32 loss (float64 for float64 inputs): a scalar, or (N,) for
        ``reduction="none"``; with ``return_lse``, ``(loss, lse)``.
        Gradients come back in the dtype of each input.

    Raises:
        TypeError / ValueError naming the argument, before any computation, for
        wrong shapes, dtypes or devices, targets out of range, a non-finite or
        non-positive scale, and unknown ``reduction`` / ``impl`` / ``margin_grad``.
        Value checks of tensors (target range, tensor scale) synchronize with the
        device; under torch.compile they run inside the graph instead
        (``torch._assert_async``: a RuntimeError on CPU, with the same message
        unless an index check of the compiled kernel fires first, a
        device-side assert on CUDA).
    """
    _choice("reduction", reduction, REDUCTIONS)
    deterministic = deterministic_flag(deterministic)
    opts: CCEOptions = make_options(
        normalize_input=normalize_input, normalize_weight=normalize_weight,
        additive_margin=additive_margin, angular_margin=angular_margin,
        margin_grad=margin_grad, ignore_index=ignore_index,
        label_smoothing=label_smoothing, z_loss=z_loss, eps=eps,
        deterministic=deterministic, float32=float32_options(getattr(x, "dtype", None)),
    )
    return_lse = flag("return_lse", return_lse)
    target, scale = check_tensors(x, weight, target, scale, bias, opts,
                                  check_finite=flag("check_finite", check_finite))
    x, weight, target, scale, bias = saveable(x, weight, target, scale, bias)
    backend = resolve_impl(impl, x.device, x.dtype)
    if backend == "cuda" and reduction != "none" and not return_lse:
        from .impl.extension import cosine_cross_entropy_extension_reduced, grad_in_forward

        if grad_in_forward(x, weight, scale, bias):
            return cosine_cross_entropy_extension_reduced(x, weight, target, scale, bias, opts, reduction)
    row, lse = _dispatch.backend(backend)(x, weight, target, scale, bias, opts)
    loss = reduce_rows(row, target != opts.ignore_index, reduction)
    return (loss, lse) if return_lse else loss


# --- inference: the logits, and their top k without them ----------------------


def _check_head(x, weight, scale, bias, eps, normalize_weight) -> None:
    """Shapes, dtypes and devices of :func:`cosine_logits`' arguments, and eps
    as :func:`cosine_cross_entropy` takes it. No value checks of tensors (they
    would synchronize with the device at every forward of a head; any scale
    gives well-defined logits)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"weight must be a (C, D) float tensor, got "
                        f"{(weight.dtype, tuple(weight.shape)) if isinstance(weight, torch.Tensor) else weight}")
    for name, t in (("x", x), ("weight", weight), ("scale", scale), ("bias", bias)):
        check_dense(name, t)
    c, d = weight.shape
    if x.dim() < 1 or x.shape[-1] != d:
        raise ValueError(f"x must have shape (..., {d}) to match weight's (C, D) = {tuple(weight.shape)}, "
                         f"got {tuple(x.shape)}")
    if d == 0:
        raise ValueError("x and weight must have D >= 1 features, got D=0")
    for name, t, shapes in (("scale", scale, ((), (c,))), ("bias", bias, ((c,),))):
        if t is None or (name == "scale" and _is_real(t)):
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be {'a real number' if name == 'scale' else 'None'} or a tensor, "
                            f"got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if tuple(t.shape) not in shapes:
            raise ValueError(f"{name} must have shape {' or '.join(map(str, shapes))}, got {tuple(t.shape)}")
    for name, t in (("weight", weight), ("scale", scale), ("bias", bias)):
        if isinstance(t, torch.Tensor) and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    # The weight is normalized in its own dtype: float32 for a float32 weight
    # beside float64 features (eps = 1e-300 was 0 there, a zero row's logits NaN).
    weight_eps = flag("normalize_weight", normalize_weight) and float32_options(weight.dtype)
    _finite_float("eps", eps, lo=0.0, lo_open=True, float32=float32_options(x.dtype) or weight_eps)


def cosine_logits(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    scale: float | torch.Tensor = 1.0,
    bias: torch.Tensor | None = None,
    normalize_input: bool = True,
    normalize_weight: bool = True,
    eps: float = 1e-12,
) -> torch.Tensor:
    """The logits of a cosine head, without margins (they are a training
    device): what ``nnk.CosineLinear`` returns. Replaces::

        scale * (F.normalize(x, dim=-1, eps=eps) @ F.normalize(weight, dim=1, eps=eps).T) + bias

    formed in float32 (float64 for float64 x) whatever the input dtypes.
    Differentiable; the normalizations go through nnk::row_normalize when the
    extension is built (autograd then keeps no float64 copy of the weight).
    Materializes the (..., C) logits: for the top classes of a large head use
    :func:`cosine_topk`, for the loss :func:`cosine_cross_entropy`.

    Args:
        x: (..., D) floating-point features.
        weight: (C, D) floating-point class weights. Of another dtype than
            x's, the result is in x's accumulation dtype, but the weight is
            normalized in its own (float32 for a float32 weight: with float64
            x the cosines are then accurate to ~1e-8, not float64's 1e-16;
            cast the weight to float64 for that).
        scale: a real number, a 0-d or a (C,) float tensor (not checked to be > 0).
        bias: (C,) float tensor or None.
        normalize_input, normalize_weight, eps: as :func:`cosine_cross_entropy`
            (eps > 0, a normal float32 unless x is float64).

    Under ``torch.autocast`` the cosine GEMM runs in the autocast dtype (the
    cosines then carry its rounding, about 2^-9 relative in bfloat16); the
    result is float32 all the same. ``torch.fx.symbolic_trace`` keeps it as
    one node inside ``CosineLinear``; a module of your own that calls it gets
    the same with ``from nnk import cosine_logits`` and
    ``torch.fx.wrap("cosine_logits")`` at its top level (fx then cannot
    trace into its checks).

    Returns:
        (..., C) float32 (float64 for float64 x) logits; for 2-D x the
        logits tensor itself, not a view.
    """
    _check_head(x, weight, scale, bias, eps, normalize_weight)
    normalize_input, normalize_weight = flag("normalize_input", normalize_input), flag("normalize_weight",
                                                                                      normalize_weight)
    d = weight.shape[1]
    logits = cosine_logits_ref(
        x.reshape(-1, d), weight, scale=scale, bias=bias, normalize_input=normalize_input,
        normalize_weight=normalize_weight, eps=eps, normalize=normalized_rows,
    )
    # (FSDP2 warns about module outputs that are views: an in-place op on one skips its hooks.)
    return logits if x.dim() == 2 else logits.reshape(*x.shape[:-1], weight.shape[0])


@torch.no_grad()
def cosine_topk(
    x: torch.Tensor,
    weight: torch.Tensor,
    k: int = 1,
    *,
    scale: float | torch.Tensor = 1.0,
    bias: torch.Tensor | None = None,
    normalize_input: bool = True,
    normalize_weight: bool = True,
    eps: float = 1e-12,
    block_classes: int | None = None,
):
    """The k best classes of each row of x and their cosines, without the
    (N, C) logits: what ``nnk.CosineLinear.predict`` returns. Replaces::

        logits = nnk.cosine_logits(x, weight, scale=scale, bias=bias, ...)
        classes = logits.topk(k).indices
        cosines = nnk.cosine_logits(x, weight, ...).gather(-1, classes)   # scale 1, no bias

    Rows x classes are scored in tiles of about 2^21 logits and 2^21 weight
    entries (up to 1024 rows; ``block_classes`` columns if given), each tile's
    top k merged into a running top k per row: extra memory O(tile + N k),
    whatever C. Not differentiable (inference).

    Args:
        x: (..., D) floating-point features.
        weight: (C, D) floating-point class weights.
        k: 1 <= k <= C.
        scale, bias, normalize_input, normalize_weight, eps: as :func:`cosine_logits`;
            they set the ranking (with a scalar scale and no bias: by cosine).
        block_classes: classes per tile (None: the memory bound above).

    Returns:
        ``(classes, cosines)``: (..., k) int64 and (..., k) float32 (float64
        for float64 x), best first. Ties may be ordered differently from topk.
    """
    _check_head(x, weight, scale, bias, eps, normalize_weight)
    k = int_option("k", k, lo=1, hi=weight.shape[0])
    if block_classes is not None:
        block_classes = int_option("block_classes", block_classes, lo=1)
    d = weight.shape[1]
    _, classes, cosines = logits_topk(
        x.reshape(-1, d), weight, k, scale=scale, bias=bias, normalize_input=flag("normalize_input", normalize_input),
        normalize_weight=flag("normalize_weight", normalize_weight), eps=eps, block_classes=block_classes,
    )
    lead = x.shape[:-1]
    return classes.reshape(*lead, k), cosines.reshape(*lead, k)
