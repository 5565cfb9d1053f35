"""Triton device functions shared by the forward and backward kernels: the
cosine tile, the margin, the per-row and per-class terms of the logits.

The backward recomputes logit tiles with exactly these functions, so that
forward and backward see the same logits (bitwise for the target column,
which comes from the cosine the forward stored; to within the dot's
summation order elsewhere, identical when both use the same BLOCK_D and
operand dtype: the backward takes float32 operands for 16-bit inputs below
D = 16, and for float16 rows of norm below eps). The
per-element formulas mirror ``csrc/include/nnk/math.h`` and
``nnk/reference.py``.
"""
import triton
import triton.language as tl

from ...reference import ARC_SIN_MIN

_ARC_SIN_MIN = tl.constexpr(ARC_SIN_MIN)


@triton.jit
def _pow2_floor(m):
    """The power of two 2^floor(log2 m) of positive normal float32 m (the
    exponent bits alone), 1 where m is 0 or subnormal: a scale that is exact
    to apply and to undo."""
    p = (m.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
    return tl.where(p > 0.0, p, 1.0)


@triton.jit
def _grad_operand(dcos, den, live, dtype: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr):
    """The float32 gradient tile ``v = dcos / den[None, :]`` (rows: the
    un-contracted axis; columns: contracted with raw rows whose norms clamped
    at eps are ``den``) as tensor-core operands: returns (hi, lo, p) with
    ``v ~= p[:, None] * (hi + lo)``.

    float32 (or UPCAST): hi = lo = v, p = 1, one IEEE dot. 16-bit: hi = v
    rounded to ``dtype`` and, when SPLIT, lo = the rounding error rounded
    again, so that two dots give v to about 2^-17 (bf16) / 2^-22 (fp16)
    relative instead of 2^-9 / 2^-11 (d logits sum to about zero per row, so
    their rounding errors do not average out; one rounding costs about 2x the
    reference's error). float16 also needs range: each row is scaled by a
    power of two to a maximum in [1, 2) (exact, undone after the dot), since
    dz ~ p / N underflows float16 otherwise; and columns whose raw row has
    norm <= eps (``live`` false) are left out: their 1 / eps factor would
    dominate the scaling, and their raw row is 0 (a non-zero float16 row has
    norm >= 6e-8 > the default eps; with a larger eps the launcher passes
    float32 operands (UPCAST) whenever such rows exist, see
    backward._has_rows_below_eps).
    """
    v = dcos * tl.div_rn(1.0, den)[None, :]  # per column: one division, not one per entry
    if UPCAST or dtype == tl.float32:
        hi = v
        lo = v
        p = tl.full((v.shape[0],), 1.0, tl.float32)
    else:
        if dtype == tl.float16:
            v = tl.where(live[None, :], v, 0.0)
            p = _pow2_floor(tl.max(tl.abs(v), axis=1))
            v = v * tl.div_rn(1.0, p)[:, None]
        else:
            p = tl.full((v.shape[0],), 1.0, tl.float32)
        hi = v.to(dtype)
        if SPLIT:
            lo = (v - hi.to(tl.float32)).to(dtype)
        else:
            lo = hi
    return hi, lo, p


@triton.jit
def _grad_dot(hi, lo, p, raw, DOT_PRECISION: tl.constexpr, SPLIT: tl.constexpr):
    """p[:, None] * ((hi + lo) @ raw) in float32: the contraction of a
    :func:`_grad_operand` with a raw tile."""
    acc = tl.dot(hi, raw, input_precision=DOT_PRECISION)
    if SPLIT and hi.dtype != tl.float32:
        acc = tl.dot(lo, raw, acc, input_precision=DOT_PRECISION)
    return acc * p[:, None]


@triton.jit
def _accumulate(ptrs, val, mask, ATOMIC: tl.constexpr):
    """``*ptrs += val``: an fp32 atomic where several programs add to the
    same entries, a plain read-modify-write where this program owns them."""
    if ATOMIC:
        tl.atomic_add(ptrs, val, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + val, mask=mask)


@triton.jit
def _load_tile(ptr, idx, mask, stride_r, ks, k_mask, stride_k, UPCAST: tl.constexpr):
    """Rows ``idx`` x features ``ks`` of a 2-D tensor, in its dtype, or in
    float32 when UPCAST (bfloat16 under the interpreter, which computes on
    bfloat16 bits as integers)."""
    v = tl.load(ptr + idx[:, None] * stride_r + ks[None, :] * stride_k,
                mask=mask[:, None] & k_mask[None, :], other=0.0)
    if UPCAST:
        v = v.to(tl.float32)
    return v


@triton.jit
def _norm_den(NORM_ptr, idx, mask, eps, NORMALIZE: tl.constexpr):
    """(max(||row||, eps), ||row|| > eps): the divisor F.normalize uses, or
    (1, True) without normalization."""
    if NORMALIZE:
        norm = tl.load(NORM_ptr + idx, mask=mask, other=1.0)
        den = tl.maximum(norm, eps)
        live = norm > eps
    else:
        den = tl.full(idx.shape, 1.0, tl.float32)
        live = den > 0.0
    return den, live


@triton.jit
def _cosine_tile(X_ptr, W_ptr, rows, cols, row_mask, col_mask, den_x, den_w, D,
                 stride_xn, stride_xd, stride_wc, stride_wd,
                 UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """cos[i, j] = <x_i, w_j> / (den_x_i den_w_j): the dot of the raw rows
    (exact products, float32 accumulation) with the normalizations applied in
    the epilogue, so that no normalized copy of x or W is ever written.

    As math.h's cosine_of: the dot is scaled by the powers of two of both
    divisors (exact) and divided once by the product of their mantissas, so
    a dot equal to den_x den_w gives exactly +-1, as parallel rows at D = 1
    do (a product of two rounded reciprocals gave 1 - 1 ulp, which ArcFace's
    sqrt(1 - c^2) turned into a loss error of 1e-2 at s = 64; for D > 1 the
    dot and the norms round apart, as in the float32 reference), and
    den_x den_w never overflows (norms above ~1.8e19) or underflows (zero
    rows under a tiny eps: 0 / 0)."""
    acc = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
    for k in range(0, D, BLOCK_D):
        ks = k + tl.arange(0, BLOCK_D).to(tl.int64)
        k_mask = ks < D
        x = _load_tile(X_ptr, rows, row_mask, stride_xn, ks, k_mask, stride_xd, UPCAST)
        w = _load_tile(W_ptr, cols, col_mask, stride_wc, ks, k_mask, stride_wd, UPCAST)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    mx, sx = _pow2_split(den_x)
    mw, sw = _pow2_split(den_w)
    return tl.div_rn(acc * sx[:, None] * sw[None, :], mx[:, None] * mw[None, :])


@triton.jit
def _pow2_split(den):
    """(den 2^-k, 2^-k) for positive float32 den with binary exponent k (the
    power of two built from den's exponent bits: exact; k capped at 126)."""
    biased = tl.minimum((den.to(tl.int32, bitcast=True) >> 23) & 0xFF, 253)
    scale = ((254 - biased) << 23).to(tl.float32, bitcast=True)
    return den * scale, scale


@triton.jit
def _clamp_unit(c):
    """c clamped to [-1, 1], NaN kept (math.h clamp_unit): tl.maximum /
    tl.minimum lower to PTX max/min, which return the non-NaN operand, so a
    NaN target cosine (a NaN weight row) would become -1, a finite psi and a
    finite loss on a GPU, where the reference's is NaN."""
    return tl.where(c > 1.0, 1.0, tl.where(c < -1.0, -1.0, c))


@triton.jit
def _margin_value(c, sin_t, cos_m, sin_m, arc_fallback, additive, HAS_ARC: tl.constexpr):
    """psi(c) = cos(theta + m) - m_add, as math.h's margin_value:
    cos(theta + m) = c cos m - sin(theta) sin m (no acos), with sin(theta) the
    row's sin_t (norms.target_sines, from float64 sums), on ArcFace's branch
    (theta + m <= pi), which sin_t >= 0 marks (decided on the float64
    cosine); the fallback c - m sin m where sin_t = -1. Without an angular
    margin c stays unclamped and sin_t is unused."""
    psi = c
    if HAS_ARC:
        cc = _clamp_unit(c)
        psi = tl.where(sin_t >= 0.0, cc * cos_m - sin_t * sin_m, cc - arc_fallback)
    return psi - additive


@triton.jit
def _margin_grad(c, sin_t, cos_m, sin_m, HAS_ARC: tl.constexpr, EXACT_MARGIN: tl.constexpr):
    """d psi / d c: cos m + sin m c / max(sin(theta), ARC_SIN_MIN) on the
    ArcFace branch (finite where the true derivative diverges as theta -> 0),
    1 on the fallback branch, without angular margin, or detached."""
    if HAS_ARC and EXACT_MARGIN:
        cc = _clamp_unit(c)
        return tl.where(sin_t >= 0.0, cos_m + sin_m * tl.div_rn(cc, tl.maximum(sin_t, _ARC_SIN_MIN)), 1.0)
    else:
        return tl.full(c.shape, 1.0, tl.float32)


@triton.jit
def _target_sine(SINT_ptr, rows, valid, HAS_ARC: tl.constexpr):
    """Each row's sin(theta) to its target, -1 on the fallback branch
    (norms.target_sines), read only with an angular margin."""
    if HAS_ARC:
        return tl.load(SINT_ptr + rows, mask=valid, other=1.0)
    else:
        return tl.zeros(rows.shape, tl.float32)


@triton.jit
def _row_terms(T_ptr, XNORM_ptr, S_ptr, B_ptr, rows, N, ignore_index, eps,
               NORM_X: tl.constexpr, HAS_CLASS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Per row: in-range mask, target, non-ignored mask, max(||x||, eps) and
    whether ||x|| > eps, and the scale and bias of the target class (s_t, b_t)."""
    row_mask = rows < N
    t = tl.load(T_ptr + rows, mask=row_mask, other=ignore_index)
    valid = row_mask & (t != ignore_index)
    t_safe = tl.where(valid, t, 0)
    den_x, live_x = _norm_den(XNORM_ptr, rows, row_mask, eps, NORM_X)
    if HAS_CLASS_SCALE:
        s_t = tl.load(S_ptr + t_safe, mask=valid, other=1.0)
    else:
        s_t = tl.zeros(rows.shape, tl.float32) + tl.load(S_ptr)
    if HAS_BIAS:
        b_t = tl.load(B_ptr + t_safe, mask=valid, other=0.0)
    else:
        b_t = tl.zeros(rows.shape, tl.float32)
    return row_mask, t, valid, den_x, live_x, s_t, b_t


@triton.jit
def _col_terms(WNORM_ptr, S_ptr, B_ptr, cols, col_mask, eps,
               NORM_W: tl.constexpr, HAS_CLASS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Per class: max(||w||, eps) and whether ||w|| > eps, scale s_c, bias b_c."""
    den_w, live_w = _norm_den(WNORM_ptr, cols, col_mask, eps, NORM_W)
    if HAS_CLASS_SCALE:
        s_c = tl.load(S_ptr + cols, mask=col_mask, other=0.0)
    else:
        s_c = tl.zeros(cols.shape, tl.float32) + tl.load(S_ptr)
    if HAS_BIAS:
        b_c = tl.load(B_ptr + cols, mask=col_mask, other=0.0)
    else:
        b_c = tl.zeros(cols.shape, tl.float32)
    return den_w, live_w, s_c, b_c


@triton.jit
def _logits(cos, is_t, z_t, s_c, b_c):
    """z = s_c cos + b_c, with the target logit z_t (margin included) on the
    target column: the reference's ``(cos * s).scatter(psi * s_t) + bias``."""
    return tl.where(is_t, z_t[:, None], cos * s_c[None, :] + b_c[None, :])


@triton.jit
def _target_logit(cos_t, sin_t, s_t, b_t, cos_m, sin_m, arc_fallback, additive,
                  HAS_ARC: tl.constexpr):
    """(psi, z_t): the target cosine after the margins and the target logit
    s_t psi + b_t."""
    psi = _margin_value(cos_t, sin_t, cos_m, sin_m, arc_fallback, additive, HAS_ARC)
    return psi, psi * s_t + b_t
