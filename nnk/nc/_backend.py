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

import math

import torch

from ..functional import resolve_impl
from ..reference import nc_centered_gram_ref, nc_class_sums_ref


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
_POW2_BAND = 30


def times_pow2(t: torch.Tensor, k: int) -> torch.Tensor:
    """t * 2^k, exact, in two factors: 2^k itself may be subnormal (or inf)
    in t's dtype, and GPUs flush subnormal operands to 0."""
    if k == 0:
        return t
    return (t * 2.0 ** (k // 2)).mul_(2.0 ** (k - k // 2))


def centered_gram(impl: str, features: torch.Tensor, labels: torch.Tensor, shifts: torch.Tensor):
    """``sum_i (h_i - c[y_i]) (h_i - c[y_i])^T``: (D, D) / (B, D, D) float32
    (float64 on the torch path for float64 features or shifts, and for
    features rescaled as below).

    The kernels accumulate float32 squares: |h - c| below ~1e-19 underflows
    (features of size 1e-25 gave nc1 = 0, perfect collapse) and above ~1e19
    overflows. Features (and shifts) of magnitude 2^e beyond 2^+-30 are
    therefore scaled by 2^-e, exactly, and the Gram scaled back in float64.
    """
    if features.dtype != torch.float64 and shifts.dtype != torch.float64 and features.numel():
        big = float(torch.maximum(features.abs().amax().float(), shifts.abs().amax().float()))
        e = math.frexp(big)[1]
        if big > 0 and not -_POW2_BAND <= e <= _POW2_BAND:
            gram = _gram(impl, times_pow2(features, -e), labels, times_pow2(shifts, -e))
            return gram.to(torch.float64) * 4.0 ** e
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
