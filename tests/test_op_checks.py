"""Direct calls of the torch.ops.nnk operators with bad arguments: each is a
RuntimeError naming the problem, from the CPU kernels and, for everything but
data values, from the fake kernels as well (meta tensors, which is what
torch.compile traces with), with the same message."""
import math

import pytest
import torch
import torch.nn.functional as F

from nnk.ops import has_op

pytestmark = pytest.mark.skipif(not has_op("cosine_cross_entropy_fwd", "cpu") or not has_op("nc_centered_gram", "cpu"),
                                reason="nnk._C not built (or built without the ops)")

N, D, C = 5, 4, 7
FWD = dict(normalize_input=True, normalize_weight=True, additive_margin=0.0, angular_margin=0.0, ignore_index=-100,
           label_smoothing=0.0, z_loss=0.0, eps=1e-12, chunk_rows=0, chunk_classes=0, chunk_bytes=0)


def _cce():
    # Built inside the case: under `with torch.device("meta")` on the meta device.
    return dict(x=torch.randn(N, D), weight=torch.randn(C, D), target=torch.arange(N) % C,
                scale=torch.tensor(3.0), bias=torch.zeros(C))


def fwd(**change):
    a = {**_cce(), **FWD, **change}
    return torch.ops.nnk.cosine_cross_entropy_fwd(
        a["x"], a["weight"], a["target"], a["scale"], a["bias"], *(a[k] for k in FWD))


def bwd(**change):
    a = {**_cce(), **FWD, "exact_margin": True, "grad_loss": torch.ones(N), "grad_lse": None, "lse": torch.zeros(N),
         "lse_lo": torch.zeros(N), "output_mask": [True] * 4, **change}
    opts = [a[k] for k in ("normalize_input", "normalize_weight", "additive_margin", "angular_margin",
                           "exact_margin", "ignore_index", "label_smoothing", "z_loss", "eps", "chunk_rows", "chunk_classes",
                           "chunk_bytes")]
    return torch.ops.nnk.cosine_cross_entropy_bwd(
        a["grad_loss"], a["grad_lse"], a["x"], a["weight"], a["target"], a["scale"], a["bias"], a["lse"], a["lse_lo"],
        *opts, a["output_mask"])


def fwd_bwd(**change):
    a = {**_cce(), **FWD, "exact_margin": True, "grad_loss": torch.ones(N), "output_mask": [True] * 4, **change}
    opts = [a[k] for k in ("normalize_input", "normalize_weight", "additive_margin", "angular_margin",
                           "exact_margin", "ignore_index", "label_smoothing", "z_loss", "eps", "chunk_rows", "chunk_classes",
                           "chunk_bytes")]
    return torch.ops.nnk.cosine_cross_entropy_fwd_bwd(
        a["x"], a["weight"], a["target"], a["scale"], a["bias"], a["grad_loss"], *opts, a["output_mask"])


def row_normalize(x=None, eps=1e-12):
    return torch.ops.nnk.row_normalize(torch.randn(N, D) if x is None else x, eps)


def row_normalize_backward(g=None, y=None, norm=None, eps=1e-12):
    y = torch.randn(N, D) if y is None else y
    g = torch.randn(N, D) if g is None else g
    norm = torch.ones(N) if norm is None else norm
    return torch.ops.nnk.row_normalize_backward(g, y, norm, eps)


def class_sums(features=None, labels=None, num_classes=3):
    features = torch.randn(N, D) if features is None else features
    labels = torch.arange(N) % 3 if labels is None else labels
    return torch.ops.nnk.nc_class_sums(features, labels, num_classes)


def gram(features=None, labels=None, shifts=None):
    features = torch.randn(N, D) if features is None else features
    labels = torch.arange(N) % 3 if labels is None else labels
    shifts = torch.zeros(3, D) if shifts is None else shifts
    return torch.ops.nnk.nc_centered_gram(features, labels, shifts)


f8 = torch.float8_e4m3fn
# (id, call, message): rejected by the kernel and by the fake kernel alike.
STRUCTURAL = [
    ("fwd_x_1d", lambda: fwd(x=torch.randn(N)), "x must be 2-D"),
    ("fwd_d_mismatch", lambda: fwd(weight=torch.randn(C, D + 1)), f"weight must have D={D}"),
    ("fwd_weight_3d", lambda: fwd(weight=torch.randn(C, D, 1)), "weight must be 2-D"),
    ("fwd_no_class", lambda: fwd(weight=torch.randn(0, D), bias=None), "at least one class"),
    ("fwd_x_int", lambda: fwd(x=torch.ones(N, D, dtype=torch.int32)), "x must be float16"),
    ("fwd_x_fp8", lambda: fwd(x=torch.randn(N, D).to(f8), weight=torch.randn(C, D).to(f8)), "x must be float16"),
    ("fwd_dtype_mix", lambda: fwd(weight=torch.randn(C, D, dtype=torch.float64)), "weight dtype"),
    ("fwd_target_short", lambda: fwd(target=torch.zeros(N - 1, dtype=torch.long)), "target must have shape"),
    ("fwd_target_int32", lambda: fwd(target=torch.zeros(N, dtype=torch.int32)), "target must be int64"),
    ("fwd_scale_fp8", lambda: fwd(scale=torch.tensor(3.0).to(f8)), "scale must be float16"),
    ("fwd_scale_shape", lambda: fwd(scale=torch.ones(C + 1)), "scale must have shape"),
    ("fwd_bias_shape", lambda: fwd(bias=torch.zeros(C - 1)), "bias must have shape"),
    ("fwd_bias_int", lambda: fwd(bias=torch.zeros(C, dtype=torch.long)), "bias must be float16"),
    ("fwd_eps_inf", lambda: fwd(eps=math.inf), "eps must be finite and > 0"),
    ("fwd_eps_zero", lambda: fwd(eps=0.0), "eps must be finite and > 0"),
    ("fwd_smoothing", lambda: fwd(label_smoothing=1.5), r"label_smoothing must be in \[0, 1\]"),
    ("fwd_smoothing_nan", lambda: fwd(label_smoothing=math.nan), r"label_smoothing must be in \[0, 1\]"),
    ("fwd_z_loss_negative", lambda: fwd(z_loss=-1.0), "z_loss must be finite and >= 0"),
    ("fwd_z_loss_nan", lambda: fwd(z_loss=math.nan), "z_loss must be finite and >= 0"),
    ("fwd_additive_inf", lambda: fwd(additive_margin=math.inf), "additive_margin must be finite"),
    ("fwd_angular_negative", lambda: fwd(angular_margin=-0.5), r"angular_margin must be in \[0, pi\]"),
    ("fwd_angular_large", lambda: fwd(angular_margin=10.0), r"angular_margin must be in \[0, pi\]"),
    ("fwd_angular_nan", lambda: fwd(angular_margin=math.nan), r"angular_margin must be in \[0, pi\]"),
    ("fwd_angular_unnormalized", lambda: fwd(angular_margin=0.5, normalize_weight=False), "angular_margin needs"),
    ("fwd_chunk_rows_negative", lambda: fwd(chunk_rows=-1), "chunk_rows, chunk_classes and chunk_bytes must be >= 0"),
    ("bwd_chunk_classes_negative", lambda: bwd(chunk_classes=-4), "chunk_classes and chunk_bytes must be >= 0"),
    ("fwd_bwd_chunk_bytes_negative", lambda: fwd_bwd(chunk_bytes=-(1 << 20)), "chunk_bytes must be >= 0"),
    ("bwd_lse_shape", lambda: bwd(lse=torch.zeros(N + 1)), "lse must have shape"),
    # (read as (N,) vectors: a shorter one would be read out of bounds)
    ("bwd_lse_lo_shape", lambda: bwd(lse_lo=torch.zeros(N - 1)), "lse_lo must have shape"),
    ("bwd_grad_lse_shape", lambda: bwd(grad_lse=torch.ones(N - 1)), "grad_lse must have shape"),
    ("bwd_grad_loss_int", lambda: bwd(grad_loss=torch.ones(N, dtype=torch.long)), "grad_loss must be float16"),
    ("bwd_mask_bias", lambda: bwd(bias=None), "grad_bias without a bias"),
    ("bwd_z_loss_negative", lambda: bwd(z_loss=-1.0), "z_loss must be finite"),
    ("fwd_bwd_mask_bias", lambda: fwd_bwd(bias=None), "grad_bias without a bias"),
    ("fwd_bwd_grad_loss_shape", lambda: fwd_bwd(grad_loss=torch.ones(N + 2)), "grad_loss must have shape"),
    ("fwd_bwd_scale_shape", lambda: fwd_bwd(scale=torch.ones(2)), "scale must have shape"),
    ("row_normalize_1d", lambda: row_normalize(torch.randn(N)), "x must be 2-D"),
    ("row_normalize_int", lambda: row_normalize(torch.ones(N, D, dtype=torch.long)), "x must be float16"),
    ("row_normalize_fp8", lambda: row_normalize(torch.randn(N, D).to(f8)), "x must be float16"),
    ("row_normalize_eps_inf", lambda: row_normalize(eps=math.inf), "eps must be finite and > 0"),
    ("row_normalize_backward_grad_int", lambda: row_normalize_backward(g=torch.ones(N, D, dtype=torch.long)),
     "grad_y must be float16"),
    ("row_normalize_backward_grad_complex", lambda: row_normalize_backward(g=torch.ones(N, D, dtype=torch.complex64)),
     "grad_y must be float16"),
    ("row_normalize_backward_shape", lambda: row_normalize_backward(g=torch.ones(N, D + 1)), "does not match y shape"),
    ("row_normalize_backward_norm", lambda: row_normalize_backward(norm=torch.ones(N, dtype=torch.float64)),
     "norm must be"),
    ("class_sums_1d", lambda: class_sums(features=torch.randn(N)), r"features must be \(N, D\) or \(B, N, D\)"),
    ("class_sums_fp8", lambda: class_sums(features=torch.randn(N, D).to(f8)), "features must be float16"),
    ("class_sums_labels_short", lambda: class_sums(labels=torch.zeros(N - 1, dtype=torch.long)),
     "labels must have shape"),
    ("class_sums_labels_int16", lambda: class_sums(labels=torch.zeros(N, dtype=torch.int16)),
     "labels must be int64 or int32"),
    ("class_sums_negative_k", lambda: class_sums(num_classes=-1), "num_classes must be >= 0"),
    ("gram_labels_float", lambda: gram(labels=torch.zeros(N)), "labels must be int64 or int32"),
    ("gram_shifts_3d_for_2d", lambda: gram(shifts=torch.zeros(2, 3, D)), "shifts must be"),
    ("gram_shifts_columns", lambda: gram(shifts=torch.zeros(3, D + 1)), f"shifts must have D={D}"),
    ("gram_shifts_int", lambda: gram(shifts=torch.zeros(3, D, dtype=torch.long)), "shifts must be float16"),
]


@pytest.mark.parametrize("case", STRUCTURAL, ids=[c[0] for c in STRUCTURAL])
@pytest.mark.parametrize("where", ["kernel", "fake"])
def test_bad_arguments_are_rejected(case, where):
    _, call, msg = case
    if where == "kernel":
        with pytest.raises(RuntimeError, match=msg):
            call()
    else:
        with pytest.raises(RuntimeError, match=msg), torch.device("meta"):
            call()


def test_fwd_bwd_refuses_float16_gradients_on_cuda():
    # The CUDA GEMMs take d cos in float16, and only the backward op scales
    # the upstream gradients against its underflow (cce_driver.h grad_scale).
    # Fake CUDA tensors reach the fake kernel on any machine.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), torch.device("cuda"):
        half = dict(x=torch.randn(N, D, dtype=torch.float16), weight=torch.randn(C, D, dtype=torch.float16))
        fwd_bwd(**half, output_mask=[False] * 4)  # no gradients: allowed
        with pytest.raises(RuntimeError, match="float16 gradients on this device"):
            fwd_bwd(**half)


def test_mixed_devices_are_rejected():
    # A meta tensor among CPU ones dispatched to the fake kernel, which
    # returned unwritten CPU tensors.
    with pytest.raises(RuntimeError, match="tensors on cpu and meta"):
        fwd(weight=torch.randn(C, D, device="meta"))


def test_target_values_are_checked():
    bad = torch.arange(N) % C
    bad[4] = C
    with pytest.raises(RuntimeError, match=rf"fwd: target values must be in \[0, {C}\) or ignore_index=-100, got {C} at row 4"):
        fwd(target=bad)
    # The backward ops too: a target >= C was read as an ignored row (zero gradients).
    with pytest.raises(RuntimeError, match=rf"cosine_cross_entropy_bwd: target values must be in \[0, {C}\)"):
        bwd(target=bad)
    with pytest.raises(RuntimeError, match=rf"fwd_bwd: target values must be in \[0, {C}\)"):
        fwd_bwd(target=bad)


VALUES = [
    ("scale_nan", dict(scale=torch.tensor(math.nan))),
    ("scale_inf", dict(scale=torch.tensor(math.inf))),
    ("scale_negative", dict(scale=torch.tensor(-1.0))),
    ("scale_zero_per_class", dict(scale=torch.tensor([1.0] * (C - 1) + [0.0]))),
    # Finite in float64, infinite in the float32 the kernels compute in.
    ("scale_float64_beyond_float32", dict(scale=torch.tensor(1e39, dtype=torch.float64))),
]


@pytest.mark.parametrize("case", VALUES, ids=[c[0] for c in VALUES])
@pytest.mark.parametrize("op", [fwd, bwd, fwd_bwd], ids=["fwd", "bwd", "fwd_bwd"])
def test_scale_values_are_checked(case, op):
    with pytest.raises(RuntimeError, match="scale must be finite and > 0"):
        op(**case[1])


def test_a_float64_scale_is_judged_in_float64_for_float64_inputs():
    a = _cce()
    loss, _, _ = fwd(x=a["x"].double(), weight=a["weight"].double(), bias=None,
                     scale=torch.tensor(1e39, dtype=torch.float64))
    assert torch.isfinite(loss).all()


def test_row_normalize_keeps_a_nan_row_nan():
    # F.normalize's clamp_min propagates NaN; a comparison with eps that
    # picked eps for a NaN norm returned the row's other entries / eps.
    x = torch.tensor([[math.nan, 1.0, -2.0], [3.0, 4.0, 0.0], [0.0, 0.0, 0.0]])
    y, norm = torch.ops.nnk.row_normalize(x, 1e-12)
    torch.testing.assert_close(y, F.normalize(x, dim=1), equal_nan=True)
    assert torch.isnan(y[0]).all() and torch.isnan(norm[0])
    dx = torch.ops.nnk.row_normalize_backward(torch.ones_like(x), y, norm, 1e-12)
    assert torch.isnan(dx[0]).all() and torch.isfinite(dx[1:]).all()


def test_backward_through_the_op_on_meta_tensors():
    """Autograd through the op on meta tensors (shape propagation, as
    torch.compile's fake tensors do): the backward's fake kernel gives the
    gradients' shapes. Turning autocast off there raised ("unsupported
    scalarType": meta has no autocast)."""
    with torch.device("meta"):
        a = _cce()
        x, w = a["x"].requires_grad_(True), a["weight"].requires_grad_(True)
        loss, lse, _ = torch.ops.nnk.cosine_cross_entropy_fwd(x, w, a["target"], a["scale"], a["bias"],
                                                              *FWD.values())
        dx, dw = torch.autograd.grad(loss.sum() + lse.sum(), (x, w))
    assert dx.shape == (N, D) and dw.shape == (C, D) and dx.is_meta
