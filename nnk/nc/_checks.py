"""Argument checks of the NC entry points: one place, run before any kernel."""
from __future__ import annotations

import torch

from .._options import FLOAT_DTYPES, int_option

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_num_classes(num_classes) -> int:
    return int_option("num_classes", num_classes, lo=1)


def check_dim(dim) -> int:
    return int_option("dim", dim, lo=1)


def check_features(features, *, batch: int | None | bool = False, dim: int | None = None,
                   min_rows: int = 1) -> torch.Tensor:
    """features: (N, D) (``batch=None``), (B, N, D) with this B (``batch=B``),
    or either (``batch=False``); float16/bfloat16/float32/float64, finite,
    N >= min_rows (a tracker's batch may be empty), B >= 1. Returned
    detached: the statistics are not differentiable."""
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if features.dtype not in FLOAT_DTYPES:
        raise TypeError(f"features must be float16, bfloat16, float32 or float64, got {features.dtype}")
    if features.device.type == "meta":
        # The value checks (finiteness, label range) read data a meta tensor does not have.
        raise ValueError("features are a meta tensor: the NC statistics need data")
    want = {None: (2,), False: (2, 3)}.get(batch, (3,))
    if features.dim() not in want:
        shape = {2: "(N, D)", 3: f"({'B' if batch is False else batch}, N, D)"}
        raise ValueError(
            f"features must be {' or '.join(shape[w] for w in want)}, got shape {tuple(features.shape)}"
        )
    if batch not in (None, False) and features.shape[0] != batch:
        raise ValueError(f"features must have batch size {batch} (first dim), got shape {tuple(features.shape)}")
    if dim is not None and features.shape[-1] != dim:
        raise ValueError(f"features must have D={dim} columns, got shape {tuple(features.shape)}")
    if features.shape[-1] == 0:
        raise ValueError("features must have D >= 1 columns, got D=0")
    if features.shape[-2] < min_rows:
        raise ValueError("features must have at least one row (N >= 1), got N=0")
    if features.dim() == 3 and features.shape[0] == 0:
        raise ValueError(f"features must hold at least one feature set (B >= 1), got shape {tuple(features.shape)}")
    if features.numel() == 0:
        return features.detach()
    # aminmax reads the tensor once without a temporary; NaN propagates to it.
    lo, hi = torch.aminmax(features)
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        raise ValueError("features contain NaN or infinite values")
    return features.detach()


def check_labels(labels, n: int, num_classes: int | None, device: torch.device, name: str = "labels") -> torch.Tensor:
    """labels: (n,) integer tensor on ``device`` with values in [0, num_classes)
    (``num_classes`` None: to be taken as ``labels.max() + 1``, so >= 0 only)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor (int64, int32, ...), got {labels.dtype}")
    if labels.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) like the rows of features, got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{name} are on {labels.device} but features are on {device}")
    if n == 0:
        return labels
    lo, hi = int(labels.min()), int(labels.max())
    if num_classes is None:
        if lo < 0:
            raise ValueError(f"{name} must be >= 0 (num_classes, neither given nor taken from a weight, is "
                             f"labels.max() + 1), got {lo}")
        return labels
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} must be in [0, {num_classes}) (num_classes={num_classes}), got {bad}")
    return labels


def check_classifier(weight, bias, num_classes: int, dim: int, batch: int | None, device: torch.device):
    """weight: (K, D) (or (B, K, D) for batched features) float, on ``device``;
    bias: None or (K,) / (B, K) float. Returns them detached."""
    if weight is None:
        if bias is not None:
            raise ValueError("bias was given without weight")
        return None, None
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor or None, got {type(weight).__name__}")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"weight must be floating point, got {weight.dtype}")
    shapes = [(num_classes, dim)] + ([(batch, num_classes, dim)] if batch is not None else [])
    if tuple(weight.shape) not in shapes:
        raise ValueError(f"weight must have shape {' or '.join(map(str, shapes))}, got {tuple(weight.shape)}")
    if weight.device != device:
        raise ValueError(f"weight is on {weight.device} but features are on {device}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight contains NaN or infinite values")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.dtype not in FLOAT_DTYPES:
            raise TypeError(f"bias must be floating point, got {bias.dtype}")
        if tuple(bias.shape) != tuple(weight.shape[:-1]):
            raise ValueError(f"bias must have shape {tuple(weight.shape[:-1])} like weight's rows, got {tuple(bias.shape)}")
        if bias.device != device:
            raise ValueError(f"bias is on {bias.device} but features are on {device}")
        if not bool(torch.isfinite(bias).all()):
            raise ValueError("bias contains NaN or infinite values")
        bias = bias.detach()
    return weight.detach(), bias
