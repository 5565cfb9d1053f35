"""Neural-collapse statistics and metrics (NC1-NC4).

- :func:`nc_stats`: exact two-pass statistics of in-memory features;
- :class:`NCTracker`: the same streamed over batches (and merged across
  data-parallel ranks);
- :func:`nc_metrics`, :func:`nc_metrics_from_stats`: NC1-NC4;
- :func:`collect_nc_metrics`: a model over a DataLoader;
- ``python -m nnk nc``: saved tensors (:mod:`nnk.nc.cli`).

Importing this package does not import triton (only ``impl="triton"`` does).
"""
from .collect import collect_nc_metrics
from .metrics import NCMetrics, nc_metrics, nc_metrics_from_stats
from .stats import NCStats, nc_stats
from .tracker import NCTracker

__all__ = [
    "NCMetrics",
    "NCStats",
    "NCTracker",
    "collect_nc_metrics",
    "nc_metrics",
    "nc_metrics_from_stats",
    "nc_stats",
]
