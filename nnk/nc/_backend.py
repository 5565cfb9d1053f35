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


def centered_gram(impl: str, features: torch.Tensor, labels: torch.Tensor, shifts: torch.Tensor):
    """``sum_i (h_i - c[y_i]) (h_i - c[y_i])^T``: (D, D) / (B, D, D) float32
    (float64 on the torch path for float64 features or shifts)."""
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
