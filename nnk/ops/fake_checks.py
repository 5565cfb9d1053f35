"""The argument checks of the C++ ops, for their fake kernels.

Under ``torch.compile`` (and on meta tensors) only the fake kernels run at
trace time, so they reject what the kernels reject: otherwise a bad call
traces, infers shapes from arguments the op never accepts (a (C + 1,) scale,
int32 targets, a 1-element output_mask) and fails only when the graph runs.
Each function mirrors a C++ check header line for line; the messages name the
op as the C++ ones do:

    check_cce_inputs, check_row_vector     csrc/include/nnk/cce_driver.h
    check_row_normalize(_backward)         csrc/include/nnk/row_normalize_checks.h
    check_nc_features, check_nc_shifts     csrc/include/nnk/nc_checks.h

The checks of values (target and label ranges, the scale's sign) read data a
fake tensor does not have; the kernels make them at run time.
"""
from __future__ import annotations

import math

import torch

# The dtypes every kernel takes (csrc/include/nnk/dtypes.h) and the angular
# margin's bound (cce_driver.h kMaxAngularMargin), as nnk.functional checks them.
from .._options import FLOAT_DTYPES as KERNEL_DTYPES
from .._options import MAX_ANGULAR_MARGIN
from ..reference import acc_dtype

_DTYPE_NAMES = "float16, bfloat16, float32 or float64"


def _scalar_ok(v, ok) -> bool:
    """``ok(v)`` for a plain Python float; a symbolic float (torch.compile may
    trace one) is left to the kernel, rather than specialized here."""
    return ok(v) if isinstance(v, (int, float)) else True


def same_device(op: str, x: torch.Tensor, *tensors) -> None:
    """The tensor arguments (None skipped) are on x's device; ``op`` is the
    qualified name (``nnk::...``) the message gives. A direct call that mixes
    devices dispatches to the one of highest priority (meta before cpu),
    whose fake kernel would otherwise allocate outputs on x's device and
    return them unwritten."""
    for t in tensors:
        if t is not None:
            torch._check(t.device == x.device, lambda: f"{op}: tensors on {x.device} and {t.device}")


def check_cce_inputs(op: str, x, weight, target, scale, bias, *, normalize_input, normalize_weight,
                     additive_margin, angular_margin, label_smoothing, z_loss, eps, chunks) -> None:
    """``cce::check_inputs``: shapes, dtypes, devices and the scalar options
    (``chunks``: chunk_rows, chunk_classes, chunk_bytes)."""
    op = f"nnk::{op}"
    torch._check(x.dim() == 2, lambda: f"{op}: x must be 2-D (N, D), got shape {tuple(x.shape)}")
    torch._check(weight.dim() == 2, lambda: f"{op}: weight must be 2-D (C, D), got shape {tuple(weight.shape)}")
    torch._check(weight.shape[1] == x.shape[1],
                 lambda: f"{op}: weight must have D={x.shape[1]} columns like x, got shape {tuple(weight.shape)}")
    torch._check(weight.shape[0] >= 1, lambda: f"{op}: weight must have at least one class (C >= 1)")
    torch._check(x.dtype in KERNEL_DTYPES, lambda: f"{op}: x must be {_DTYPE_NAMES}, got {x.dtype}")
    torch._check(weight.dtype == x.dtype, lambda: f"{op}: weight dtype {weight.dtype} must match x dtype {x.dtype}")
    torch._check(target.dim() == 1 and target.shape[0] == x.shape[0],
                 lambda: f"{op}: target must have shape ({x.shape[0]},), got {tuple(target.shape)}")
    torch._check(target.dtype == torch.int64, lambda: f"{op}: target must be int64, got {target.dtype}")
    torch._check(scale.dtype in KERNEL_DTYPES, lambda: f"{op}: scale must be {_DTYPE_NAMES}, got {scale.dtype}")
    torch._check(scale.dim() == 0 or (scale.dim() == 1 and scale.shape[0] == weight.shape[0]),
                 lambda: f"{op}: scale must have shape () or ({weight.shape[0]},), got {tuple(scale.shape)}")
    same_device(op, x, weight, target, scale, bias)
    if bias is not None:
        torch._check(bias.dim() == 1 and bias.shape[0] == weight.shape[0],
                     lambda: f"{op}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        torch._check(bias.dtype in KERNEL_DTYPES, lambda: f"{op}: bias must be {_DTYPE_NAMES}, got {bias.dtype}")
    torch._check(_scalar_ok(eps, lambda v: math.isfinite(v) and v > 0),
                 lambda: f"{op}: eps must be finite and > 0, got {eps}")
    torch._check(_scalar_ok(label_smoothing, lambda v: 0 <= v <= 1),
                 lambda: f"{op}: label_smoothing must be in [0, 1], got {label_smoothing}")
    torch._check(_scalar_ok(z_loss, lambda v: math.isfinite(v) and v >= 0),
                 lambda: f"{op}: z_loss must be finite and >= 0, got {z_loss}")
    torch._check(_scalar_ok(additive_margin, math.isfinite),
                 lambda: f"{op}: additive_margin must be finite, got {additive_margin}")
    torch._check(_scalar_ok(angular_margin, lambda v: 0 <= v <= MAX_ANGULAR_MARGIN),
                 lambda: f"{op}: angular_margin must be in [0, pi], got {angular_margin}")
    torch._check(_scalar_ok(angular_margin, lambda v: v == 0) or (normalize_input and normalize_weight),
                 lambda: f"{op}: angular_margin needs normalize_input and normalize_weight")
    torch._check(all(_scalar_ok(v, lambda v: v >= 0) for v in chunks),
                 lambda: f"{op}: chunk_rows, chunk_classes and chunk_bytes must be >= 0 (0: from the budget), "
                         f"got {', '.join(map(str, chunks))}")


def check_row_vector(op: str, name: str, v, x) -> None:
    """``cce::check_row_vector``: a per-row (N,) vector of the backward."""
    torch._check(v.dim() == 1 and v.shape[0] == x.shape[0],
                 lambda: f"nnk::{op}: {name} must have shape ({x.shape[0]},), got {tuple(v.shape)}")
    torch._check(v.dtype in KERNEL_DTYPES, lambda: f"nnk::{op}: {name} must be {_DTYPE_NAMES}, got {v.dtype}")
    same_device(f"nnk::{op}", x, v)


def check_output_mask(op: str, output_mask, bias) -> None:
    """The schema's ``bool[4] output_mask``, and no grad_bias without a bias."""
    torch._check(len(output_mask) == 4, lambda: f"nnk::{op}: output_mask must have 4 entries, got {len(output_mask)}")
    torch._check(not output_mask[3] or bias is not None,
                 lambda: f"nnk::{op}: output_mask asks for grad_bias without a bias")


def check_row_normalize(x, eps) -> None:
    torch._check(x.dim() == 2, lambda: f"nnk::row_normalize: x must be 2-D (N, D), got {x.dim()}-D")
    torch._check(x.dtype in KERNEL_DTYPES, lambda: f"nnk::row_normalize: x must be {_DTYPE_NAMES}, got {x.dtype}")
    torch._check(_scalar_ok(eps, lambda v: math.isfinite(v) and v > 0),
                 lambda: f"nnk::row_normalize: eps must be finite and > 0, got {eps}")


def check_row_normalize_backward(grad_y, y, norm, eps) -> None:
    op = "nnk::row_normalize_backward"
    check_row_normalize(y, eps)
    torch._check(grad_y.shape == y.shape,
                 lambda: f"{op}: grad_y shape {tuple(grad_y.shape)} does not match y shape {tuple(y.shape)}")
    torch._check(grad_y.dtype in KERNEL_DTYPES, lambda: f"{op}: grad_y must be {_DTYPE_NAMES}, got {grad_y.dtype}")
    torch._check(norm.dim() == 1 and norm.shape[0] == y.shape[0],
                 lambda: f"{op}: norm must have shape ({y.shape[0]},), got {tuple(norm.shape)}")
    norm_dtype = acc_dtype(y.dtype)
    torch._check(norm.dtype == norm_dtype, lambda: f"{op}: norm must be {norm_dtype}, got {norm.dtype}")
    same_device(op, y, grad_y, norm)


def check_nc_features(op: str, features, labels) -> None:
    """``nc::check_features``: (N, D) or (B, N, D) features, (N,) int labels."""
    op = f"nnk::{op}"
    torch._check(features.dim() in (2, 3),
                 lambda: f"{op}: features must be (N, D) or (B, N, D), got shape {tuple(features.shape)}")
    torch._check(features.dtype in KERNEL_DTYPES, lambda: f"{op}: features must be {_DTYPE_NAMES}, got {features.dtype}")
    n = features.shape[-2]
    torch._check(labels.dim() == 1 and labels.shape[0] == n,
                 lambda: f"{op}: labels must have shape ({n},) like the rows of features, got {tuple(labels.shape)}")
    torch._check(labels.dtype in (torch.int64, torch.int32),
                 lambda: f"{op}: labels must be int64 or int32, got {labels.dtype}")
    same_device(op, features, labels)


def check_nc_shifts(op: str, shifts, features) -> None:
    """``nc::check_shifts``: (K, D), or (B, K, D) beside 3-D features."""
    op = f"nnk::{op}"
    batched = features.dim() == 3
    torch._check(shifts.dim() == 2 or (shifts.dim() == 3 and batched and shifts.shape[0] == features.shape[0]),
                 lambda: f"{op}: shifts must be (K, D), or (B, K, D) with the B of 3-D features; got shifts "
                         f"{tuple(shifts.shape)} for {features.dim()}-D features")
    torch._check(shifts.shape[-1] == features.shape[-1],
                 lambda: f"{op}: shifts must have D={features.shape[-1]} columns, got {tuple(shifts.shape)}")
    torch._check(shifts.dtype in KERNEL_DTYPES, lambda: f"{op}: shifts must be {_DTYPE_NAMES}, got {shifts.dtype}")
    same_device(op, features, shifts)
