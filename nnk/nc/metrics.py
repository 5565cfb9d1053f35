"""NC1-NC4 from :class:`NCStats` (and the features, for NC4).

Notation: K classes (the classifier's rows), K' of them with samples, mu_k the
class means, mu_G the sample-weighted global mean, M~ the K' rows
``mu_k - mu_G``, W the (K, D) classifier as given, and
``ETF_k = (I_k - 1 1^T / k) / sqrt(k - 1)`` (unit Frobenius norm).
Everything is computed in float64 from the statistics.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from . import _backend
from ._checks import check_classifier, check_features, check_labels, check_num_classes
from .stats import F64, NCStats, two_pass_stats

# Rows per block when NC4 compares the nearest class mean with the classifier.
NC4_BLOCK_ROWS = 8192


@dataclass(frozen=True)
class NCMetrics:
    """Neural-collapse metrics; each is 0 at perfect collapse (nc3: see there).

    Attributes:
        nc1: ``tr(Sigma_W Sigma_B^+) / K'`` (pseudo-inverse cut as torch.linalg.pinv's default).
        nc2_equinorm: ``std(|mu_k - mu_G|) / mean(|mu_k - mu_G|)`` (population std).
        nc2_equiangular: mean over pairs k < l of ``|cos(mu_k - mu_G, mu_l - mu_G) + 1/(K'-1)|``.
        nc2: ``|| W W^T / ||W W^T||_F - ETF_K ||_F`` over all K rows of W; None without weight.
        nc3: ``|| W M^T / ||W M^T||_F - ETF_K' ||_F``, M the uncentered means of the
            present classes and W their rows, as in the code of "Neural Collapse
            with Normalized Features" (features on the sphere, whose collapsed
            means center on the origin); 0 at perfect collapse only when
            ``W mu_G = 0``: the global mean orthogonal to the centered class
            means, which collapse does not imply. None without weight.
        nc3_duality: ``|| W / ||W||_F - M~ / ||M~||_F ||_F`` (present classes),
            Papyan et al.'s self-duality; None without weight.
        nc4: fraction of samples whose nearest class mean (Euclidean, present
            classes) differs from ``argmax(h W^T + b)`` (or from the given
            predictions, :meth:`NCTracker.update_nc4`); None without weight or features.
        num_classes: K. num_present: K'. missing_classes: the classes without samples.
        n: the number of samples.
    """

    nc1: float
    nc2_equinorm: float
    nc2_equiangular: float
    nc2: float | None = None
    nc3: float | None = None
    nc3_duality: float | None = None
    nc4: float | None = None
    num_classes: int = 0
    num_present: int = 0
    missing_classes: tuple[int, ...] = ()
    n: int = 0

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["missing_classes"] = list(self.missing_classes)
        return d


def _to_unit_exponent(t: torch.Tensor) -> int:
    """k such that t * 2^k has its largest magnitude in [0.5, 1) (0 for t = 0)."""
    return -int(torch.frexp(t.abs().amax())[1])


def _nc1(sigma_w: torch.Tensor, centered: torch.Tensor) -> float:
    """``tr(Sigma_W pinv(Sigma_B)) / K'`` with ``Sigma_B = M~^T M~ / K'``.

    The nonzero eigenpairs of the D x D ``Sigma_B`` are those of the K' x K'
    ``M~ M~^T / K' = V diag(lam) V^T``, with eigenvectors ``q_j = M~^T v_j /
    sqrt(K' lam_j)``. Hence ``tr(Sigma_W pinv(Sigma_B)) = sum_j q_j^T Sigma_W q_j / lam_j
    = sum_j (V^T A V)_jj / (K' lam_j^2)`` with ``A = M~ Sigma_W M~^T``: K' x K'
    work when K' < D. The cut is torch.linalg.pinv's default for the D x D
    matrix: eigenvalues <= D * eps(float64) * lam_max are dropped."""
    kp, d = centered.shape
    if kp < d:
        lam, v = torch.linalg.eigh(centered @ centered.T / kp)
        a = centered @ sigma_w @ centered.T
        num = (v.T @ a @ v).diagonal()
        den = kp * lam.square()
    else:
        lam, v = torch.linalg.eigh(centered.T @ centered / kp)
        num = (v.T @ sigma_w @ v).diagonal()
        den = lam
    keep = lam.abs() > d * torch.finfo(F64).eps * lam.abs().max()
    return float((num[keep] / den[keep]).sum()) / kp


def _etf_distance(a: torch.Tensor, name: str) -> float:
    """``|| A / ||A||_F - ETF_k ||_F`` for a k x k matrix A."""
    k = a.shape[0]
    norm = torch.linalg.matrix_norm(a)
    if norm == 0:
        raise ValueError(f"{name}: the product is the zero matrix, its direction is undefined")
    etf = (torch.eye(k, dtype=F64, device=a.device) - 1.0 / k) / math.sqrt(k - 1)
    return float(torch.linalg.matrix_norm(a / norm - etf))


def _metrics_one(stats: NCStats, weight: torch.Tensor | None) -> NCMetrics:
    present = stats.present
    kp, k = stats.num_present, stats.num_classes
    if kp < 2:
        raise ValueError(
            f"NC metrics need at least 2 classes with samples, got {kp} of num_classes={k}: "
            "between-class statistics of one class are undefined"
        )
    means = stats.means[present]
    centered = means - stats.global_mean
    # sum_k n_k (mu_k - mu_G) = 0, but mu_G is a rounded sum: the residual,
    # ~eps |mu|, would be a false eigenvalue of Sigma_B that passes the pinv
    # cut once |mu| / sigma_B exceeds ~sqrt(D / eps) (nc1 of 1e5 instead of
    # 2e-7 for float64 features offset by 1e6); nc1 is shift-invariant.
    w_n = stats.counts[present].to(F64)
    centered = centered - (w_n @ centered) / w_n.sum()
    norms = torch.linalg.vector_norm(centered, dim=1)
    # Means equal up to their float64 rounding have no between-class
    # direction; the rounding would pass for one. A class sum's rounding in
    # coordinate j is of the order of eps times the mean |h_ij|, at most
    # |mu_j| + sqrt(Sigma_W,jj) (cancelling samples). Per coordinate: a large
    # constant feature must not hide a separation the others resolve.
    spread = stats.sigma_w.diagonal().clamp_min(0.0).sqrt()
    noise = 4.0 * torch.finfo(F64).eps * (means.abs().amax(dim=0) + spread)
    if not bool((centered.abs() > noise).any()):
        raise ValueError("all class means are equal (Sigma_B = 0): the NC metrics are undefined")
    # The metrics are scale-invariant; a power of two that brings the centred
    # means near 1 keeps nc1's fourth powers (kp lam^2, M~ Sigma_W M~^T)
    # within float64's range for features of 1e-100 or 1e80.
    e = _to_unit_exponent(centered)
    centered, norms = _backend.times_pow2(centered, e), _backend.times_pow2(norms, e)
    sigma_w = _backend.times_pow2(stats.sigma_w, 2 * e)
    # A class whose mean is the global mean has no direction: its cosines count as 0.
    unit = centered / norms.clamp_min(torch.finfo(F64).tiny)[:, None]
    iu = torch.triu_indices(kp, kp, 1, device=unit.device)
    cos = (unit @ unit.T)[iu[0], iu[1]]
    out = dict(
        nc1=_nc1(sigma_w, centered),
        nc2_equinorm=float(norms.std(correction=0) / norms.mean()),
        nc2_equiangular=float((cos + 1.0 / (kp - 1)).abs().mean()),
        num_classes=k, num_present=kp, missing_classes=stats.missing_classes, n=stats.n,
    )
    if weight is not None:
        # Scale-invariant too: W W^T of a float64 W of 1e160 would overflow.
        w = weight.to(F64)
        w = _backend.times_pow2(w, _to_unit_exponent(w))
        wp = w[present]
        wp_norm = torch.linalg.matrix_norm(wp)
        if wp_norm == 0:
            raise ValueError("weight: the rows of the classes with samples are all zero")
        out.update(
            nc2=_etf_distance(w @ w.T, "nc2 (W W^T)"),
            nc3=_etf_distance(wp @ means.T, "nc3 (W M^T)"),
            nc3_duality=float(torch.linalg.matrix_norm(wp / wp_norm - centered / torch.linalg.matrix_norm(centered))),
        )
    return NCMetrics(**out)


def _per_batch(t: torch.Tensor | None, b: int, batched_dims: int):
    return t[b] if t is not None and t.dim() == batched_dims else t


@_backend.without_autocast
def nc_metrics_from_stats(stats: NCStats, weight: torch.Tensor | None = None) -> NCMetrics | list[NCMetrics]:
    """NC1, NC2, NC3 of :class:`NCStats` (everything but NC4, which needs the features).

    Args:
        stats: from :func:`nnk.nc_stats` or :meth:`nnk.NCTracker.compute`.
        weight: None, or the (K, D) classifier rows (a (B, K, D) stack for
            batched statistics), any float dtype; used in float64.

    Returns:
        :class:`NCMetrics` (a list of B of them for batched statistics).

    Raises:
        ValueError when fewer than 2 classes have samples or all class means
        coincide (the metrics are undefined there; never a silent NaN).
        One sample per class is allowed: Sigma_W = 0 and nc1 = 0.
    """
    if not isinstance(stats, NCStats):
        raise TypeError(f"stats must be NCStats, got {type(stats).__name__}")
    nb = stats.batch_size
    weight, _ = check_classifier(weight, None, stats.num_classes, stats.dim, nb, stats.means.device)
    if nb is None:
        return _metrics_one(stats, weight)
    return [_metrics_one(stats[b], _per_batch(weight, b, 3)) for b in range(nb)]


@_backend.without_autocast
def nc4_mismatches(features: torch.Tensor, stats: NCStats, weight: torch.Tensor, bias: torch.Tensor | None,
                   predicted: torch.Tensor | None = None):
    """(B,) int64 (B = 1 for unbatched): per feature set, the number of rows
    whose nearest class mean (present classes) differs from ``argmax(h W^T + b)``,
    or from ``predicted`` (int, the features' shape without D) when given.
    Computed in blocks of rows in float32 (float64 when the features, weight
    or bias are float64: a float64 weight may lie beyond float32's range), with
    the features and means taken relative to the global mean (smaller numbers,
    same nearest mean: ``argmin_k |h - mu_k|^2 = argmax_k 2 h'.m_k - |m_k|^2``)
    and scaled by the power of two that brings the largest |m_k| near 1, so
    that these products neither underflow (features of size 1e-25) nor
    overflow float32; h - global mean is formed in float64 and rounded once
    (the global mean rounded to float32 first shifted every row alike,
    toward some means: features at 1e4 with a spread of a few ulps had nc4
    off by 4-5% of the samples). The logits likewise: each row of h beyond
    2^30 and W beyond 2^30 by their powers of two, b by both (argmax is
    unchanged by a positive factor on a row's logits; |W| ~ 1e30 against
    |h| ~ 1e8 overflowed float32: nc4 0.75 for 0)."""
    acc = F64 if F64 in (features.dtype, weight.dtype, getattr(bias, "dtype", None)) else torch.float32
    h3 = features[None] if features.dim() == 2 else features
    given = None if predicted is None else (predicted[None] if predicted.dim() == 1 else predicted)
    idx = torch.nonzero(stats.present).flatten()
    out = torch.zeros(h3.shape[0], dtype=torch.int64, device=features.device)
    for b in range(h3.shape[0]):
        sb = stats if stats.batch_size is None else stats[b]
        if given is None:
            w = _per_batch(weight, b, 3).to(acc)
            ew = torch.frexp(w.abs().amax())[1].to(torch.int64)
            ew = torch.where(ew > _backend.POW2_BAND, ew, 0)
            w = _backend.times_pow2(w, -ew)
            bias_b = _per_batch(bias, b, 2)
        m64 = sb.means[idx] - sb.global_mean
        # Exponents on the device (no host sync): one for the centred means,
        # one per row for the logits (argmax is per row).
        e = torch.frexp(m64.abs().amax())[1].to(torch.int64)
        m = _backend.times_pow2(m64, -e).to(acc)
        m_sq = m.square().sum(1)
        for r0 in range(0, h3.shape[1], NC4_BLOCK_ROWS):
            h = h3[b, r0:r0 + NC4_BLOCK_ROWS]
            centred = _backend.times_pow2(h.to(F64) - sb.global_mean, -e).to(acc)
            nearest = idx[torch.argmax(2.0 * centred @ m.T - m_sq, dim=1)]
            if given is not None:
                out[b] += (nearest != given[b, r0:r0 + NC4_BLOCK_ROWS]).sum()
                continue
            h = h.to(acc)
            eh = torch.frexp(h.abs().amax(dim=1, keepdim=True))[1].to(torch.int64)
            eh = torch.where(eh > _backend.POW2_BAND, eh, 0)
            logits = _backend.times_pow2(h, -eh) @ w.T
            if bias_b is not None:
                # Two factors: 2^-(eh + ew) is below float32's normal range
                # when both exceed 2^127 / 2 (its bits gave -inf or NaN).
                logits = logits + _backend.times_pow2(_backend.times_pow2(bias_b.to(acc)[None, :], -eh), -ew)
            out[b] += (nearest != torch.argmax(logits, dim=1)).sum()
    return out


def with_nc4(metrics: NCMetrics | list[NCMetrics], mismatches: torch.Tensor, n: int):
    """``metrics`` (one NCMetrics, or a list of B) with ``nc4`` filled in:
    the fraction of the ``n`` samples counted in ``mismatches`` ((B,), from
    :func:`nc4_mismatches`; B = 1 unbatched)."""
    frac = (mismatches.to(F64) / n).tolist()
    if isinstance(metrics, list):
        return [dataclasses.replace(m, nc4=f) for m, f in zip(metrics, frac)]
    return dataclasses.replace(metrics, nc4=frac[0])


def nc_metrics(
    features: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    num_classes: int | None = None,
    *,
    impl: str = "auto",
) -> NCMetrics | list[NCMetrics]:
    """All neural-collapse metrics of in-memory features (two exact passes).

    Equivalent to ``nc_metrics_from_stats(nc_stats(features, labels, K), weight)``
    plus ``nc4`` when ``weight`` is given.

    Args:
        features: (N, D) or (B, N, D) float16 / bfloat16 / float32 / float64.
        labels: (N,) integer in [0, K).
        weight: None or the (K, D) classifier ((B, K, D) for batched features).
        bias: None or (K,) ((B, K)); only NC4 uses it.
        num_classes: K; default ``weight.shape[-2]``, else ``labels.max() + 1``.
        impl: backend of the statistics, ``"auto" | "triton" | "torch" | "cuda"``.

    Returns:
        :class:`NCMetrics`, or a list of B of them for batched features.
    """
    features = check_features(features)
    nb = features.shape[0] if features.dim() == 3 else None
    if num_classes is None:
        if isinstance(weight, torch.Tensor) and weight.dim() in (2, 3):
            num_classes = weight.shape[-2]
        else:
            check_labels(labels, features.shape[-2], None, features.device)
            num_classes = int(labels.max()) + 1
    num_classes = check_num_classes(num_classes)
    labels = check_labels(labels, features.shape[-2], num_classes, features.device)
    weight, bias = check_classifier(weight, bias, num_classes, features.shape[-1], nb, features.device)
    stats = two_pass_stats(features, labels, num_classes, _backend.resolve(impl, features.device, features.dtype))
    metrics = nc_metrics_from_stats(stats, weight)
    if weight is None:
        return metrics
    return with_nc4(metrics, nc4_mismatches(features, stats, weight, bias), stats.n)
