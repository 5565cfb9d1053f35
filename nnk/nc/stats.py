"""Neural-collapse statistics: class counts and means, the global mean, and the
within- and between-class covariances, computed from class sums and a Gram
of class-shifted features.

Why shifts. ``Sigma_W`` from raw moments, ``(H^T H - sum_k n_k mu_k mu_k^T) / N``,
subtracts two numbers of size ``|mu|^2`` to get one of size ``sigma^2``: in
float32 it keeps no correct digit once ``sigma / |mu|`` falls below ~3e-4,
which is exactly what neural collapse does to the features. nnk accumulates
instead ``G_c = sum_i (h_i - c_{y_i}) (h_i - c_{y_i})^T`` around a shift ``c_k``
close to each class mean and uses the exact identity

    sum_{i in k} (h_i - mu_k)(h_i - mu_k)^T = sum_{i in k} (h_i - c_k)(h_i - c_k)^T
                                              - n_k (mu_k - c_k)(mu_k - c_k)^T

so ``Sigma_W = (G_c - sum_k n_k d_k d_k^T) / N`` with ``d_k = mu_k - c_k`` small:
no cancellation, given accurate means: the class sums are float64
(:func:`nnk.reference.nc_class_sums_ref`). With ``c_k = mu_k`` (two passes,
:func:`nc_stats`) ``d_k`` is a rounding error; in one pass (:class:`nnk.nc.NCTracker`) ``c_k`` is the mean
of class k in the first batch that holds it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..reference import acc_dtype
from . import _backend
from ._checks import check_features, check_labels, check_num_classes

F64 = torch.float64


@dataclass(frozen=True)
class NCStats:
    """The neural-collapse statistics of N labelled feature vectors (float64).

    Attributes (K classes, D features; a leading B dim for batched features):
        counts: (K,) int64 samples per class; ``counts == 0`` marks the classes
            left out of every statistic below (see :attr:`missing_classes`).
        means: (K, D) class means ``mu_k``; zero rows for classes without samples.
        global_mean: (D,) ``mu_G = (1/N) sum_i h_i`` (sample-weighted).
        sigma_w: (D, D) ``(1/N) sum_i (h_i - mu_{y_i}) (h_i - mu_{y_i})^T``.
        sigma_b: (D, D) ``(1/K') sum_{k present} (mu_k - mu_G) (mu_k - mu_G)^T``,
            K' the number of classes with samples.
        n: N, the number of samples.
    """

    counts: torch.Tensor
    means: torch.Tensor
    global_mean: torch.Tensor
    sigma_w: torch.Tensor
    sigma_b: torch.Tensor
    n: int

    @property
    def num_classes(self) -> int:
        return self.counts.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[-1]

    @property
    def batch_size(self) -> int | None:
        """B for statistics of batched (B, N, D) features, else None."""
        return self.means.shape[0] if self.means.dim() == 3 else None

    @property
    def present(self) -> torch.Tensor:
        """(K,) bool: the classes with at least one sample."""
        return self.counts > 0

    @property
    def num_present(self) -> int:
        return int(self.present.sum())

    @property
    def missing_classes(self) -> tuple[int, ...]:
        return tuple(int(k) for k in torch.nonzero(self.counts == 0).flatten())

    def __getitem__(self, b: int) -> NCStats:
        """The statistics of element ``b`` of batched statistics."""
        if self.batch_size is None:
            raise TypeError("NCStats of unbatched (N, D) features cannot be indexed")
        return NCStats(self.counts, self.means[b], self.global_mean[b], self.sigma_w[b], self.sigma_b[b], self.n)


def assemble_stats(counts, sums, shifts, gram, *, squeeze: bool, shifted_sums=None) -> NCStats:
    """NCStats from counts (K,), the shifts c (B, K, D) the Gram was centered
    on, that Gram (B, D, D) and either the class sums (B, K, D) or, when kept
    (the tracker's; two passes' for float64 features), ``shifted_sums``, the
    class sums of h - c (``sums`` is then not read: None will do), in float64.
    From the latter mu_k - c_k = shifted_sums_k / n_k, free of the rounding
    of the raw sums (~u |mu|)."""
    n = int(counts.sum())
    if n == 0:
        raise ValueError("no samples: the statistics of zero feature vectors are undefined")
    if not bool(torch.isfinite(gram).all()):
        # The inputs were finite (checked): float64 features beyond ~1e154
        # overflow their Gram (16/32-bit ones are rescaled, _backend.centered_gram).
        raise ValueError("the within-class scatter overflowed (float64 features with |h - mu| above ~1e154): "
                         "rescale them")
    present = counts > 0
    cnt = counts.to(F64)[:, None]
    shifts, gram = shifts.to(F64), gram.to(F64)
    if shifted_sums is None:
        means = sums.to(F64) / cnt.clamp_min(1)
        dev = means - shifts
    else:
        # mu_k = c_k + d_k: the raw float64 sums of n rows of size |mu| are off
        # by up to ~n u |mu|, which at n = 1e4 rows of 1e6 + 1e-3 randn made
        # equal class means differ by 1e-6 (nc1 1.6e11 instead of the
        # "identical means" ValueError), while d_k is a sum of small numbers.
        dev = shifted_sums.to(F64) / cnt.clamp_min(1)
        means = shifts + dev
    # 1. Sigma_W = (G_c - sum_k n_k d_k d_k^T) / N, d_k = mu_k - c_k (module doc).
    dev = torch.where(present[:, None], dev, 0.0)
    means = torch.where(present[:, None], means, 0.0)
    sigma_w = (gram - dev.mT @ (cnt * dev)) / n
    # 2. Sigma_B over the K' classes present, around the sample-weighted mean
    #    (of the means, not of the raw sums, for the same reason).
    global_mean = (cnt * means).sum(1) / n
    centered = (means - global_mean[:, None, :])[:, present]
    sigma_b = centered.mT @ centered / int(present.sum())
    if squeeze:
        return NCStats(counts, means[0], global_mean[0], sigma_w[0], sigma_b[0], n)
    return NCStats(counts, means, global_mean, sigma_w, sigma_b, n)


def recenter_gram(gram, shifted_sums, counts, shifts, new_shifts):
    """Re-express a shifted Gram around other shifts, exactly.

    With ``e_k = c_k - c'_k`` and ``u_k`` the class sums of ``h - c``
    (``shifted_sums``: ``S_k - n_k c_k``), expanding ``h - c' = (h - c) + e``
    class by class gives
    ``sum_i (h_i - c'_{y_i})(h_i - c'_{y_i})^T = G + U^T E + E^T U + E^T diag(n) E``.
    All of it is made of small quantities when both shifts are near the class
    means. gram (B, D, D), shifted_sums / shifts / new_shifts (B, K, D),
    counts (K,); float64 in and out. Classes without samples contribute nothing.
    """
    present = (counts > 0)[:, None]
    cnt = counts.to(F64)[:, None]
    e = torch.where(present, shifts - new_shifts, 0.0)
    u = torch.where(present, shifted_sums, 0.0)
    ue = u.mT @ e
    return gram + ue + ue.mT + e.mT @ (cnt * e)


def sums_around(impl: str, h: torch.Tensor, labels: torch.Tensor, shifts: torch.Tensor, num_classes: int):
    """(B, K, D) class sums of ``h - c_y`` for float64 features h (B, N, D),
    subtracted before summing. From the raw sums, their rounding (~u |mu| per
    mean) reached Sigma_W: to first order in the tracker, where mu - c is of
    the order of the scatter sigma (5e-4 relative at sigma = 1e-12 |mu|), to
    second order in two passes, where c is the rounded mean itself and
    mu - c went uncorrected (2e-6). Not needed below float64: 16- and 32-bit
    values sum exactly enough in float64."""
    return _backend.class_sums(impl, h - shifts[:, labels.long()], labels, num_classes)[1]


@_backend.without_autocast
def two_pass_stats(features: torch.Tensor, labels: torch.Tensor, num_classes: int, impl: str) -> NCStats:
    """:func:`nc_stats` on checked arguments and a resolved impl."""
    h = features[None] if features.dim() == 2 else features
    # Pass 1: counts and float64 sums; pass 2: the Gram centered on the class
    # means rounded to the Gram's dtype (float32 unless the features are
    # float64), the exact values the kernel subtracts; assemble_stats corrects
    # for that rounding with the float64 means, or for float64 features with
    # the sums of h - c (sums_around).
    counts, sums = _backend.class_sums(impl, h, labels, num_classes)
    means = sums / counts.clamp_min(1)[:, None].to(sums.dtype)
    shifts = means.to(acc_dtype(h.dtype))
    gram = _backend.centered_gram(impl, h, labels, shifts)
    shifted = sums_around(impl, h, labels, shifts, num_classes) if h.dtype == F64 else None
    return assemble_stats(counts, sums, shifts, gram, squeeze=features.dim() == 2, shifted_sums=shifted)


def nc_stats(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, impl: str = "auto") -> NCStats:
    """Exact neural-collapse statistics of in-memory features, in two passes.

    Pass 1 computes per-class counts and sums, pass 2 the Gram of the features
    centered on their class means (the centering fused into the kernel's load;
    float32 accumulation, float64 for float64 features); the small (K, D) and
    (D, D) results are then combined in float64. Replaces::

        mu = stack([H[y == k].mean(0) for k in present])
        Sigma_W = (H - mu[y]).T @ (H - mu[y]) / N
        Sigma_B = (mu - H.mean(0)).T @ (mu - H.mean(0)) / K'

    Args:
        features: (N, D) or (B, N, D) (B sets of features sharing the labels:
            layers, checkpoints) float16 / bfloat16 / float32 / float64, finite.
        labels: (N,) integer tensor with values in [0, num_classes).
        num_classes: K >= 1; classes without samples are reported, not an error.
        impl: ``"auto" | "triton" | "torch" | "cuda"`` (see ``nnk.nc._backend``).

    Returns:
        :class:`NCStats` (float64 tensors on the features' device).

    Raises:
        TypeError / ValueError naming the argument for wrong types, shapes,
        devices, labels out of range, NaN / infinite features, or an impl that
        cannot run here.
    """
    num_classes = check_num_classes(num_classes)
    features = check_features(features)
    labels = check_labels(labels, features.shape[-2], num_classes, features.device)
    return two_pass_stats(features, labels, num_classes, _backend.resolve(impl, features.device, features.dtype))
