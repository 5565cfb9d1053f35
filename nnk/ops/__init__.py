"""The compiled operators (``torch.ops.nnk``) with their Python fronts."""
from . import cce  # noqa: F401  (fake kernels of nnk::cosine_cross_entropy_fwd/_bwd)
from ._extension import build_info, cce_block_shape, extension_error, has_extension, has_op
from .nc import nc_centered_gram, nc_class_sums
from .row_normalize import row_normalize, row_normalize_backward

__all__ = [
    "build_info",
    "cce_block_shape",
    "extension_error",
    "has_extension",
    "has_op",
    "nc_centered_gram",
    "nc_class_sums",
    "row_normalize",
    "row_normalize_backward",
]
