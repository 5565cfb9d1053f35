"""``nnk::nc_class_sums`` and ``nnk::nc_centered_gram``: fake kernels and
Python fronts that fall back to the reference when the extension is absent.

Label values are checked by the ops themselves: eagerly on the CPU (a
RuntimeError naming the row), asynchronously on CUDA (a device-side assert at
the next synchronization, without a host sync). Callers that want a clear
error on CUDA check the range first (nnk's NC API does).
"""
from __future__ import annotations

import torch

from ..reference import acc_dtype, nc_centered_gram_ref, nc_class_sums_ref
from ._extension import has_extension, has_op
from .fake_checks import check_nc_features, check_nc_shifts


if has_extension():

    @torch.library.register_fake("nnk::nc_class_sums")
    def _nc_class_sums_fake(features, labels, num_classes):
        check_nc_features("nc_class_sums", features, labels)
        torch._check(num_classes >= 0, lambda: f"nnk::nc_class_sums: num_classes must be >= 0, got {num_classes}")
        counts = labels.new_empty((num_classes,), dtype=torch.int64)
        shape = (*features.shape[:-2], num_classes, features.shape[-1])
        return counts, features.new_empty(shape, dtype=torch.float64)

    @torch.library.register_fake("nnk::nc_centered_gram")
    def _nc_centered_gram_fake(features, labels, shifts):
        check_nc_features("nc_centered_gram", features, labels)
        check_nc_shifts("nc_centered_gram", shifts, features)
        d = features.shape[-1]
        acc = acc_dtype(torch.promote_types(features.dtype, shifts.dtype))
        return features.new_empty((*features.shape[:-2], d, d), dtype=acc)


def nc_class_sums(features: torch.Tensor, labels: torch.Tensor, num_classes: int):
    """Per-class counts and feature sums (the contract of
    :func:`nnk.reference.nc_class_sums_ref`).

    Args:
        features: (N, D) or (B, N, D), float16 / bfloat16 / float32 / float64.
        labels: (N,) int64 or int32 in [0, num_classes), shared by the B batches.
        num_classes: K.

    Returns:
        ``(counts, sums)``: counts (K,) int64 and sums (K, D) or (B, K, D) in
        float64 for every input dtype, ``sums[b, k] = sum_{i: y_i = k}
        features[b, i]`` (``torch.zeros(B, K, D).index_add_(1, labels, features)``),
        accumulated in a fixed order (reproducible).
    """
    if has_op("nc_class_sums", features.device.type):
        return torch.ops.nnk.nc_class_sums(features, labels, num_classes)
    return nc_class_sums_ref(features, labels, num_classes)


def nc_centered_gram(features: torch.Tensor, labels: torch.Tensor, shifts: torch.Tensor):
    """Gram of the features centered on a per-class shift, without a centered
    copy: ``G[b] = sum_i (h_bi - c_b[y_i]) (h_bi - c_b[y_i])^T`` (the contract of
    :func:`nnk.reference.nc_centered_gram_ref`).

    Args:
        features: (N, D) or (B, N, D), float16 / bfloat16 / float32 / float64.
        labels: (N,) int64 or int32 in [0, K).
        shifts: (K, D), or (B, K, D) for 3-D features; any float dtype.

    Returns:
        (D, D) or (B, D, D) in float32 (float64 when features or shifts are
        float64); replaces ``c = h - shifts[..., labels, :]; c.mT @ c``.
    """
    if has_op("nc_centered_gram", features.device.type):
        return torch.ops.nnk.nc_centered_gram(features, labels, shifts)
    return nc_centered_gram_ref(features, labels, shifts)
