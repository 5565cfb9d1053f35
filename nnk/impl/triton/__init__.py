"""``impl="triton"``: fused normalize + cosine logits + margin + cross-entropy
in Triton, forward and backward, without the N x C logits.

kernels (tile.py, forward.py, backward.py, norms.py) -> host launchers (same
files) -> ``torch.autograd.Function`` (function.py). Block sizes and work
splitting: configs.py.
"""
from .function import cosine_cross_entropy_triton

__all__ = ["cosine_cross_entropy_triton"]
