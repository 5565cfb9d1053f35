"""The three implementations of the two NC primitives (class sums, shifted
Gram), all with the contract of ``nnk.reference.nc_class_sums_ref`` /
``nc_centered_gram_ref``:

- ``"torch"``: those reference functions (any device, float64 too);
- ``"triton"``: :mod:`nnk.nc.triton_kernels` (CUDA, or the CPU interpreter);
- ``"cuda"``: the compiled extension's ``nnk.ops.nc_class_sums`` /
  ``nnk.ops.nc_centered_gram``, taken only when ``nnk.ops.has_op`` says the
  extension registered them for the device.

``"auto"`` resolves as for the cross-entropy (``nnk.functional.resolve_impl``).
Triton is imported only when the Triton backend is used.
"""
from __future__ import annotations

import contextlib
import functools
import math

import torch

from .._dispatch import resolve_impl
from ..reference import nc_centered_gram_ref, nc_class_sums_ref


# Where torch.autocast would lower the statistics' matmuls (the nnk ops and
# Triton kernels are not autocast ops, but the torch path and the metrics are).
AUTOCAST_DEVICES = ("cpu", "cuda")


def without_autocast(fn):
    """``fn`` with torch.autocast turned off on the CPU and CUDA: the NC
    statistics and metrics promise float32 products and accumulation (float64
    for float64 features) and get called inside training loops under autocast,
    which ran the torch path's Gram in bfloat16 (Sigma_W 2.4e-3 relative off,
    over 10,000x a float32 two-pass) and NC4's logits in bfloat16 on every
    impl (1681 mismatches counted for a true 1428 in
    test_autocast_does_not_lower_the_statistics). CPU and CUDA only: other
    devices' autocast is left as it is."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            for dev in AUTOCAST_DEVICES:
                if torch.is_autocast_enabled(dev):
                    stack.enter_context(torch.autocast(dev, enabled=False))
            return fn(*args, **kwargs)

    return wrapper


def resolve(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    return resolve_impl(impl, device, dtype, op="nc_class_sums", arg="features")


def class_sums(impl: str, features: torch.Tensor, labels: torch.Tensor, num_classes: int):
    """(counts (K,) int64, sums (K, D) / (B, K, D) float64)."""
    if impl == "torch":
        return nc_class_sums_ref(features, labels, num_classes)
    if impl == "triton":
        from .triton_kernels import nc_class_sums_triton

        return nc_class_sums_triton(features, labels, num_classes)
    from .. import ops

    return ops.nc_class_sums(features, _op_labels(labels), num_classes)


# Features whose magnitude 2^e has |e| above this are scaled by 2^-e first.
POW2_BAND = 30


def _pow2(k: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """2^k exactly, from the bits (pow on a GPU carries an ulp bound, not
    exactness): k int64 within the normal exponents of dtype's float32 /
    float64 container."""
    if dtype == torch.float64:
        return ((k + 1023) << 52).view(torch.float64)
    return ((k + 127) << 23).to(torch.int32).view(torch.float32).to(dtype)


def times_pow2(t: torch.Tensor, k) -> torch.Tensor:
    """t * 2^k, exact, in two factors: 2^k itself may be subnormal (or inf)
    in t's dtype, and GPUs flush subnormal operands to 0. k: an int, or an
    integer tensor on t's device that broadcasts against t (one exponent per
    feature set, or per row)."""
    if isinstance(k, int):
        return t if k == 0 else (t * 2.0 ** (k // 2)).mul_(2.0 ** (k - k // 2))
    k = k.to(torch.int64)
    half = torch.div(k, 2, rounding_mode="floor")
    return (t * _pow2(half, t.dtype)).mul_(_pow2(k - half, t.dtype))


def _set_exponents(features: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor | None:
    """(B,) int64: per feature set, -e for a set of magnitude 2^e outside
    2^+-POW2_BAND (0 inside); None when no set needs it. One host sync."""
    dims = (-2, -1)
    # amax and amin rather than abs().amax() (no temporary) or an inf-norm
    # (one pass, but 7x slower on CPU: 21 ms against 3 ms at 200k x 64).
    big = torch.maximum(features.amax(dim=dims).float().abs(), features.amin(dim=dims).float().abs())
    big = torch.maximum(big.reshape(-1), shifts.abs().amax(dim=dims).float().reshape(-1))
    exps = [math.frexp(v)[1] if v > 0 else 0 for v in big.tolist()]
    if all(-POW2_BAND <= e <= POW2_BAND for e in exps):
        return None
    return torch.tensor([-e if not -POW2_BAND <= e <= POW2_BAND else 0 for e in exps],
                        dtype=torch.int64, device=features.device)


# float64 features below 2^-F64_MIN_EXP (~1e-144) have squares near float64's
# subnormals (0 from ~1e-162: nc1 = 0, NaN equinorm; at 2^-530 nc1 off by
# 4e-5 already) and no wider dtype to be rescaled into: refused, as float64
# features beyond ~1e154 are (their Gram overflows: stats.assemble_stats).
F64_MIN_EXP = 480


def _check_float64_magnitude(features: torch.Tensor) -> None:
    """ValueError for float64 features whose largest |h| is non-zero and below
    2^-F64_MIN_EXP. One host sync."""
    big = max(abs(float(features.amax())), abs(float(features.amin())))
    if 0.0 < big < 2.0 ** -F64_MIN_EXP:
        raise ValueError(f"float64 features of magnitude {big:.3g} (below 2^-{F64_MIN_EXP} ~ 1e-144): their "
                         "within-class scatter underflows float64; rescale them")


def centered_gram(impl: str, features: torch.Tensor, labels: torch.Tensor, shifts: torch.Tensor):
    """``sum_i (h_i - c[y_i]) (h_i - c[y_i])^T``: (D, D) / (B, D, D) float32
    (float64 on the torch path for float64 features or shifts, and for
    features rescaled as below).

    The kernels accumulate float32 squares: |h - c| below ~1e-19 underflows
    (features of size 1e-25 gave nc1 = 0, perfect collapse) and above ~1e19
    overflows. A feature set (with its shifts) of magnitude 2^e beyond
    2^+-30 is therefore scaled by 2^-e, exactly, and its Gram scaled back in
    float64; each set of batched (B, N, D) features by its own exponent
    (layers of very different sizes). float16 features lie inside the band
    unless a tracker's shifts come from much larger earlier batches: they are
    then upcast first (2^+-30 is not a float16).
    """
    if features.dtype == torch.float64 and features.numel():
        _check_float64_magnitude(features)
    if features.dtype != torch.float64 and shifts.dtype != torch.float64 and features.numel():
        k = _set_exponents(features, shifts)
        if k is not None:
            if features.dtype == torch.float16:  # (out of band only through a tracker's earlier shifts)
                features = features.float()
            if features.dim() == 3 and shifts.dim() == 2:
                shifts = shifts.expand(features.shape[0], *shifts.shape)
            kb = k.reshape(-1, 1, 1) if features.dim() == 3 else k.reshape(())
            gram = _gram(impl, times_pow2(features, kb), labels, times_pow2(shifts, kb))
            return times_pow2(gram.to(torch.float64), -2 * kb)
    return _gram(impl, features, labels, shifts)


def _gram(impl: str, features: torch.Tensor, labels: torch.Tensor, shifts: torch.Tensor):
    if impl == "torch":
        return nc_centered_gram_ref(features, labels, shifts)
    if impl == "triton":
        from .triton_kernels import nc_centered_gram_triton

        return nc_centered_gram_triton(features, labels, shifts)
    from .. import ops

    return ops.nc_centered_gram(features, _op_labels(labels), shifts)


def _op_labels(labels: torch.Tensor) -> torch.Tensor:
    """The compiled ops take int64 or int32 labels; the API takes any integer dtype."""
    return labels if labels.dtype in (torch.int64, torch.int32) else labels.long()
