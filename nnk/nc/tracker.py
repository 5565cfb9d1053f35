"""``NCTracker``: neural-collapse statistics streamed over batches, merged
across data-parallel ranks, with an optional second pass for NC4."""
from __future__ import annotations

import dataclasses

import torch

from .._options import IMPLS, _choice
from . import _backend
from ._checks import check_classifier, check_dim, check_features, check_labels, check_num_classes
from .metrics import NCMetrics, nc4_mismatches, nc_metrics_from_stats, with_nc4
from .stats import F64, NCStats, assemble_stats, recenter_gram, sums_around


@dataclasses.dataclass
class _NC4Pass:
    stats: NCStats
    weight: torch.Tensor
    bias: torch.Tensor | None
    mismatches: torch.Tensor  # (B,) int64
    n: int = 0
    merged: bool = False


class NCTracker:
    """Neural-collapse statistics over any number of batches, in one pass.

    Per batch it computes class counts and the Gram of the features
    centered on a per-class shift ``c_k``: the mean of class k in the first
    batch that contains it, fixed from then on (kept in float64; kernels of
    lower-precision features center on it rounded to float32 and their Gram is
    re-expressed around it exactly). The running sums of ``h - c_k`` and the
    Gram are kept in float64; :meth:`compute` returns
    ``Sigma_W = (G_c - sum_k n_k (mu_k - c_k)(mu_k - c_k)^T) / N``, which has no
    catastrophic cancellation even on collapsed features (see
    :mod:`nnk.nc.stats`). ``mu_k - c_k`` comes from those running sums
    (``h - c_k`` formed before summing for float64 features), not from raw
    sums, whose rounding (~u |mu|) it would carry into Sigma_W to first
    order, and ``mu_k`` is ``c_k`` plus it. The result equals :func:`nnk.nc_stats` on the concatenated
    batches up to float32 rounding of the per-batch kernels (measured in the
    README's NC section).

    Args:
        num_classes: K.
        dim: D, the feature dimension.
        device: where the state lives and the batches must be (default CPU).
        batch: B for (B, N, D) batches (B feature sets sharing the labels);
            None: (N, D) batches, or (B, N, D) ones when the first non-empty
            batch has that shape (B is then fixed, as if given).
        impl: ``"auto" | "triton" | "torch" | "cuda"``, resolved per batch.

    State: O(K D + D^2): per B, two float64 (K, D) buffers (class sums of
    h - c, shifts), a float32 (K, D) copy of the shifts (what the kernels center
    16- and 32-bit features on) and one float64 (D, D) Gram.

    Usage::

        tracker = NCTracker(K, D, device="cuda")
        for x, y in loader:
            tracker.update(features_of(x), y)
        tracker.all_reduce()            # data-parallel only: raises without a process group
        stats = tracker.compute()       # NCStats
        tracker.begin_nc4(W, b)         # optional second pass for nc4
        for x, y in loader:
            tracker.update_nc4(features_of(x))
        tracker.all_reduce()            # data-parallel only: merges the nc4 counts
        metrics = tracker.metrics()     # NCMetrics with nc4
    """

    def __init__(self, num_classes: int, dim: int, device=None, *, batch: int | None = None, impl: str = "auto"):
        self.num_classes = check_num_classes(num_classes)
        self.dim = check_dim(dim)
        if batch is not None and (not isinstance(batch, int) or isinstance(batch, bool) or batch < 1):
            raise ValueError(f"batch must be None or an int >= 1, got {batch!r}")
        self.batch = batch
        self.device = torch.device("cpu" if device is None else device)
        self.impl = _choice("impl", impl, IMPLS)
        self.reset()

    def reset(self) -> None:
        """Forget every sample (and any merge or NC4 pass). B, once fixed by
        ``batch=`` or a first (B, N, D) batch, stays: the tracker then takes
        only (B, N, D) batches."""
        nb, k, d = self.batch or 1, self.num_classes, self.dim
        self.counts = torch.zeros(k, dtype=torch.int64, device=self.device)
        self.shifted_sums = torch.zeros(nb, k, d, dtype=F64, device=self.device)
        self.shifts = torch.zeros(nb, k, d, dtype=F64, device=self.device)
        self.gram = torch.zeros(nb, d, d, dtype=F64, device=self.device)
        self._shifts32 = torch.zeros(nb, k, d, dtype=torch.float32, device=self.device)
        self.device = self.counts.device  # "cuda" -> "cuda:<current>", as the batches' device reads
        self._merged = False
        self._nc4: _NC4Pass | None = None

    @property
    def n(self) -> int:
        return int(self.counts.sum())

    def _batch_of(self, features):
        """``self.batch``; for a tracker built without ``batch=`` that holds no
        sample yet, the B of (B, N, D) features."""
        if (self.batch is None and isinstance(features, torch.Tensor) and features.dim() == 3
                and features.shape[0] > 0 and self.n == 0):
            return features.shape[0]
        return self.batch

    def _check_batch(self, features, batch) -> torch.Tensor:
        # Empty batches (a padding mask that kept no token) are accepted as no-ops.
        features = check_features(features, batch=batch, dim=self.dim, min_rows=0)
        if features.device != self.device:
            raise ValueError(f"features are on {features.device} but the tracker is on {self.device}")
        return features

    @torch.no_grad()
    @_backend.without_autocast
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> NCTracker:
        """Add a batch: features (N, D) (or (B, N, D): with ``batch=B``, or
        fixing B on a tracker built without it that holds no sample yet),
        float 16/32/64, on the tracker's device; labels (N,) integer in [0, K).
        An empty batch (N = 0) adds nothing."""
        if self._merged or self._nc4 is not None:
            raise RuntimeError(
                "NCTracker.update() after all_reduce() or begin_nc4(): the statistics are final; call reset() first"
            )
        batch = self._batch_of(features)
        features = self._check_batch(features, batch)
        labels = check_labels(labels, features.shape[-2], self.num_classes, self.device)
        if features.shape[-2] == 0:
            return self
        if batch == self.batch:
            return self._add(features, labels)
        # B from this first batched update, kept only if the update succeeds.
        self.batch = batch
        self.reset()
        try:
            return self._add(features, labels)
        except BaseException:
            self.batch = None
            self.reset()
            raise

    def _add(self, features: torch.Tensor, labels: torch.Tensor) -> NCTracker:
        impl = _backend.resolve(self.impl, self.device, features.dtype)
        h = features[None] if self.batch is None else features
        # 1. Class counts and sums of the batch.
        counts, sums = _backend.class_sums(impl, h, labels, self.num_classes)
        # 2. Classes seen for the first time get their batch mean as shift.
        new = (counts > 0) & (self.counts == 0)
        if bool(new.any()):
            first = sums[:, new].to(F64) / counts[new, None].to(F64)
            self.shifts[:, new] = first
            self._shifts32[:, new] = first.to(torch.float32)
        # 3. The batch's Gram around the fixed shifts, then the float64 running
        #    sums. Kernels of float32 / 16-bit features center on the shifts
        #    rounded to float32; their Gram is moved onto the float64 shifts
        #    exactly (recenter_gram), so float64 batches keep float64 shifts
        #    (rounded ones would sit ~1e-8 |mu| from the means, far above a
        #    collapsed float64 sigma).
        #    The class sums of h - c likewise (stats.sums_around).
        sums, cnt = sums.to(F64), counts.to(F64)[:, None]
        if h.dtype == F64:
            gram = _backend.centered_gram(impl, h, labels, self.shifts)
            shifted = sums_around(impl, h, labels, self.shifts, self.num_classes)
        else:
            gram = recenter_gram(_backend.centered_gram(impl, h, labels, self._shifts32).to(F64),
                                 sums - cnt * self._shifts32.to(F64), counts, self._shifts32.to(F64), self.shifts)
            shifted = sums - cnt * self.shifts
        self.counts += counts
        self.shifted_sums += torch.where(counts[:, None] > 0, shifted, 0.0)
        self.gram += gram.to(F64)
        return self

    @_backend.without_autocast
    def compute(self) -> NCStats:
        """The statistics of every sample added so far (float64 NCStats)."""
        return assemble_stats(self.counts, None, self.shifts, self.gram, squeeze=self.batch is None,
                              shifted_sums=self.shifted_sums)

    # --- NC4: a second pass over the data ------------------------------------

    def begin_nc4(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> NCTracker:
        """Freeze the class means (:meth:`compute`) and start counting, over the
        batches given to :meth:`update_nc4`, the samples whose nearest class
        mean differs from ``argmax(h W^T + b)``. weight (K, D) (or (B, K, D)),
        bias (K,) (or (B, K)) or None."""
        stats = self.compute()
        weight, bias = check_classifier(weight, bias, self.num_classes, self.dim, self.batch, self.device)
        nb = self.batch or 1
        self._nc4 = _NC4Pass(stats, weight, bias, torch.zeros(nb, dtype=torch.int64, device=self.device))
        return self

    @torch.no_grad()
    @_backend.without_autocast
    def update_nc4(self, features: torch.Tensor, predicted: torch.Tensor | None = None) -> NCTracker:
        """Add a batch to the NC4 pass: features (N, D) (or (B, N, D) with
        ``batch=B``), as for :meth:`update`; labels are not needed. Every
        sample of the first pass must come through before :meth:`metrics`.
        ``predicted``: (N,) (or (B, N)) integer classes in [0, K), the
        classifier's decisions on these features, counted instead of
        ``argmax(h W^T + b)``: for a head that is not that linear map (an
        :class:`nnk.CosineLinear`'s ``s cos + b``)."""
        p = self._nc4
        if p is None:
            raise RuntimeError("NCTracker.update_nc4() before begin_nc4()")
        if p.merged:
            raise RuntimeError("NCTracker.update_nc4() after the NC4 counts were merged by all_reduce()")
        features = self._check_batch(features, self.batch)
        if predicted is not None:
            if not isinstance(predicted, torch.Tensor):
                raise TypeError(f"predicted must be a torch.Tensor, got {type(predicted).__name__}")
            if predicted.shape != features.shape[:-1]:
                raise ValueError(f"predicted must have shape {tuple(features.shape[:-1])} (the features' "
                                 f"without D), got {tuple(predicted.shape)}")
            check_labels(predicted.reshape(-1), predicted.numel(), self.num_classes, self.device, name="predicted")
        if features.shape[-2] == 0:
            return self
        p.mismatches += nc4_mismatches(features, p.stats, p.weight, p.bias, predicted)
        p.n += features.shape[-2]
        return self

    @property
    def nc4_samples(self) -> int | None:
        """Samples counted by the NC4 pass so far (all ranks' after its merge);
        None before :meth:`begin_nc4`."""
        return None if self._nc4 is None else self._nc4.n

    def metrics(self, weight: torch.Tensor | None = None) -> NCMetrics | list[NCMetrics]:
        """:func:`nnk.nc_metrics_from_stats` of :meth:`compute`, with ``nc4``
        filled in when an NC4 pass ran (weight then defaults to its weight;
        another weight is a ValueError: nc2, nc3 of one classifier beside the
        nc4 of another). A list of B NCMetrics for batched features."""
        p = self._nc4
        if p is not None and weight is None:
            weight = p.weight
        if p is not None and p.n > 0 and weight is not p.weight and not (
                isinstance(weight, torch.Tensor) and weight.shape == p.weight.shape
                and torch.equal(weight.to(p.weight), p.weight)):
            raise ValueError("NCTracker.metrics(weight): the NC4 pass ran with another weight (begin_nc4's); "
                             "call metrics() without weight, or reset() and begin again")
        m = nc_metrics_from_stats(self.compute() if p is None else p.stats, weight)
        if p is None or p.n == 0:
            return m
        if p.n != p.stats.n:
            # A fraction of part of the samples is not the NC4 of these statistics.
            raise ValueError(
                f"the NC4 pass saw {p.n} samples, the statistics {p.stats.n}: give update_nc4 every "
                "sample of the first pass (and all_reduce() after it in a data-parallel run)")
        return with_nc4(m, p.mismatches, p.n)

    # --- data parallelism -----------------------------------------------------

    @torch.no_grad()
    @_backend.without_autocast
    def all_reduce(self, group=None) -> NCTracker:
        """Merge the trackers of all ranks of ``group`` (torch.distributed), exactly.

        First call (after the :meth:`update` pass): every rank ends with the
        statistics of the union of all ranks' samples. The shift of each class
        becomes that of the lowest rank which has seen it; every rank first
        re-centers its own Gram onto those common shifts with the exact
        rank-one corrections of :func:`nnk.nc.stats.recenter_gram`, then counts,
        sums of h - c and Grams are summed (all_reduce). Communication: O(K + K D + D^2)
        per rank, no samples. After :meth:`begin_nc4` / :meth:`update_nc4`, the
        next call sums the NC4 counts.

        Collective: every rank of the group must call it. A rank whose tracker
        differs in (num_classes, dim, batch) or in its phase makes every rank
        raise ValueError (no rank is left waiting); a tracker built without
        ``batch=`` that holds no sample (an empty data-parallel rank) takes
        the others' B. Tensors travel on the
        tracker's device (CPU for gloo, CUDA for NCCL).
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("NCTracker.all_reduce() needs an initialized torch.distributed process group")
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        p = self._nc4
        phase = 0 if not self._merged and p is None else 1 if self._merged and p is not None and not p.merged else 2
        # B of a tracker built without batch= that saw no sample: -1, any B
        # (it adopts the others': an empty data-parallel rank).
        open_batch = self.batch is None and phase == 0 and self.n == 0
        meta = torch.tensor([self.num_classes, self.dim, -1 if open_batch else self.batch or 0, phase],
                            device=self.device)
        metas = [torch.empty_like(meta) for _ in range(world)]
        dist.all_gather(metas, meta, group=group)
        rows = [tuple(m.tolist()) for m in metas]
        batches = {row[2] for row in rows} - {-1}
        b = batches.pop() if len(batches) == 1 else -1
        if len({row[:2] + (b if row[2] == -1 else row[2],) + row[3:] for row in rows}) != 1:
            raise ValueError(
                "NCTracker.all_reduce: the ranks' trackers differ in (num_classes, dim, batch, phase) "
                "(batch -1: not fixed yet, any): " + ", ".join(f"rank {r}: {row}" for r, row in enumerate(rows))
            )
        if phase == 2:
            raise RuntimeError(
                "NCTracker.all_reduce: nothing to merge (statistics and NC4 counts already merged), or "
                "begin_nc4() was called before the statistics were merged"
            )
        if open_batch and b > 0:
            self.batch = b
            self.reset()
        if phase == 1:
            counts = torch.cat([p.mismatches, torch.tensor([p.n], device=self.device)])
            dist.all_reduce(counts, group=group)
            p.mismatches, p.n, p.merged = counts[:-1], int(counts[-1]), True
            return self
        # 1. The common shift of class k: that of the lowest rank holding k
        #    (a sum of one value and zeros: exact, identical on every rank).
        owner = torch.where(self.counts > 0, rank, world)
        dist.all_reduce(owner, op=dist.ReduceOp.MIN, group=group)
        common = torch.where((owner == rank)[None, :, None], self.shifts, 0.0)
        dist.all_reduce(common, group=group)
        # 2. This rank's Gram around the common shifts, then the sums.
        # The sums of h - c around them too: u + n (c - c'), of small terms.
        present = (self.counts > 0)[:, None]
        self.gram = recenter_gram(self.gram, self.shifted_sums, self.counts, self.shifts, common)
        moved = self.shifted_sums + self.counts.to(F64)[:, None] * (self.shifts - common)
        self.shifted_sums = torch.where(present, moved, 0.0)
        for t in (self.counts, self.shifted_sums, self.gram):
            dist.all_reduce(t, group=group)
        self.shifts = common
        self._shifts32 = common.to(torch.float32)
        self._merged = True
        return self
