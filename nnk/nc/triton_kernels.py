"""Triton kernels of the neural-collapse statistics.

Same contract as :func:`nnk.reference.nc_class_sums_ref` and
:func:`nnk.reference.nc_centered_gram_ref` (features (N, D) or (B, N, D) in
float16 / bfloat16 / float32, any strides; float64 sums, a float32 Gram):

- ``nc_class_sums_triton``: per-class counts and sums. The rows are visited in
  label-sorted order (a stable argsort of the labels, O(N) int work), so each
  program owns one class and one block of columns and adds its rows in a fixed
  order: no atomics, bitwise reproducible.
- ``nc_centered_gram_triton``: ``G = sum_i (h_i - c[y_i]) (h_i - c[y_i])^T``. The
  shift ``c[y_i]`` is gathered and subtracted in registers right after the
  feature tile is loaded (no centered copy of H exists), the tile products of
  GRAM_CHUNK_ROWS rows are accumulated in float32 and their sums in float64
  (as the reference's, in shorter chunks), and only tiles on or above the diagonal are computed
  (G is symmetric; each is stored twice). Rows may be split over several
  programs whose float64 partial Grams are summed in a fixed order
  (deterministic) and rounded to float32 once.

Precision of the tile product: the centered values are formed in fp32 and
multiplied with IEEE fp32 ``tl.dot`` (never tf32), whatever the feature dtype.
Rounding them back to float16 / bfloat16 for a tensor-core product erred by
2^-11 / 2^-8 of ``|h - c|`` per value: Sigma_W of float16 features was off by
7e-5 relative (4e-4 for features near float16's subnormals) where the PyTorch
reference, which centers and multiplies in fp32, is off by 4e-7 (measured under
the interpreter). The Gram costs O(N D^2), small beside a training step that
produced the features, so exactness wins over tensor-core speed here.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..impl.triton.configs import INTERPRET
from ..impl.triton.launch import on_device
from ..reference import _batched

_LOW_PRECISION = (torch.float16, torch.bfloat16)

# One configuration each (autotune with several configs fails in the
# interpreter). Not timed on a GPU yet: see bench/. The Gram's 64 x 64 tile
# with 8 warps compiles without register spills on sm_80 and with 100 bytes
# on sm_90 (float32 features; ptxas -v of Triton 3.8's PTX), where a 128 x 128
# tile spilled 2.1-2.3 KB per thread with the float64 chunk totals (and
# 0.2-0.4 KB without them).
SUMS_BLOCK_N, SUMS_BLOCK_D = 32, 128
# Rows per float32 partial Gram. On a GPU an ieee fp32 tl.dot is a sequential
# FMA chain over its K rows, continued across the tiles of a chunk, as the
# CUDA kernel's per-thread sums: there 1024-row chunks erred by up to 2.4x the
# reference's blocked GEMM, 128-row ones by at most 0.98x (csrc/cuda/nc_kernel.cu
# kGramChunkRows, measured in tests/cuda_emulation). A multiple of GRAM_BLOCK_N.
GRAM_CHUNK_ROWS = 128
GRAM_BLOCK_D = 64
GRAM_BLOCK_N = 64 if INTERPRET else 32
GRAM_WARPS = 8


@triton.jit
def _nc_class_sums_kernel(
    X_ptr, PERM_ptr, OFFS_ptr, OUT_ptr,
    D,
    stride_xb, stride_xn, stride_xd,
    stride_ob, stride_ok, stride_od,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_k = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)

    # 1. The rows of class k are PERM[OFFS[k] : OFFS[k + 1]] (labels sorted).
    lo = tl.load(OFFS_ptr + pid_k)
    hi = tl.load(OFFS_ptr + pid_k + 1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    x_base = X_ptr + pid_b * stride_xb + cols.to(tl.int64)[None, :] * stride_xd

    # 2. Accumulate a (BLOCK_N, BLOCK_D) float64 tile (see reference.nc_class_sums_ref
    #    for why float64), reduce its rows once at the end.
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float64)
    for start in range(lo, hi, BLOCK_N):
        r = start + tl.arange(0, BLOCK_N)
        r_ok = r < hi
        idx = tl.load(PERM_ptr + r, mask=r_ok, other=0)
        x = tl.load(x_base + idx[:, None] * stride_xn, mask=r_ok[:, None] & col_ok[None, :], other=0.0)
        acc += x.to(tl.float32).to(tl.float64)

    # 3. Store the class's column block (zeros for a class without rows).
    out = tl.sum(acc, axis=0)
    tl.store(OUT_ptr + pid_b * stride_ob + pid_k * stride_ok + cols * stride_od, out, mask=col_ok)


@triton.jit
def _centered_tile(X_ptr, C_ptr, rows64, r_ok, y, cols, col_ok, stride_xn, stride_xd, stride_ck, stride_cd):
    # (BLOCK_N, BLOCK_D) tile of h_i - c[y_i] in fp32; 0 outside the matrix.
    m = r_ok[:, None] & col_ok[None, :]
    x = tl.load(X_ptr + rows64[:, None] * stride_xn + cols[None, :] * stride_xd, mask=m, other=0.0)
    c = tl.load(C_ptr + y[:, None] * stride_ck + cols[None, :] * stride_cd, mask=m, other=0.0)
    return x.to(tl.float32) - c.to(tl.float32)


@triton.jit
def _nc_centered_gram_kernel(
    X_ptr, Y_ptr, C_ptr, OUT_ptr,
    N, D, rows_per_split, num_tiles, splits,
    stride_xb, stride_xn, stride_xd,
    stride_y,
    stride_cb, stride_ck, stride_cd,
    stride_os, stride_ob, stride_oi, stride_oj,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK_ROWS: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_bs = tl.program_id(1)
    ti = pid_t // num_tiles
    tj = pid_t % num_tiles
    # 1. G is symmetric: compute the tiles on or above the diagonal only.
    if tj < ti:
        return
    b = (pid_bs // splits).to(tl.int64)
    s = (pid_bs % splits).to(tl.int64)
    row_lo = s * rows_per_split
    row_hi = tl.minimum(row_lo + rows_per_split, N)

    ci = (ti * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    cj = (tj * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    ci_ok = ci < D
    cj_ok = cj < D
    x_b = X_ptr + b * stride_xb
    c_b = C_ptr + b * stride_cb

    # 2. Over this split's rows, CHUNK_ROWS at a time: load both column blocks
    #    of the row tile with the class shift subtracted on the fly, accumulate
    #    (H-C)_i^T (H-C)_j in float32, and add each chunk's product to a
    #    float64 total (a float32 sum over a split's rows had an error growing
    #    with them, see test_gram_error_does_not_grow_with_n).
    total = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float64)
    for chunk in range(row_lo, row_hi, CHUNK_ROWS):
        chunk_hi = tl.minimum(chunk + CHUNK_ROWS, row_hi)
        acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
        for start in range(chunk, chunk_hi, BLOCK_N):
            rows = start + tl.arange(0, BLOCK_N)
            r_ok = rows < chunk_hi
            y = tl.load(Y_ptr + rows * stride_y, mask=r_ok, other=0).to(tl.int64)
            a = _centered_tile(x_b, c_b, rows, r_ok, y, ci, ci_ok, stride_xn, stride_xd, stride_ck, stride_cd)
            bt = _centered_tile(x_b, c_b, rows, r_ok, y, cj, cj_ok, stride_xn, stride_xd, stride_ck, stride_cd)
            acc = tl.dot(tl.trans(a), bt, acc, input_precision="ieee")
        total += acc.to(tl.float64)

    # 3. Store the tile and, off the diagonal, its mirror G[j, i] = G[i, j].
    out = OUT_ptr + s * stride_os + b * stride_ob
    m = ci_ok[:, None] & cj_ok[None, :]
    tl.store(out + ci[:, None] * stride_oi + cj[None, :] * stride_oj, total, mask=m)
    if tj != ti:
        tl.store(out + ci[:, None] * stride_oj + cj[None, :] * stride_oi, total, mask=m)


def _check(features: torch.Tensor, labels: torch.Tensor):
    if features.dim() not in (2, 3):
        raise ValueError(f"features must be (N, D) or (B, N, D), got shape {tuple(features.shape)}")
    if features.dtype not in (*_LOW_PRECISION, torch.float32):
        raise TypeError(f"the Triton NC kernels take float16, bfloat16 or float32 features, got {features.dtype}")
    if labels.shape != (features.shape[-2],):
        raise ValueError(f"labels must have shape ({features.shape[-2]},), got {tuple(labels.shape)}")
    if labels.device != features.device:
        raise ValueError(f"labels are on {labels.device} but features are on {features.device}")
    if features.dim() == 3 and features.shape[0] > 65535:  # a grid dimension of the kernels
        raise ValueError(f"the Triton NC kernels take at most 65535 feature sets per call, got {features.shape[0]}")


def nc_class_sums_triton(features: torch.Tensor, labels: torch.Tensor, num_classes: int):
    """Per-class counts (K,) int64 and float64 sums (K, D) or (B, K, D) of
    features (N, D) / (B, N, D); same as ``nnk.reference.nc_class_sums_ref``.
    labels (N,) integer in [0, num_classes) (not range-checked here)."""
    _check(features, labels)
    h, squeeze = _batched(features)
    nb, n, d = h.shape
    labels = labels.long()
    counts = torch.bincount(labels, minlength=num_classes)
    perm = torch.argsort(labels, stable=True)
    offs = torch.zeros(num_classes + 1, dtype=torch.int64, device=h.device)
    torch.cumsum(counts, 0, out=offs[1:])
    sums = torch.empty(nb, num_classes, d, dtype=torch.float64, device=h.device)
    if d > 0:
        grid = (num_classes, triton.cdiv(d, SUMS_BLOCK_D), nb)
        with on_device(h):
            _nc_class_sums_kernel[grid](
                h, perm, offs, sums, d,
                h.stride(0), h.stride(1), h.stride(2),
                sums.stride(0), sums.stride(1), sums.stride(2),
                BLOCK_N=SUMS_BLOCK_N, BLOCK_D=SUMS_BLOCK_D,
            )
    return counts, (sums[0] if squeeze else sums)


def _default_splits(n: int, tiles: int, device: torch.device) -> int:
    # Enough programs to fill the GPU about twice when D is small, but at
    # least 8 row blocks per program. One split in the interpreter (serial).
    # configs.num_splits is this rule with one row tile per split at least;
    # here every split adds a D x D float64 partial Gram to write and sum.
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, tiles), n // (8 * GRAM_BLOCK_N)))


def nc_centered_gram_triton(
    features: torch.Tensor, labels: torch.Tensor, shifts: torch.Tensor, *, splits: int | None = None
) -> torch.Tensor:
    """``sum_i (h_i - c[y_i]) (h_i - c[y_i])^T`` as float32 (D, D) or (B, D, D);
    same as ``nnk.reference.nc_centered_gram_ref``.

    features (N, D) / (B, N, D) float16 / bfloat16 / float32; labels (N,)
    integer in [0, K); shifts (K, D) or (B, K, D), any float dtype (used as
    float32). ``splits``: number of row ranges reduced separately (default: by
    occupancy on CUDA, 1 otherwise)."""
    _check(features, labels)
    h, squeeze = _batched(features)
    nb, n, d = h.shape
    if shifts.dim() not in (2, 3) or shifts.shape[-1] != d or (shifts.dim() == 3 and shifts.shape[0] != nb):
        raise ValueError(f"shifts must be (K, {d}) or ({nb}, K, {d}), got shape {tuple(shifts.shape)}")
    c = shifts.to(device=h.device, dtype=torch.float32)
    c3 = c[None] if c.dim() == 2 else c
    stride_cb = 0 if c.dim() == 2 else c3.stride(0)
    if d == 0:
        gram = h.new_zeros((nb, 0, 0), dtype=torch.float32)
        return gram[0] if squeeze else gram
    tiles = triton.cdiv(d, GRAM_BLOCK_D)
    if splits is None:
        splits = _default_splits(n, nb * tiles * (tiles + 1) // 2, h.device)
    # At most one split per row, and grid y (nb * splits) within CUDA's 65535.
    splits = max(1, min(int(splits), max(n, 1), 65535 // nb))
    rows_per_split = triton.cdiv(max(n, 1), splits)
    out = torch.empty(splits, nb, d, d, dtype=torch.float64, device=h.device)
    with on_device(h):
        _nc_centered_gram_kernel[(tiles * tiles, nb * splits)](
            h, labels, c3, out,
            n, d, rows_per_split, tiles, splits,
            h.stride(0), h.stride(1), h.stride(2),
            labels.stride(0),
            stride_cb, c3.stride(1), c3.stride(2),
            out.stride(0), out.stride(1), out.stride(2), out.stride(3),
            BLOCK_N=GRAM_BLOCK_N, BLOCK_D=GRAM_BLOCK_D, CHUNK_ROWS=GRAM_CHUNK_ROWS, num_warps=GRAM_WARPS,
        )
    gram = (out[0] if splits == 1 else out.sum(0)).float()
    return gram[0] if squeeze else gram
