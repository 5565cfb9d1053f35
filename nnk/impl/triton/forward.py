"""Forward kernel of the Triton cosine cross-entropy and its launcher.

One program owns BLOCK_N rows and one contiguous range of class tiles (a
"class split"; one split covers all classes unless the rows alone are too few
to fill the GPU). Per class tile: the raw dot ``x W^T`` on tensor cores, the
division by the row and column norms, the margin on the target column, then an
online (max, rest) log-sum-exp in float32. Per split it writes the running
max, the sum of the other exponentials (nnk/impl/lse.py) and (label
smoothing) sum of logits: O(N x splits) values,
plus the target cosine and logit of each row (O(N)) from the split that
holds the target. The N x C logits never exist.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..._options import CCEOptions
from ..lse import merge_partials
from . import configs
from .launch import PerDeviceAutotune, check_inputs, dtype_args, launch, margin_args, shape_buckets
from .norms import row_norms, target_sines
from .tile import _col_terms, _cosine_tile, _logits, _row_terms, _target_logit, _target_sine


@triton.jit
def _cce_fwd_kernel(
    X_ptr, W_ptr, T_ptr, XNORM_ptr, WNORM_ptr, S_ptr, B_ptr, SINT_ptr,
    MAX_ptr, REST_ptr, SUMZ_ptr, COST_ptr, ZT_ptr,
    N, C, D,
    stride_xn, stride_xd, stride_wc, stride_wd,
    ignore_index, eps, cos_m, sin_m, arc_fallback, additive,
    N_BUCKET, C_BUCKET,
    NORM_X: tl.constexpr, NORM_W: tl.constexpr, HAS_CLASS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_ARC: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # 1. This program's rows and their per-row terms.
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, t, valid, den_x, live_x, s_t, b_t = _row_terms(
        T_ptr, XNORM_ptr, S_ptr, B_ptr, rows, N, ignore_index, eps, NORM_X, HAS_CLASS_SCALE, HAS_BIAS)
    sin_t = _target_sine(SINT_ptr, rows, valid, HAS_ARC)

    # 2. The class tiles of this split: [tile_lo, tile_hi), balanced to one tile.
    n_tiles = tl.cdiv(C, BLOCK_C)
    tile_lo = split * n_tiles // n_splits
    tile_hi = (split + 1) * n_tiles // n_splits

    # 3. Online log-sum-exp over the tiles as (max, rest), rest the sum of
    #    exp(z - max) but for one entry at the max (math.h lse_merge,
    #    nnk/impl/lse.py): a confident row's small rest is not rounded against
    #    the max's 1. A row's tiles can all be -inf so far (a -inf bias
    #    masking the leading classes): the exponentials then shift by 0
    #    instead of the -inf max, whose exp(-inf - -inf) would be NaN.
    run_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    run_rest = tl.zeros((BLOCK_N,), tl.float32)
    sum_z = tl.zeros((BLOCK_N,), tl.float32)
    cos_t = tl.zeros((BLOCK_N,), tl.float32)
    for tile in range(tile_lo, tile_hi):
        cols = tile * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
        col_mask = cols < C
        den_w, live_w, s_c, b_c = _col_terms(WNORM_ptr, S_ptr, B_ptr, cols, col_mask, eps,
                                             NORM_W, HAS_CLASS_SCALE, HAS_BIAS)
        cos = _cosine_tile(X_ptr, W_ptr, rows, cols, row_mask, col_mask, den_x, den_w, D,
                           stride_xn, stride_xd, stride_wc, stride_wd, UPCAST, DOT_PRECISION,
                           BLOCK_N, BLOCK_C, BLOCK_D)
        # The margin is evaluated per row (O(BLOCK_N)), not on the whole tile.
        is_t = valid[:, None] & (cols[None, :] == t[:, None])
        cos_t_tile = tl.sum(tl.where(is_t, cos, 0.0), axis=1)
        psi, z_t = _target_logit(cos_t_tile, sin_t, s_t, b_t, cos_m, sin_m, arc_fallback,
                                 additive, HAS_ARC)
        z = tl.where(col_mask[None, :], _logits(cos, is_t, z_t, s_c, b_c), float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        # The tile's entries at the new max add 1 each, but one of them when
        # the max is new (then the old partial adds its 1 as well, scaled).
        at_max = z == new_max[:, None]
        ties = tl.sum(at_max.to(tl.float32), axis=1)
        tile_rest = tl.sum(tl.where(at_max, 0.0, tl.exp(z - shift[:, None])), axis=1)
        old = tl.where(run_max == new_max, run_rest + ties,
                       (run_rest + 1.0) * tl.exp(run_max - shift) + (ties - 1.0))
        # No finite entry yet: rest stays what the non-(-inf) entries gave (0, or NaN
        # from NaN logits, which tl.max drops).
        run_rest = tl.where(new_max == float("-inf"), run_rest + tile_rest, old + tile_rest)
        run_max = new_max
        if HAS_SMOOTHING:
            sum_z += tl.sum(tl.where(col_mask[None, :], z, 0.0), axis=1)
        cos_t += cos_t_tile

    # 4. Partials of this split; the target cosine and logit from the one
    #    split whose tiles hold the target (recomputed from cos_t with the same
    #    function, so bitwise the value the tile used).
    part = split.to(tl.int64) * N + rows
    tl.store(MAX_ptr + part, run_max, mask=row_mask)
    tl.store(REST_ptr + part, run_rest, mask=row_mask)
    if HAS_SMOOTHING:
        tl.store(SUMZ_ptr + part, sum_z, mask=row_mask)
    t_tile = tl.where(valid, t, 0) // BLOCK_C
    owner = valid & (t_tile >= tile_lo) & (t_tile < tile_hi)
    psi, z_t = _target_logit(cos_t, sin_t, s_t, b_t, cos_m, sin_m, arc_fallback, additive,
                             HAS_ARC)
    tl.store(COST_ptr + rows, cos_t, mask=owner)
    tl.store(ZT_ptr + rows, z_t, mask=owner)


_cce_fwd_tuned = PerDeviceAutotune(
    _cce_fwd_kernel,
    configs=configs.FWD_CONFIGS,
    key=["N_BUCKET", "C_BUCKET", "D", "NORM_X", "NORM_W", "HAS_CLASS_SCALE", "HAS_BIAS", "HAS_ARC",
         "HAS_SMOOTHING"],
)


@dataclass
class ForwardResult:
    row: torch.Tensor     # (N,) float32 row losses, 0 on ignored rows
    lse: torch.Tensor     # (N,) float32 log-sum-exp of the logits
    lse_lo: torch.Tensor  # (N,) float32 m + log1p(rest) - lse, exactly (lse rounds it): see step 3
    cos_t: torch.Tensor   # (N,) float32 target cosine before the margin (0 on ignored rows)
    sin_t: torch.Tensor | None  # (N,) float32 target sin(theta), -1 on the fallback (angular margin only)
    xnorm: torch.Tensor | None  # (N,) float32 ||x_i|| when normalizing x
    wnorm: torch.Tensor | None  # (C,) float32 ||w_c|| when normalizing W


def cce_forward(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None, opts: CCEOptions, class_splits: int | None = None) -> ForwardResult:
    """Row losses and log-sum-exp of the cosine cross-entropy.

    Args:
        x: (N, D) float16 / bfloat16 / float32, any strides.
        weight: (C, D), x's dtype, any strides.
        target: (N,) int64 contiguous, in [0, C) or ``opts.ignore_index``.
        scale: (1,) or (C,) float32, contiguous (the scalar or per-class s).
        bias: (C,) float32 contiguous, or None.
        opts: the checked options.
        class_splits: programs per row block (default: :func:`configs.num_splits`).

    Raises:
        TypeError, ValueError: for tensors of another type, dtype, shape,
            device or layout (``launch.check_inputs``, without a host sync).
            The values are not checked here: a target outside [0, C) (and
            not ``ignore_index``) or a scale that is not finite and > 0 is
            rejected by ``nnk._options.check_tensors`` before the backends run.

    Replaces ``nnk.reference.cosine_cross_entropy_ref(..., reduction="none",
    return_lse=True)`` (the row losses, before reduction) without the N x C logits.
    """
    check_inputs("cce_forward", x, weight, target, scale, bias)
    n, d = x.shape
    c = weight.shape[0]
    dev = x.device
    # 1. Row norms in float32 (O((N + C) D) reads; what the tiles scale by).
    xnorm = row_norms(x) if opts.normalize_input else None
    wnorm = row_norms(weight) if opts.normalize_weight else None
    #    ArcFace's sin(theta) and branch per row from float64 sums (O(N D)): norms.target_sines.
    sin_t = target_sines(x, weight, target, opts) if opts.angular_margin != 0.0 else None

    # 2. Per-split partial LSE terms, target cosine and logit.
    splits = class_splits or configs.num_splits(
        triton.cdiv(n, configs.NOMINAL_BLOCK_N), c, configs.NOMINAL_BLOCK_C, dev)
    smoothing = opts.label_smoothing != 0.0
    parts = torch.empty((3 if smoothing else 2, splits, n), dtype=torch.float32, device=dev)
    cos_t = torch.zeros(n, dtype=torch.float32, device=dev)
    z_t = torch.zeros(n, dtype=torch.float32, device=dev)
    if n > 0:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits)  # noqa: E731
        launch(
            _cce_fwd_tuned, grid, opts.deterministic, configs.FIXED_FWD,
            x, weight, target, xnorm, wnorm, scale, bias, sin_t,
            parts[0], parts[1], parts[2] if smoothing else None, cos_t, z_t,
            n, c, d, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
            opts.ignore_index, opts.eps, **margin_args(opts), **shape_buckets(n, c),
            NORM_X=opts.normalize_input, NORM_W=opts.normalize_weight,
            HAS_CLASS_SCALE=scale.numel() > 1,
            HAS_BIAS=bias is not None, HAS_SMOOTHING=smoothing,
            **dtype_args(x.dtype),
        )

    # 3. Merge the splits (O(N x splits), nnk/impl/lse.py): lse = m + log1p(rest),
    #    and what rounding that sum to float32 dropped (Knuth's TwoSum, exact):
    #    the backward's p = exp((z - lse) - lse_lo) then errs as log_softmax's
    #    (z - m) - log sum does, not by half an ulp of |lse| (4e-6 at s = 64,
    #    which made gradient errors up to 7x the reference's).
    #    A row with no finite logit gets lse = -inf and lse_lo = 0, a row holding
    #    +inf lse = +inf (as torch.logsumexp) and lse_lo = NaN, which makes its loss
    #    and every p = exp((z - lse) - lse_lo) NaN, as F.cross_entropy's (math.h
    #    lse_finish).
    run_max, rest = merge_partials(parts[0], parts[1])
    log_sum = rest.log1p()
    lse = run_max + log_sum
    part = lse - run_max
    lse_lo = torch.where(lse.isfinite(), (run_max - (lse - part)) + (log_sum - part),
                         torch.where(lse == float("inf"), float("nan"), 0.0))

    # 4. Row loss = lse - (1 - ls) z_t - (ls / C) sum_c z_c + zl lse^2, 0 if ignored,
    #    grouped as math.h's row_loss: (1 - ls)((lse - z_t) + lse_lo) + ls ((lse - sum_z / C)
    #    + lse_lo) (each difference exact where it vanishes, e.g. C = 1; lse_lo restores
    #    what rounding lse dropped, which is the whole error of a confident row's loss).
    ls = opts.label_smoothing
    row = (lse - z_t) + lse_lo
    if smoothing:
        row = (1.0 - ls) * row + ls * ((lse - parts[2].sum(dim=0) / c) + lse_lo)
    if opts.z_loss:
        row = row + opts.z_loss * lse.square()
    row = torch.where(target != opts.ignore_index, row, torch.zeros_like(row))
    return ForwardResult(row, lse, lse_lo, cos_t, sin_t, xnorm, wnorm)
