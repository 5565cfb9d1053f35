"""nnk: fused kernels for normalized (cosine) classification heads.

``import nnk`` never initializes CUDA and works without the compiled
extension (``nnk.ops.build_info()`` says whether it is loaded).
"""
import torch  # noqa: F401  (loads libtorch before the extension nnk._C)

from . import distributed, ops, reference
from ._version import __version__
from .functional import cosine_cross_entropy, cosine_logits, cosine_topk
from .modules import CosineCrossEntropyLoss, CosineLinear, default_scale, project_after_step, replace_head
from .nc import NCMetrics, NCStats, NCTracker, nc_metrics, nc_metrics_from_stats, nc_stats

__all__ = [
    "CosineCrossEntropyLoss",
    "CosineLinear",
    "NCMetrics",
    "NCStats",
    "NCTracker",
    "__version__",
    "cosine_cross_entropy",
    "cosine_logits",
    "cosine_topk",
    "default_scale",
    "distributed",
    "nc_metrics",
    "nc_metrics_from_stats",
    "nc_stats",
    "ops",
    "project_after_step",
    "reference",
    "replace_head",
]
