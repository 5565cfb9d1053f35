"""Class-parallel cosine cross-entropy over torch.distributed (NCCL on GPUs,
gloo on CPUs): the classifier's classes are sharded over the ranks, which
exchange only O(N) per-row partials.

- :func:`cosine_cross_entropy`: the loss of a sharded classifier (every rank
  holds the full batch and its classes).
- :func:`cosine_cross_entropy_partials`: one shard's per-row partials (no
  communication), computed by any local backend.
- :class:`ShardedCosineLinear`: the data-parallel + class-parallel head
  (Partial FC): all-gathers the ranks' features, optional negative sampling,
  re-shardable state.
"""
from .loss import combine_partials, cosine_cross_entropy
from .partials import CCEPartials, cosine_cross_entropy_partials
from .sharded_linear import ShardedCosineLinear, sample_classes, shard_range

__all__ = [
    "CCEPartials",
    "ShardedCosineLinear",
    "combine_partials",
    "cosine_cross_entropy",
    "cosine_cross_entropy_partials",
    "sample_classes",
    "shard_range",
]
