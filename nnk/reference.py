"""The specification of every nnk op, in plain PyTorch.

Each ``*_ref`` function here is the definition that the kernels (torch
blockwise, Triton, CUDA), the tests and the benchmarks are checked against.
They materialize the N x C logits and rely on autograd, so they are simple
rather than lean. Accumulation is float32 whatever the input dtype (float64
stays float64, so gradcheck can run on them).

The per-element formulas (margin value and derivative, normalization
backward) mirror ``csrc/include/nnk/math.h`` line for line.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Lower bound on sin(theta) in the exact ArcFace derivative; see math.h.
ARC_SIN_MIN = 1e-3


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of nnk for inputs of ``dtype``: float32, or float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# Rows per float64 temporary of row_norm_ref: 2^22 elements (32 MiB), so that
# the norms of a (C, D) classifier never hold a float64 copy of it (twice the
# size of a float32 weight: 4 GiB at C = 1M, D = 512).
NORM_CHUNK_ELEMENTS = 1 << 22


def row_norm_ref(x: torch.Tensor) -> torch.Tensor:
    """Row L2 norms of (N, D) x in the accumulation dtype. The squares are summed
    in float64: exact in range for any float32/float16/bfloat16 input, where a
    float32 sum overflows above |x| ~ 1e19 (and F.normalize then returns 0).
    Rows go through float64 in chunks of NORM_CHUNK_ELEMENTS."""
    acc = acc_dtype(x.dtype)
    rows = max(1, NORM_CHUNK_ELEMENTS // max(x.shape[1], 1))
    if x.shape[0] <= rows:
        return torch.linalg.vector_norm(x.to(torch.float64), dim=1).to(acc)
    return torch.cat([torch.linalg.vector_norm(part.to(torch.float64), dim=1).to(acc) for part in x.split(rows)])


def normalize_ref(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``F.normalize(x, dim=1, eps=eps)`` in the accumulation dtype, with the
    overflow-free norms of :func:`row_norm_ref` (differentiable)."""
    return x.to(acc_dtype(x.dtype)) / row_norm_ref(x).clamp_min(eps)[:, None]


def row_normalize_ref(x: torch.Tensor, eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """``(F.normalize(x, dim=1, eps=eps), x.norm(dim=1))`` for (N, D) x, computed
    in the accumulation dtype; y in x's dtype, the norms in float32 (float64)."""
    norm = row_norm_ref(x)
    y = x.to(norm.dtype) / norm.clamp_min(eps)[:, None]
    # No .to() that changes nothing: an autograd.Function output that went
    # through one (the same tensor as an intermediate) got a zero gradient
    # under torch.compile in torch 2.11 (ops.row_normalize's fallback;
    # test_row_normalize_fallback_under_compile; the aliasing bug of
    # pytorch/pytorch#180642).
    return (y if y.dtype == x.dtype else y.to(x.dtype)), norm


def row_normalize_backward_ref(
    grad_y: torch.Tensor, y: torch.Tensor, norm: torch.Tensor, eps: float = 1e-12
) -> torch.Tensor:
    """``(g - y <y, g>) / ||x||`` where ``||x|| > eps``, else ``g / eps``; in y's dtype."""
    acc = acc_dtype(y.dtype)
    g, ya, na = grad_y.to(acc), y.to(acc), norm.to(acc)
    dot = (g * ya).sum(dim=1, keepdim=True)
    proj = (g - ya * dot) / na.clamp_min(eps)[:, None]
    return torch.where((na > eps)[:, None], proj, g / eps).to(y.dtype)


def _arc_sine(cc: torch.Tensor, m: float, sin_t: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(on ArcFace's branch, sin(theta)) of the clamped target cosines cc:
    ``cc >= -cos m`` (theta + m <= pi) and sqrt(1 - cc^2), or both from the
    given ``sin_t`` (:func:`target_sine_ref`'s: the branch where it is >= 0)."""
    if sin_t is not None:
        return sin_t >= 0.0, sin_t.to(cc.dtype)
    return cc >= -math.cos(m), (1.0 - cc * cc).clamp_min(0.0).sqrt()


def margin_value_ref(cos_t: torch.Tensor, angular_margin: float, additive_margin: float,
                     sin_t: torch.Tensor | None = None) -> torch.Tensor:
    """psi: the target cosine after the margins.

    ``cos(theta + m) - m_add`` with ``theta = acos(clamp(cos_t, -1, 1))`` where
    ``theta + m <= pi``, else the ArcFace fallback ``cos_t - m sin m - m_add``.
    An angular margin of 0 leaves ``cos_t`` unclamped (plain linear heads).
    ``sin_t`` (optional, (N,)): :func:`target_sine_ref`'s, from a more exact
    cosine: sin(theta), used instead of ``sqrt(1 - cos_t^2)``, and the branch
    (-1: the fallback), taken instead of ``cos_t >= -cos m``."""
    if angular_margin == 0.0:
        return cos_t - additive_margin
    m = angular_margin
    cc = cos_t.clamp(-1.0, 1.0)
    arc, sin_t = _arc_sine(cc, m, sin_t)
    psi = torch.where(arc, cc * math.cos(m) - sin_t * math.sin(m), cc - m * math.sin(m))
    return psi - additive_margin


def margin_grad_ref(cos_t: torch.Tensor, angular_margin: float, exact: bool,
                    sin_t: torch.Tensor | None = None) -> torch.Tensor:
    """d psi / d cos_t: ``cos m + sin m cos_t / max(sin theta, ARC_SIN_MIN)`` on the
    ArcFace branch, 1 on the fallback branch, without an angular margin, and in
    the detached mode (psi - cos_t taken as a constant). ``sin_t`` as in
    :func:`margin_value_ref`."""
    if not exact or angular_margin == 0.0:
        return torch.ones_like(cos_t)
    m = angular_margin
    cc = cos_t.clamp(-1.0, 1.0)
    arc, sin_t = _arc_sine(cc, m, sin_t)
    return torch.where(arc, math.cos(m) + math.sin(m) * cc / sin_t.clamp_min(ARC_SIN_MIN), torch.ones_like(cc))


class _Margin(torch.autograd.Function):
    """psi(cos_t) with the finite derivative of :func:`margin_grad_ref`. A
    separate setup_context and a generated vmap rule let ``torch.func``
    (grad, vmap, jacrev) run through the reference."""

    generate_vmap_rule = True

    @staticmethod
    def forward(cos_t, angular_margin, additive_margin, exact):
        return margin_value_ref(cos_t, angular_margin, additive_margin)

    @staticmethod
    def setup_context(ctx, inputs, output):
        cos_t, angular_margin, _, exact = inputs
        ctx.save_for_backward(cos_t)
        ctx.angular_margin, ctx.exact = angular_margin, exact

    @staticmethod
    def backward(ctx, grad):
        (cos_t,) = ctx.saved_tensors
        return grad * margin_grad_ref(cos_t, ctx.angular_margin, ctx.exact), None, None, None


def target_margin_ref(cos_t: torch.Tensor, angular_margin: float, additive_margin: float,
                      exact: bool = True) -> torch.Tensor:
    """psi(cos_t) of :func:`margin_value_ref`, differentiable with the finite
    derivative of :func:`margin_grad_ref` (``exact=False``: d psi / d cos = 1,
    the straight-through ``margin_grad="detached"``). cos_t: (N,) target
    cosines in the accumulation dtype."""
    return _Margin.apply(cos_t, float(angular_margin), float(additive_margin), exact)


def target_sine_ref(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *,
                    angular_margin: float, eps: float = 1e-12) -> torch.Tensor:
    """ArcFace's per-row terms from float64 sums: with ``c = <x_i, w_t> /
    (max(||x_i||, eps) max(||w_t||, eps))`` in float64, sin(theta_i) =
    ``sqrt((1 - c)(1 + c))`` where ``c >= -cos m`` (theta + m <= pi, ArcFace's
    branch), else -1 (the fallback branch, which uses no sine); (N,) float32,
    NaN for a NaN row. x (N, D) and weight (C, D) float16 / bfloat16 /
    float32, target (N,) int64 in [0, C) (ignored rows mapped to any class by
    the caller), ``angular_margin`` m (required: with 0, no row would take the
    fallback). The branch is right unless the row's cosine is within float64
    rounding (~1e-16 times a few) of -cos m, e.g. exactly parallel rows at m = pi,
    whose float64 cosine lands on either side of 1.

    Why float64: sin(theta) = sqrt(1 - cos^2) turns a float32 cosine's rounding
    (~6e-8) into a relative error of ~6e-8 / theta^2, which ArcFace's margin
    (cos(theta + m) = c cos m - sin(theta) sin m) and its derivative (~sin m /
    sin(theta)) carry into the loss and the gradients of rows close to their
    class: 1e-4 relative at theta = 0.03. And a float32 cosine within its
    rounding of -cos m may take the other branch than the exact one, where
    psi jumps (by 2 at m = pi). The float32 tile cosine keeps its (small)
    absolute error; the sine and the branch come from here. O(N D) work, rows
    through float64 in chunks of NORM_CHUNK_ELEMENTS (one chunk while
    torch.compile traces: a loop over N would specialize N). The Triton and
    CUDA kernels compute the same sums in float64 without the copies."""
    rows = max(1, NORM_CHUNK_ELEMENTS // max(x.shape[1], 1))
    chunks = [(x, target)] if torch.compiler.is_compiling() else zip(x.split(rows), target.split(rows))
    parts = []
    for xs, ts in chunks:
        xs, ws = xs.to(torch.float64), weight[ts].to(torch.float64)
        den = (torch.linalg.vector_norm(xs, dim=1).clamp_min(eps)
               * torch.linalg.vector_norm(ws, dim=1).clamp_min(eps))
        c = ((xs * ws).sum(dim=1) / den).clamp(-1.0, 1.0)
        sine = ((1.0 - c) * (1.0 + c)).clamp_min(0.0).sqrt()
        parts.append(torch.where(c < -math.cos(angular_margin), -1.0, sine).to(torch.float32))
    return torch.cat(parts) if len(parts) != 1 else parts[0]


def scale_tensor_ref(scale, dtype: torch.dtype, device) -> torch.Tensor:
    """The scale s (a Python float, or a 0-d / (C,) tensor, possibly requiring
    grad) as a tensor of ``dtype``: what multiplies the cosines."""
    if isinstance(scale, torch.Tensor):
        return scale.to(dtype)
    # full(), not tensor(): no blocking host-to-device copy on a GPU.
    return torch.full((), float(scale), dtype=dtype, device=device)


def cosine_logits_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    scale=1.0,
    bias: torch.Tensor | None = None,
    normalize_input: bool = True,
    normalize_weight: bool = True,
    eps: float = 1e-12,
    normalize=normalize_ref,
) -> torch.Tensor:
    """``scale * (normalize(x) @ normalize(weight).T) + bias`` in float32 (float64),
    without margins: the logits a cosine head predicts with. x (N, D), weight
    (C, D), scale a float, 0-d or (C,) tensor, bias (C,) or None; returns (N, C).
    ``normalize(t, eps)``: the row normalization, returning t's rows in the
    accumulation dtype (CosineLinear passes nnk.ops.row_normalize's, whose
    autograd keeps no float64 copy of the weight). The result is float32
    (float64) also under torch.autocast, whose dtype the product runs in."""
    acc = acc_dtype(x.dtype)
    xa = normalize(x, eps) if normalize_input else x.to(acc)
    # .to(acc): a weight of another dtype (a float64 head on float32 features) computes in x's.
    wa = (normalize(weight, eps) if normalize_weight else weight).to(acc)
    # .to(acc): under torch.autocast the product comes out in the autocast
    # dtype; s * cos is formed in float32 (float64) all the same.
    logits = (xa @ wa.T).to(acc) * scale_tensor_ref(scale, acc, x.device)
    if bias is not None:
        logits = logits + bias.to(acc)
    return logits


def cosine_cross_entropy_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    scale=1.0,
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
):
    """The specification of :func:`nnk.cosine_cross_entropy` (see its docstring
    for the arguments), materializing the (N, C) logits:

    ``cos = normalize(x) @ normalize(weight).T``; on each row's target column
    ``psi = margin_value_ref(cos_t)``; ``logits = scale * cos`` with
    ``scale[y] * psi`` at the target, ``+ bias``; the row loss is
    ``F.cross_entropy(logits, target, ignore_index, label_smoothing, "none")
    + z_loss * lse**2`` on non-ignored rows, reduced as ``F.cross_entropy``
    reduces. Returns the loss (float32, float64 for float64 input), and the
    (N,) log-sum-exp of the logits when ``return_lse`` (differentiable).
    """
    acc = acc_dtype(x.dtype)
    n, c = x.shape[0], weight.shape[0]
    target = target.long()
    valid = target != ignore_index
    safe_t = torch.where(valid, target, torch.zeros_like(target))
    cos = cosine_logits_ref(
        x, weight, scale=1.0, normalize_input=normalize_input,
        normalize_weight=normalize_weight, eps=eps,
    )
    s = scale_tensor_ref(scale, acc, x.device)
    if n > 0 and c > 0:
        cos_t = cos.gather(1, safe_t[:, None]).squeeze(1)
        psi = target_margin_ref(cos_t, angular_margin, additive_margin, margin_grad == "exact")
        # Ignored rows keep their plain cosine, so that their lse is the plain one.
        psi = torch.where(valid, psi, cos_t)
        s_t = s[safe_t] if s.dim() == 1 else s
        logits = (cos * s).scatter(1, safe_t[:, None], (psi * s_t)[:, None])
    else:
        logits = cos * s
    if bias is not None:
        logits = logits + bias.to(acc)
    row = F.cross_entropy(
        logits, target, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="none"
    )
    lse = torch.logsumexp(logits, dim=1)
    if z_loss != 0.0:
        # where, not * valid: a "mean" over no valid row sends inf to every
        # row's gradient, and inf * 0 would make the ignored rows' NaN.
        row = row + torch.where(valid, z_loss * lse.square(), 0.0)
    loss = reduce_rows(row, valid, reduction)
    return (loss, lse) if return_lse else loss


def reduce_rows(row: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce per-row losses (zero on ignored rows) as ``F.cross_entropy`` does:
    ``"mean"`` divides by the number of non-ignored rows (NaN when all are
    ignored), ``"sum"`` adds, ``"none"`` returns the (N,) rows."""
    if reduction == "none":
        return row
    if reduction == "sum":
        return row.sum()
    return row.sum() / valid.sum().to(row.dtype)


# --- Neural-collapse statistics --------------------------------------------


def _batched(features: torch.Tensor):
    return (features[None], True) if features.dim() == 2 else (features, False)


def nc_class_sums_ref(features: torch.Tensor, labels: torch.Tensor, num_classes: int):
    """Per-class counts and feature sums.

    features (N, D) or (B, N, D), any float dtype; labels (N,) int in [0, K).
    Returns counts (K,) int64 and sums (K, D) or (B, K, D) in float64 for
    every input dtype: ``sums[b, k] = sum_{i: y_i = k} features[b, i]``. A
    float32 sum of n rows is off by ~n u |mu|, and the statistics see that
    squared in Sigma_W: more than the within-class scatter of collapsed
    features at a few thousand samples per class."""
    h, squeeze = _batched(features)
    counts = torch.bincount(labels.long(), minlength=num_classes)
    sums = torch.zeros(h.shape[0], num_classes, h.shape[2], dtype=torch.float64, device=h.device)
    sums.index_add_(1, labels.long(), h.to(torch.float64))
    return counts, (sums[0] if squeeze else sums)


# Rows per float32 Gram product of nc_centered_gram_ref, whose products are
# summed in float64: one float32 product over N rows had an error growing
# with N (6e-5 relative at N = 200k, D = 8, against 6e-8 in chunks, at about
# the same speed on a CPU).
GRAM_CHUNK_ROWS = 1024


def nc_centered_gram_ref(features: torch.Tensor, labels: torch.Tensor, shifts: torch.Tensor):
    """Gram of the features centered on a per-class shift:
    ``G[b] = sum_i (h_bi - c_b[y_i]) (h_bi - c_b[y_i])^T``.

    features (N, D) or (B, N, D); labels (N,); shifts (K, D) or (B, K, D).
    Returns (D, D) or (B, D, D) in the accumulation dtype of the features
    (float32; float64 for float64 features or shifts): float32 products of
    GRAM_CHUNK_ROWS rows, summed in float64 and rounded once."""
    h, squeeze = _batched(features)
    c, _ = _batched(shifts)
    if shifts.dim() == 3 and (squeeze or shifts.shape[0] != h.shape[0]):
        raise ValueError(f"shifts must be (K, D), or (B, K, D) with the B of 3-D features; "
                         f"got shape {tuple(shifts.shape)} for features {tuple(features.shape)}")
    acc = acc_dtype(torch.promote_types(h.dtype, c.dtype))
    labels, c = labels.long(), c.to(acc)
    if acc == torch.float64:
        centered = h.to(acc) - c[:, labels]
        gram = centered.transpose(1, 2) @ centered
    else:
        gram = torch.zeros(h.shape[0], h.shape[2], h.shape[2], dtype=torch.float64, device=h.device)
        for r0 in range(0, h.shape[1], GRAM_CHUNK_ROWS):
            rows = slice(r0, r0 + GRAM_CHUNK_ROWS)
            centered = h[:, rows].to(acc) - c[:, labels[rows]]
            gram += centered.transpose(1, 2) @ centered
        gram = gram.to(acc)
    return gram[0] if squeeze else gram
