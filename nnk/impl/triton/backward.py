"""Backward kernel of the Triton cosine cross-entropy and its launcher.

Each program recomputes logit tiles with the forward's device functions,
turns them into d logits on the spot and contracts them with the raw rows:

    dz   = g (p - (1 - ls) [c == y] - ls / C) + (2 zl lse g + g_lse) p   (the last term added apart)
    dcos = dz s_c, on the target column dz s_y dpsi/dcos
    d xn_i += sum_j (dcos_ij / ||w_j||) w_j,   d wn_j += sum_i (dcos_ij / ||x_i||) x_i
                                    (norms clamped below at eps, raw rows w_j, x_i)
    d s_c += sum_i dz_ic cos'_ic (cos' = psi on the target),   d b_c += sum_i dz_ic

(``p = exp((z - lse) - lse_lo)``; ``g``, ``g_lse`` the gradients of the row loss, zeroed
on ignored rows, and of the lse output). The kernel is written once for two
loop orders:

* ROW_MAJOR: a program owns a row block and walks the class tiles of its
  split; d xn accumulates in its own float32 rows of a per-split buffer
  (no atomics). In the default mode the same pass adds d wn, d s, d b with
  float32 atomics (relaxed; only atomicity is needed): one recomputation of
  the logits serves both gradients.
* class-major (deterministic mode, for d wn, d s, d b): a program owns a
  class block and walks the row tiles of its split in order, accumulating in
  its own rows of a per-split buffer. Per-split buffers are summed in a fixed
  order afterwards, so every result is bitwise reproducible, at the price of
  a second recomputation of the logits.

d xn and d wn then go through the normalizations in norms.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..._options import CCEOptions
from . import configs
from .launch import PerDeviceAutotune, check_inputs, check_vector, dtype_args, launch, margin_args, shape_buckets
from .norms import normalize_backward
from .tile import (
    _accumulate, _col_terms, _cosine_tile, _grad_dot, _grad_operand, _load_tile, _logits, _margin_grad,
    _row_terms, _target_logit, _target_sine,
)


@triton.jit
def _row_grad_terms(T_ptr, XNORM_ptr, S_ptr, B_ptr, COST_ptr, SINT_ptr, LSE_ptr, LSELO_ptr, G_ptr, GLSE_ptr, rows, N, C,
                    ignore_index, eps, label_smoothing, z_loss,
                    cos_m, sin_m, arc_fallback, additive,
                    NORM_X: tl.constexpr, HAS_CLASS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                    HAS_ARC: tl.constexpr, EXACT_MARGIN: tl.constexpr):
    """Per row: the terms of :func:`_row_terms`, the target's psi, logit and
    d psi / d cos from the forward's stored cosine (bitwise the forward's
    target logit), lse, and the coefficients g, coef_z of :func:`_dlogit`."""
    row_mask, t, valid, den_x, live_x, s_t, b_t = _row_terms(
        T_ptr, XNORM_ptr, S_ptr, B_ptr, rows, N, ignore_index, eps, NORM_X, HAS_CLASS_SCALE, HAS_BIAS)
    cos_t = tl.load(COST_ptr + rows, mask=valid, other=0.0)
    sin_t = _target_sine(SINT_ptr, rows, valid, HAS_ARC)
    psi, z_t = _target_logit(cos_t, sin_t, s_t, b_t, cos_m, sin_m, arc_fallback, additive, HAS_ARC)
    dpsi = _margin_grad(cos_t, sin_t, cos_m, sin_m, HAS_ARC, EXACT_MARGIN)
    lse = tl.load(LSE_ptr + rows, mask=row_mask, other=0.0)
    lse_lo = tl.load(LSELO_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(G_ptr + rows, mask=valid, other=0.0)
    g_lse = tl.load(GLSE_ptr + rows, mask=row_mask, other=0.0)
    # The z-loss and lse terms apart from g's (_dlogit); z_loss * g first
    # (math.h dlogit: no inf * 0 on rows without upstream gradient).
    coef_z = 2.0 * (z_loss * g) * lse + g_lse
    # A row without a finite logit (lse = -inf: a -inf bias on every class of
    # a class-parallel shard) and without upstream gradient (the combined loss
    # gives such a shard's terms zero weight) gets p = exp(z - inf) = 0, not
    # exp(-inf + inf) = NaN; with an upstream gradient its NaN propagates as
    # F.cross_entropy's (math.h dlogit).
    empty = (lse == float("-inf")) & (g == 0.0) & (g_lse == 0.0)
    coef_z = tl.where(empty, 0.0, coef_z)
    lse_lo = tl.where(empty, 0.0, lse_lo)
    lse = tl.where(empty, float("inf"), lse)
    return row_mask, t, valid, den_x, live_x, s_t, psi, z_t, dpsi, lse, lse_lo, g, coef_z


@triton.jit
def _expm1(u):
    """exp(u) - 1 within a few ulp of itself: the target's p_t - 1.

    On a GPU ``tl.exp`` is ex2.approx.f32 of u log2(e) (CUDA's __expf), off
    by an ulp or two of 1 near u = 0: 10% of a confident row's p_t - 1 ~ -1e-6.
    In a model of it (tests/gpu_exp_emulation.py) d x was 7x (z_loss = 1e-4)
    to 60x (1e-5) the float32 reference's error on such rows at s = 64.
    For |u| < 1/4 the Taylor series to u^8 / 8! (truncation below 5e-11 of
    the value; the terms fall by 4x at least, so Horner's rounding stays at a
    few ulp); beyond, exp(u) - 1 loses at most ~2 bits to the cancellation."""
    small = tl.abs(u) < 0.25
    v = tl.where(small, u, 0.0)
    series = v * (1.0 + v * (0.5 + v * (1.0 / 6.0 + v * (1.0 / 24.0 + v * (1.0 / 120.0 + v * (
        1.0 / 720.0 + v * (1.0 / 5040.0 + v * (1.0 / 40320.0))))))))
    return tl.where(small, series, tl.exp(u) - 1.0)


@triton.jit
def _dlogit(p, pm1_t, is_t, g, coef_z, label_smoothing, C):
    """dz = g ((p - ls / C) - [c == y] (1 - ls)) + coef_z p (math.h dlogit),
    with the target's p - 1 given apart (pm1_t, from :func:`_expm1`, not
    rounded against 1): g's factor first, so that a row whose target takes all
    the probability (C = 1) gets exactly 0 (g p - g ls / C - g (1 - ls) left
    ~1e-7 g, times 1 / eps in the d x of a zero row); the z-loss and lse terms
    apart, not rounded against 1. ls / C correctly rounded, as the reference's
    (on a GPU ``/`` is div.full.f32, 2 ulp: p - ls / C cancels where smoothed
    rows converge, p ~ ls / C off the target)."""
    ls = label_smoothing
    ls_c = tl.div_rn(ls, tl.zeros_like(ls) + C)
    return g * tl.where(is_t, pm1_t + (ls - ls_c), p - ls_c) + coef_z * p


@triton.jit
def _grad_mass_kernel(
    T_ptr, XNORM_ptr, S_ptr, B_ptr, COST_ptr, SINT_ptr, LSE_ptr, LSELO_ptr, G_ptr, GLSE_ptr, MASS_ptr,
    N, C, ignore_index, eps, label_smoothing, z_loss,
    cos_m, sin_m, arc_fallback, additive,
    NORM_X: tl.constexpr, HAS_CLASS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_ARC: tl.constexpr, EXACT_MARGIN: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """MASS[i] = a lower bound of ||d cos_i||_1 from O(1) terms per row (the
    sparse backward's scale, see cce_backward):
    max(|d cos_t|, s min(1, d psi) |sum_c dz_c|), the second term with a
    scalar scale only. |d cos_t| is one term of the norm; sum_c dz_c =
    coef_z since the probabilities sum to 1, and every column
    of d cos is dz times s, or s d psi >= s min(1, d psi) on the target."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_mask, t, valid, den_x, live_x, s_t, psi, z_t, dpsi, lse, lse_lo, g, coef_z = _row_grad_terms(
        T_ptr, XNORM_ptr, S_ptr, B_ptr, COST_ptr, SINT_ptr, LSE_ptr, LSELO_ptr, G_ptr, GLSE_ptr, rows, N, C,
        ignore_index, eps, label_smoothing, z_loss, cos_m, sin_m, arc_fallback, additive,
        NORM_X, HAS_CLASS_SCALE, HAS_BIAS, HAS_ARC, EXACT_MARGIN)
    u_t = (z_t - lse) - lse_lo
    dcos_t = tl.where(valid, _dlogit(tl.exp(u_t), _expm1(u_t), valid, g, coef_z, label_smoothing, C) * s_t * dpsi,
                      0.0)
    mass = tl.abs(dcos_t)
    if not HAS_CLASS_SCALE:
        mass = tl.maximum(mass, tl.abs(coef_z) * s_t * tl.minimum(dpsi, 1.0))
    tl.store(MASS_ptr + rows, mass, mask=row_mask)


@triton.jit
def _cce_bwd_kernel(
    X_ptr, W_ptr, T_ptr, XNORM_ptr, WNORM_ptr, S_ptr, B_ptr, COST_ptr, SINT_ptr, LSE_ptr, LSELO_ptr, G_ptr,
    GLSE_ptr, DX_ptr, DW_ptr, DB_ptr, DS_ptr,
    N, C, D, c_lo, c_count,
    stride_xn, stride_xd, stride_wc, stride_wd,
    ignore_index, eps, label_smoothing, z_loss,
    cos_m, sin_m, arc_fallback, additive, THR_ptr,
    N_BUCKET, C_BUCKET,
    ROW_MAJOR: tl.constexpr, NORM_X: tl.constexpr, NORM_W: tl.constexpr,
    HAS_CLASS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ARC: tl.constexpr,
    EXACT_MARGIN: tl.constexpr, HAS_DX: tl.constexpr, HAS_DW: tl.constexpr,
    HAS_DB: tl.constexpr, HAS_DS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SPLIT_GRAD: tl.constexpr, HAS_FILTER: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # 1. The owned block (rows, or classes of the chunk [c_lo, c_lo + c_count))
    #    and this split's range of tiles along the other axis.
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    if ROW_MAJOR:
        n_minor = tl.cdiv(c_count, BLOCK_C)
    else:
        n_minor = tl.cdiv(N, BLOCK_N)
    minor_lo = split * n_minor // n_splits
    minor_hi = (split + 1) * n_minor // n_splits
    # Per-class accumulators: one buffer shared by all row blocks (atomics) in
    # ROW_MAJOR mode, one row of the chunk's per-split block, owned by this
    # program, otherwise.
    if ROW_MAJOR:
        part = 0
    else:
        part = split.to(tl.int64)
    for minor in range(minor_lo, minor_hi):
        if ROW_MAJOR:
            row_blk = pid
            col_blk = minor
        else:
            row_blk = minor
            col_blk = pid
        # Block starts stay below N + BLOCK_N (int32); offsets are int64 from here on.
        rows = row_blk * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        local = col_blk * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
        col_mask = local < c_count
        cols = c_lo + local

        # 2. Per-row terms; the target logit from the forward's stored cosine
        #    (bitwise the forward's), the coefficients of dz.
        row_mask, t, valid, den_x, live_x, s_t, psi, z_t, dpsi, lse, lse_lo, g, coef_z = _row_grad_terms(
            T_ptr, XNORM_ptr, S_ptr, B_ptr, COST_ptr, SINT_ptr, LSE_ptr, LSELO_ptr, G_ptr, GLSE_ptr, rows, N, C,
            ignore_index, eps, label_smoothing, z_loss, cos_m, sin_m, arc_fallback, additive,
            NORM_X, HAS_CLASS_SCALE, HAS_BIAS, HAS_ARC, EXACT_MARGIN)

        # 3. The logit tile, recomputed as the forward computed it.
        den_w, live_w, s_c, b_c = _col_terms(WNORM_ptr, S_ptr, B_ptr, cols, col_mask, eps,
                                             NORM_W, HAS_CLASS_SCALE, HAS_BIAS)
        cos = _cosine_tile(X_ptr, W_ptr, rows, cols, row_mask, col_mask, den_x, den_w, D,
                           stride_xn, stride_xd, stride_wc, stride_wd, UPCAST, DOT_PRECISION,
                           BLOCK_N, BLOCK_C, BLOCK_D)
        is_t = valid[:, None] & (cols[None, :] == t[:, None])
        z = _logits(cos, is_t, z_t, s_c, b_c)

        # 4. dz (math.h dlogit, plus the lse output's g_lse * p) and the class
        #    reductions for d bias and d scale.
        # p = exp((z - lse) - lse_lo): lse's float32 rounding taken back (forward step 3).
        p = tl.exp((z - lse[:, None]) - lse_lo[:, None])
        pm1_t = _expm1((z_t - lse) - lse_lo)
        dz = _dlogit(p, pm1_t[:, None], is_t, g[:, None], coef_z[:, None], label_smoothing, C)
        dz = tl.where(row_mask[:, None] & col_mask[None, :], dz, 0.0)
        if ROW_MAJOR:
            vec_ptrs = cols                     # the call's (C,) vector
        else:
            vec_ptrs = part * c_count + local   # this split's row of the chunk's (parts, c_count) block
        if HAS_DB:
            _accumulate(DB_ptr + vec_ptrs, tl.sum(dz, axis=0), col_mask, ROW_MAJOR)
        if HAS_DS:
            cos_eff = tl.where(is_t, psi[:, None], cos)
            _accumulate(DS_ptr + vec_ptrs, tl.sum(dz * cos_eff, axis=0), col_mask, ROW_MAJOR)

        # 5. d cos: the scale, times d psi / d cos on the target column.
        dcos = dz * tl.where(is_t, (s_t * dpsi)[:, None], s_c[None, :])

        # 6. (HAS_FILTER) Whether any entry of the tile is above the sparse
        #    backward's threshold (cce_backward), or NaN, or the threshold is
        #    NaN (a NaN row): NaN must reach the gradients as in PyTorch, and
        #    tl.max drops NaN on GPUs, hence the negated <= per entry.
        if HAS_FILTER:
            keep = tl.max(tl.where(tl.abs(dcos) <= tl.load(THR_ptr), 0, 1)) > 0
        else:
            keep = True

        # 7. Contractions with the raw rows, which are exact operands; the
        #    norms divide the float32 gradient before its rounding.
        if keep:
            if HAS_DX:
                a_hi, a_lo, a_p = _grad_operand(dcos, den_w, live_w, W_ptr.dtype.element_ty, UPCAST, SPLIT_GRAD)
                for k in range(0, D, BLOCK_D):
                    ks = k + tl.arange(0, BLOCK_D).to(tl.int64)
                    k_mask = ks < D
                    w = _load_tile(W_ptr, cols, col_mask, stride_wc, ks, k_mask, stride_wd, UPCAST)
                    ptrs = DX_ptr + (split.to(tl.int64) * N + rows[:, None]) * D + ks[None, :]
                    _accumulate(ptrs, _grad_dot(a_hi, a_lo, a_p, w, DOT_PRECISION, SPLIT_GRAD),
                                row_mask[:, None] & k_mask[None, :], False)
            if HAS_DW:
                b_hi, b_lo, b_p = _grad_operand(tl.trans(dcos), den_x, live_x, X_ptr.dtype.element_ty, UPCAST,
                                                SPLIT_GRAD)
                for k in range(0, D, BLOCK_D):
                    ks = k + tl.arange(0, BLOCK_D).to(tl.int64)
                    k_mask = ks < D
                    x = _load_tile(X_ptr, rows, row_mask, stride_xn, ks, k_mask, stride_xd, UPCAST)
                    ptrs = DW_ptr + (part * c_count + local[:, None]) * D + ks[None, :]
                    _accumulate(ptrs, _grad_dot(b_hi, b_lo, b_p, x, DOT_PRECISION, SPLIT_GRAD),
                                col_mask[:, None] & k_mask[None, :], ROW_MAJOR)


def _zero_accumulators(kwargs, reset_only: bool = False) -> None:
    """The autotuner's hook before each timed run of a candidate and after
    the last (``reset_only``): zero the gradient accumulators, which the runs
    add to. Zero is their value whenever autotuning happens: it happens at the
    first launch of a key, every launch of one backward has the same key
    (C_BUCKET is of the whole C; c_lo is not in the key), and the first, of
    the chunk at c_lo = 0, gets freshly zeroed buffers. ``restore_value``
    would clone them instead (an (N, D) float32 d xn buffer: 2 GiB more at
    N = 65536, D = 8192), and triton 3.6 fails on its None entries (a
    gradient not asked for). Triton before 3.2 (torch 2.4, 2.5) passes the
    positional arguments only, as a tuple (c_lo, a keyword, not among them)."""
    if not isinstance(kwargs, dict):
        kwargs = dict(zip(_cce_bwd_kernel.arg_names, kwargs))
    if not reset_only and kwargs.get("c_lo", 0) != 0:
        raise RuntimeError("cce_backward: autotuning at a class chunk after the first would drop the "
                           "gradients accumulated by the earlier chunks")
    for name in ("DX_ptr", "DW_ptr", "DB_ptr", "DS_ptr"):
        if kwargs[name] is not None:
            kwargs[name].zero_()


_cce_bwd_tuned = PerDeviceAutotune(
    _cce_bwd_kernel,
    configs=configs.BWD_CONFIGS,
    # UPCAST is chosen per call from the data (_has_rows_below_eps) and needs
    # more shared memory (114,688 B against 98,304 B for 128x128x32 fp16 on
    # sm_86, whose limit is 101,376 B): a config tuned without it must not be
    # reused with it.
    key=["N_BUCKET", "C_BUCKET", "D", "ROW_MAJOR", "NORM_X", "NORM_W", "HAS_CLASS_SCALE", "HAS_BIAS",
         "HAS_ARC", "EXACT_MARGIN", "HAS_DX", "HAS_DW", "HAS_DB", "HAS_DS", "UPCAST", "SPLIT_GRAD",
         "HAS_FILTER"],
    pre_hook=_zero_accumulators,
    prune_configs_by={"early_config_prune": configs.prune_backward},
)


# 16-bit hi + lo gradient operands keep about 16 (bfloat16) or 22 (float16)
# bits of each d cos: enough unless the contraction over classes (d x) or rows
# (d W) cancels by more than about 2^8 (bfloat16). Rows spanning only 1-3
# dimensions are nearly collinear and it does: in a fuzz of 2,369 bfloat16
# cases (under tests/bf16_emulation.py) d x and d W reached 3-15x the
# reference's error in 7 of the 1,438 with default settings, every one at
# D <= 3, and float16 43x in one. Below one tensor-core K step the backward
# takes float32 operands, which at such D cost little. D is what the launcher
# sees without a pass over the data: such rows zero-padded to D >= 16 keep
# the 16-bit operands (2.75x on the minimized case padded to D = 16, a
# review's run); float32 inputs avoid it there.
SPLIT_OPERANDS_MIN_D = 16


def _has_rows_below_eps(dtype, xnorm, wnorm, eps: float) -> bool:
    """Whether float16 gradient operands would drop rows: _grad_operand leaves
    out the columns of rows with 0 < norm <= eps (their 1/eps factor would
    wreck the power-of-two row scaling; dx, dW errors of 10 against 0.03 at
    eps = 1e-2). Such rows exist only when eps exceeds the smallest norm of a
    non-zero float16 row (2^-24), so the default eps never pays the host sync;
    where they exist, this backward computes in float32 operands instead."""
    if dtype != torch.float16 or eps < 2.0**-24:
        return False
    return any(bool(((nrm > 0) & (nrm <= eps)).any()) for nrm in (xnorm, wnorm) if nrm is not None)


@dataclass
class Grads:
    dx: torch.Tensor | None  # (N, D) in x's dtype
    dw: torch.Tensor | None  # (C, D) in weight's dtype
    ds: torch.Tensor | None  # (C,) float32 per-class d scale (summed by the caller for a scalar scale)
    db: torch.Tensor | None  # (C,) float32


def cce_backward(
    x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, scale: torch.Tensor,
    bias: torch.Tensor | None, lse: torch.Tensor, lse_lo: torch.Tensor, cos_t: torch.Tensor,
    sin_t: torch.Tensor | None, xnorm: torch.Tensor | None, wnorm: torch.Tensor | None, g_row: torch.Tensor,
    g_lse: torch.Tensor,
    opts: CCEOptions, *, need_dx: bool, need_dw: bool, need_ds: bool, need_db: bool,
    class_splits: int | None = None, row_splits: int | None = None, class_chunk: int | None = None,
    grad_filter: float | None = None,
) -> Grads:
    """Gradients of the row losses and lse of :func:`forward.cce_forward`.

    Args:
        x, weight, target, scale, bias, opts: as given to ``cce_forward``.
        lse, lse_lo, cos_t, sin_t, xnorm, wnorm: from its result (log-sum-exp and what
            its float32 rounding dropped, target cosines and sines, norms).
        g_row, g_lse: (N,) float32 gradients of the row losses and of lse.
        need_*: which gradients to compute.
        class_splits: programs per row block in the row-major pass.
        row_splits: programs per class block in the class-major pass (deterministic mode).
        class_chunk: classes per launch while their float32 d wn (and, in deterministic
            mode, per-split d s, d b) partials are live (default :func:`configs.class_chunk`,
            :func:`configs.class_major_split` in deterministic mode).
        grad_filter: tolerance of the sparse backward, 0 for the exact one
            (default: ``configs.grad_filter()``, from NNK_TRITON_GRAD_FILTER).

    Raises:
        TypeError, ValueError: as ``cce_forward`` for the forward's arguments
            (without a host sync, values unchecked); also for lse, lse_lo,
            cos_t other than (N,) float32 contiguous, sin_t other than that with an
            angular margin and None without, xnorm / wnorm other than
            (N,) / (C,) float32 contiguous when ``opts`` normalizes x / W and
            None otherwise, g_row, g_lse other than (N,) floating.

    Replaces ``torch.autograd.grad((row, lse), (x, weight, scale, bias), (g_row, g_lse))``
    through ``nnk.reference.cosine_cross_entropy_ref`` without the N x C logits.
    """
    op = "cce_backward"
    check_inputs(op, x, weight, target, scale, bias)
    n, d = x.shape
    c = weight.shape[0]
    dev = x.device
    for name, t in (("lse", lse), ("lse_lo", lse_lo), ("cos_t", cos_t)):
        check_vector(op, name, t, n, torch.float32, dev)
    arc = opts.angular_margin != 0.0
    if (sin_t is not None) != arc:
        raise ValueError(f"{op}: sin_t must be the forward's target sines when opts.angular_margin != 0 and None "
                         f"otherwise, got {'None' if sin_t is None else 'a tensor'} with angular_margin="
                         f"{opts.angular_margin}")
    if arc:
        check_vector(op, "sin_t", sin_t, n, torch.float32, dev)
    # The kernels read a norm only when normalizing, and normalize_backward
    # normalizes whenever it gets one: a norm without the option (or the
    # option without its norm) would silently change the gradient.
    for name, norm, length, flag in (("xnorm", xnorm, n, "normalize_input"), ("wnorm", wnorm, c, "normalize_weight")):
        on = getattr(opts, flag)
        if (norm is not None) != on:
            raise ValueError(f"{op}: {name} must be the forward's norms when opts.{flag} is True and None "
                             f"otherwise, got {'None' if norm is None else 'a tensor'} with {flag}={on}")
        if on:
            check_vector(op, name, norm, length, torch.float32, dev)
    for name, g in (("g_row", g_row), ("g_lse", g_lse)):
        check_vector(op, name, g, n, None, dev, contiguous=False)  # made contiguous float32 below
    f32 = dict(dtype=torch.float32, device=dev)
    atomic = not opts.deterministic
    tol = configs.grad_filter() if grad_filter is None else grad_filter
    g_row = g_row.to(torch.float32).contiguous()
    g_lse = g_lse.to(torch.float32).contiguous()
    dw = torch.empty(c, d, dtype=weight.dtype, device=dev) if need_dw else None
    common = dict(
        N=n, C=c, D=d,
        stride_xn=x.stride(0), stride_xd=x.stride(1), stride_wc=weight.stride(0), stride_wd=weight.stride(1),
        ignore_index=opts.ignore_index, eps=opts.eps, label_smoothing=opts.label_smoothing,
        z_loss=opts.z_loss, **margin_args(opts), **shape_buckets(n, c),
        NORM_X=opts.normalize_input, NORM_W=opts.normalize_weight,
        HAS_CLASS_SCALE=scale.numel() > 1, HAS_BIAS=bias is not None,
        EXACT_MARGIN=opts.exact_margin, SPLIT_GRAD=configs.split_grad(),
        **dtype_args(x.dtype, upcast=(x.dtype != torch.float32 and d < SPLIT_OPERANDS_MIN_D)
                     or _has_rows_below_eps(x.dtype, xnorm, wnorm, opts.eps)),  # the sync last
    )
    tensors = (x, weight, target, xnorm, wnorm, scale, bias, cos_t, sin_t, lse, lse_lo, g_row, g_lse)

    # 0. Sparse backward (opt-in): a tile of d cos is skipped when all its
    #    entries are at most thr = tol * M / C, M a lower bound of the largest
    #    ||d cos_i||_1 of the batch. Each row then loses at most C entries of
    #    at most thr: ||error of d xn_i|| <= tol * M * max_j ||w_j|| / max(||w_j||, eps)
    #    (<= tol * M with W normalized), and each class column at most N
    #    entries: ||error of d wn_j|| <= tol * M * N / C. The threshold scales
    #    with the batch's actual gradient, so a batch of confident rows (tiny
    #    gradients everywhere) is filtered relative to those, and a flat
    #    softmax (entries ~ M / C) skips nothing.
    thr = None
    if tol > 0.0 and n > 0:
        mass = torch.empty(n, **f32)
        mass_block = 256
        _grad_mass_kernel[(triton.cdiv(n, mass_block),)](
            target, xnorm, scale, bias, cos_t, sin_t, lse, lse_lo, g_row, g_lse, mass,
            n, c, opts.ignore_index, opts.eps, opts.label_smoothing, opts.z_loss,
            **margin_args(opts), NORM_X=opts.normalize_input, HAS_CLASS_SCALE=scale.numel() > 1,
            HAS_BIAS=bias is not None, EXACT_MARGIN=opts.exact_margin, BLOCK_N=mass_block)
        thr = (mass.amax() * (tol / c)).reshape(1)
    common.update(THR_ptr=thr, HAS_FILTER=thr is not None)

    def run(grid, dx_buf, dw_buf, db_buf, ds_buf, c0, count, row_major):
        launch(_cce_bwd_tuned, grid, opts.deterministic, configs.FIXED_BWD,
               *tensors, dx_buf, dw_buf, db_buf, ds_buf, c_lo=c0, c_count=count, ROW_MAJOR=row_major,
               HAS_DX=dx_buf is not None, HAS_DW=dw_buf is not None,
               HAS_DB=db_buf is not None, HAS_DS=ds_buf is not None, **common)

    def finish_dw(dw_buf, c0, count):
        norm = wnorm[c0:c0 + count] if wnorm is not None else None
        normalize_backward(dw_buf, weight[c0:c0 + count], norm, opts.eps, dw[c0:c0 + count])

    # 1. Row-major pass: d xn; in the default (atomic) mode also d wn per class
    #    chunk, d s, d b. d xn has one float32 (N, D) slice per class split.
    splits = class_splits or configs.num_splits(
        triton.cdiv(n, configs.NOMINAL_BLOCK_N), c, configs.NOMINAL_BLOCK_C, dev, 4 * n * d)
    dx_part = torch.zeros(splits, n, d, **f32) if need_dx else None
    row_dw = atomic and need_dw
    db = torch.zeros(c, **f32) if need_db else None
    ds = torch.zeros(c, **f32) if need_ds else None
    row_db, row_ds = (db, ds) if atomic else (None, None)
    if n > 0 and (need_dx or row_dw or row_db is not None or row_ds is not None):
        chunk = (class_chunk or configs.class_chunk(c, d)) if row_dw else c
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits)  # noqa: E731
        for c0 in range(0, c, chunk):
            count = min(chunk, c - c0)
            dw_buf = torch.zeros(1, count, d, **f32) if row_dw else None
            run(grid, dx_part, dw_buf, row_db, row_ds, c0, count, True)
            if row_dw:
                finish_dw(dw_buf, c0, count)
    elif row_dw:
        dw.zero_()

    # 2. Class-major pass (deterministic mode): d wn, d s, d b, each class block
    #    owned by one program per row split, rows visited in a fixed order;
    #    per chunk, the splits' partials are summed in order.
    if not atomic and (need_dw or need_db or need_ds):
        parts, chunk = configs.class_major_split(n, c, d, dev, need_dw)
        parts, chunk = row_splits or parts, class_chunk or chunk
        for c0 in range(0, c, chunk):
            count = min(chunk, c - c0)
            dw_buf = torch.zeros(parts, count, d, **f32) if need_dw else None
            db_buf = torch.zeros(parts, count, **f32) if need_db else None
            ds_buf = torch.zeros(parts, count, **f32) if need_ds else None
            grid = lambda meta, count=count: (triton.cdiv(count, meta["BLOCK_C"]), parts)  # noqa: E731
            run(grid, None, dw_buf, db_buf, ds_buf, c0, count, False)
            if need_dw:
                finish_dw(dw_buf, c0, count)
            for buf, out in ((db_buf, db), (ds_buf, ds)):
                if buf is not None:
                    torch.sum(buf, dim=0, out=out[c0:c0 + count])

    # 3. Through the normalization of x (summing the class splits in order).
    dx = None
    if need_dx:
        dx = torch.empty(n, d, dtype=x.dtype, device=dev)
        normalize_backward(dx_part, x, xnorm, opts.eps, dx)
    return Grads(dx, dw, ds, db)
