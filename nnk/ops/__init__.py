"""The compiled operators (``torch.ops.nnk``) with their Python fronts."""
from ._extension import build_info, extension_error, has_extension, has_op
from .row_normalize import row_normalize, row_normalize_backward

__all__ = [
    "build_info",
    "extension_error",
    "has_extension",
    "has_op",
    "row_normalize",
    "row_normalize_backward",
]
