"""Row-wise kernels around the fused cosine cross-entropy: the row norms the
forward scales by, and the backward through ``y = x / max(||x||, eps)`` that
turns the float32 d y accumulators into d x in x's dtype.

Own kernels instead of ``nnk.ops.row_normalize``: that op writes the
normalized copy (N x D, C x D) which the fused kernels avoid, and its
backward needs that copy as input; here y is recomputed from the raw rows and
the norm, and the per-split partial accumulators are summed on the way in a
fixed order (deterministic).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import configs


@triton.jit
def _row_norm_kernel(X_ptr, NORM_ptr, R, D, stride_r, stride_d,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # 1. Sum of squares over feature chunks, in float64 as in math.h and the
    #    reference: a float32 sum overflows above |x| ~ 1e19 (the pass is
    #    memory-bound, fp64 adds no visible time); 2. its square root.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    sq = tl.zeros((BLOCK_R,), tl.float64)
    for k in range(0, D, BLOCK_D):
        ks = k + tl.arange(0, BLOCK_D).to(tl.int64)
        m = row_mask[:, None] & (ks < D)[None, :]
        v = tl.load(X_ptr + rows[:, None] * stride_r + ks[None, :] * stride_d, mask=m, other=0.0)
        v = v.to(tl.float64)
        sq += tl.sum(v * v, axis=1)
    tl.store(NORM_ptr + rows, tl.sqrt(sq).to(tl.float32), mask=row_mask)


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """``torch.linalg.vector_norm(x.double(), dim=1).float()`` for (R, D) float16 /
    bfloat16 / float32 x of any strides: (R,) float32."""
    return _per_row(_row_norm_kernel, x, "NORM_ptr", X_ptr=x, R=x.shape[0], stride_r=x.stride(0),
                    stride_d=x.stride(1))


def _per_row(kernel, x: torch.Tensor, out_name: str, **args) -> torch.Tensor:
    """The (N,) float32 output ``out_name`` of a row-wise kernel over the N
    rows of x (N, D), one program per BLOCK_R rows."""
    n, d = x.shape
    out = torch.empty(n, dtype=torch.float32, device=x.device)
    if n > 0:
        block_r, block_d = configs.rowwise_blocks(d)
        kernel[(triton.cdiv(n, block_r),)](**args, **{out_name: out}, D=d, BLOCK_R=block_r, BLOCK_D=block_d)
    return out


@triton.jit
def _target_sine_kernel(X_ptr, W_ptr, T_ptr, SIN_ptr, N, C, D, stride_xn, stride_xd, stride_wc, stride_wd,
                        eps, THR_ptr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # nnk.reference.target_sine_ref. 1. ||x||^2, ||w_t||^2 and <x, w_t> in
    # float64 (products of float32 values are exact there; a target outside
    # [0, C), ignored rows', reads class 0, as math.h's callers); 2. the
    # cosine with the norms clamped at eps as F.normalize; 3. sqrt((1 - c)
    # (1 + c)), whose factors are exact near |c| = 1, or -1 below ArcFace's
    # threshold -cos m, read as float64 from THR_ptr (a float argument is
    # float32 on a GPU: rounded, it would move the branch by up to 3e-8).
    # NaN stays NaN (where, not maximum: math.h target_sine).
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < N
    t = tl.load(T_ptr + rows, mask=row_mask, other=0)
    t = tl.where((t >= 0) & (t < C), t, 0)
    xx = tl.zeros((BLOCK_R,), tl.float64)
    ww = tl.zeros((BLOCK_R,), tl.float64)
    xw = tl.zeros((BLOCK_R,), tl.float64)
    for k in range(0, D, BLOCK_D):
        ks = k + tl.arange(0, BLOCK_D).to(tl.int64)
        m = row_mask[:, None] & (ks < D)[None, :]
        xv = tl.load(X_ptr + rows[:, None] * stride_xn + ks[None, :] * stride_xd, mask=m, other=0.0)
        wv = tl.load(W_ptr + t[:, None] * stride_wc + ks[None, :] * stride_wd, mask=m, other=0.0)
        xv = xv.to(tl.float64)
        wv = wv.to(tl.float64)
        xx += tl.sum(xv * xv, axis=1)
        ww += tl.sum(wv * wv, axis=1)
        xw += tl.sum(xv * wv, axis=1)
    nx = tl.sqrt(xx)
    nw = tl.sqrt(ww)
    c = xw / (tl.where(nx <= eps, eps, nx) * tl.where(nw <= eps, eps, nw))
    c = tl.where(c > 1.0, 1.0, tl.where(c < -1.0, -1.0, c))
    s2 = (1.0 - c) * (1.0 + c)
    sine = tl.sqrt(tl.where(s2 < 0.0, 0.0, s2))
    tl.store(SIN_ptr + rows, tl.where(c < tl.load(THR_ptr), -1.0, sine).to(tl.float32), mask=row_mask)


def target_sines(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, opts) -> torch.Tensor:
    """``nnk.reference.target_sine_ref(x, weight, safe_target,
    angular_margin=opts.angular_margin, eps=opts.eps)`` (targets outside
    [0, C), ignored rows', taken as class 0) for (N, D) x and (C, D) weight of one float16 / bfloat16 /
    float32 dtype, any strides, and (N,) int64 target: (N,) float32, without
    float64 copies of the rows."""
    # A fill, not torch.tensor(): no blocking host-to-device copy.
    thr = torch.full((1,), -math.cos(opts.angular_margin), dtype=torch.float64, device=x.device)
    return _per_row(_target_sine_kernel, x, "SIN_ptr", X_ptr=x, W_ptr=weight, T_ptr=target, N=x.shape[0],
                    C=weight.shape[0], stride_xn=x.stride(0), stride_xd=x.stride(1), stride_wc=weight.stride(0),
                    stride_wd=weight.stride(1), eps=opts.eps, THR_ptr=thr)


@triton.jit
def _sum_parts(G_ptr, rows, ks, mask, D, n_parts, part_stride):
    """sum_p G[p, rows, ks] of the (n_parts, R, D) float32 partials, p in
    order (part_stride = R D, passed as int64 by Triton when >= 2^31)."""
    g = tl.zeros(mask.shape, tl.float32)
    ptrs = G_ptr + rows[:, None] * D + ks[None, :]
    for _ in range(n_parts):
        g += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += part_stride
    return g


@triton.jit
def _normalize_backward_kernel(
    G_ptr, RAW_ptr, NORM_ptr, OUT_ptr, R, D, n_parts, part_stride,
    stride_rr, stride_rd, stride_or, stride_od, eps,
    NORMALIZE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    if NORMALIZE:
        # 1. <y, g> per row, with y = raw / max(||raw||, eps) recomputed by a
        #    correctly rounded division, as F.normalize and math.h compute it
        #    (raw * (1 / norm) is off by an ulp; in (g - y <y, g>) / norm that
        #    ulp is multiplied by 1 / norm: at D = 1, where the exact result is
        #    0, it left 1e-3 at norm 3e-4).
        norm = tl.load(NORM_ptr + rows, mask=row_mask, other=1.0)
        den = tl.maximum(norm, eps)
        dot = tl.zeros((BLOCK_R,), tl.float32)
        for k in range(0, D, BLOCK_D):
            ks = k + tl.arange(0, BLOCK_D).to(tl.int64)
            m = row_mask[:, None] & (ks < D)[None, :]
            g = _sum_parts(G_ptr, rows, ks, m, D, n_parts, part_stride)
            raw = tl.load(RAW_ptr + rows[:, None] * stride_rr + ks[None, :] * stride_rd, mask=m, other=0.0)
            dot += tl.sum(tl.div_rn(raw.to(tl.float32), den[:, None]) * g, axis=1)
        # 2. (g - y <y, g>) / ||x|| where ||x|| > eps, else g / eps (math.h normalize_grad;
        #    F.normalize is linear, x / eps, below eps): both are (g - y c) / max(||x||, eps).
        proj = tl.where(norm > eps, dot, 0.0)
    for k in range(0, D, BLOCK_D):
        ks = k + tl.arange(0, BLOCK_D).to(tl.int64)
        m = row_mask[:, None] & (ks < D)[None, :]
        g = _sum_parts(G_ptr, rows, ks, m, D, n_parts, part_stride)
        if NORMALIZE:
            raw = tl.load(RAW_ptr + rows[:, None] * stride_rr + ks[None, :] * stride_rd, mask=m, other=0.0)
            g = tl.div_rn(g - tl.div_rn(raw.to(tl.float32), den[:, None]) * proj[:, None], den[:, None])
        tl.store(OUT_ptr + rows[:, None] * stride_or + ks[None, :] * stride_od,
                 g.to(OUT_ptr.dtype.element_ty), mask=m)


def normalize_backward(partials: torch.Tensor, raw: torch.Tensor, norm: torch.Tensor | None,
                       eps: float, out: torch.Tensor) -> None:
    """Write into ``out`` the gradient with respect to ``raw`` given the
    gradient with respect to ``F.normalize(raw, dim=1, eps=eps)`` (or to raw
    itself when ``norm`` is None).

    Args:
        partials: (P, R, D) float32 contiguous; the gradient is their sum over P.
        raw: (R, D) the un-normalized rows (any dtype, any strides).
        norm: (R,) float32 ``||raw||``, or None for no normalization.
        eps: the normalization's lower bound on the norm.
        out: (R, D) destination (any float dtype, any strides).

    Replaces ``nnk.ops.row_normalize_backward(partials.sum(0), y, norm, eps).to(out.dtype)``
    with ``y = F.normalize(raw, dim=1, eps=eps)`` never materialized.
    """
    p, r, d = partials.shape
    if r == 0:
        return
    block_r, block_d = configs.rowwise_blocks(d)
    _normalize_backward_kernel[(triton.cdiv(r, block_r),)](
        partials, raw, norm, out, r, d, p, r * d,
        raw.stride(0), raw.stride(1), out.stride(0), out.stride(1), eps,
        NORMALIZE=norm is not None, BLOCK_R=block_r, BLOCK_D=block_d)
