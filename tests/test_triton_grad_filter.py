"""The opt-in sparse backward of impl="triton" (NNK_TRITON_GRAD_FILTER):
tiles whose every d cos entry is negligible at the batch's gradient scale
skip their d x and d W contributions. Checked against the exact kernel on
the documented bound (backward.cce_backward, step 0), in a case where tiles
are provably skipped, so that the bound is not checked vacuously.
"""
from __future__ import annotations

import pytest
import torch

from nnk.reference import cosine_cross_entropy_ref
from test_triton_cce import _case, _evaluate, _triton_fn

pytest.importorskip("triton")

TOL = 2.0**-12


def _dcos_l1(x, w, target, g_loss, g_lse, s, loss_kw):
    """||d cos_i||_1 per row in float64 for the objective <g_loss, loss> +
    <g_lse, lse> (g_loss 0-d for a reduced loss): the reference applied to the cosine matrix itself
    (unnormalized, against the identity), differentiated."""
    x64, w64 = x.double(), w.double()
    cos = (torch.nn.functional.normalize(x64, dim=1) @ torch.nn.functional.normalize(w64, dim=1).T)
    cos = cos.cpu().requires_grad_(True)
    eye = torch.eye(w.shape[0], dtype=torch.float64)
    loss, lse = cosine_cross_entropy_ref(cos, eye, target.cpu(), scale=s, normalize_input=False,
                                         normalize_weight=False, return_lse=True, **loss_kw)
    obj = (loss * g_loss.cpu().double()).sum() + (lse * g_lse.cpu().double()).sum()
    (dcos,) = torch.autograd.grad(obj, cos)
    return dcos.abs().sum(dim=1)


def _skippable_case(device, n=97, d=59, c=1031):
    """Targets among the first 200 classes, which live in the first 30
    features; the other classes in the remaining ones, orthogonal to every
    x. Rows 0-63 are confident (x close to w_y: tiny gradients), rows 64-96
    hard (x between w_y and another of the first 200 classes: gradients of
    order s), which sets the batch's gradient scale M. At s = 64 every class
    >= 256 then has probabilities below exp(-40) in every row: their tiles
    (256 classes wide in the interpreter, 64 or 128 on GPUs) must be skipped."""
    _, w, t, _, _ = _case(device, torch.float32, n, d, c)
    w[:200, 30:] = 0.0
    w[200:, :30] = 0.0
    t = t % 200
    noise = torch.randn(n, d, generator=torch.Generator().manual_seed(3)).to(device)
    noise[:, 30:] = 0.0
    x = torch.where(torch.arange(n, device=device)[:, None] < 64, w[t] + 0.05 * noise, w[t] + w[(t + 1) % 200])
    return x, w, t


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("with_lse", [False, True], ids=["loss", "loss+lse"])
def test_filter_skips_negligible_tiles_within_bound(device, deterministic, with_lse):
    n, d, c, s = 97, 59, 1031, 64.0
    loss_kw = dict(angular_margin=0.5, reduction="mean")
    x, w, t = _skippable_case(device, n, d, c)
    gen = torch.Generator().manual_seed(1)
    g_loss = torch.tensor(1.7, device=device)
    g_lse = (torch.randn(n, generator=gen) if with_lse else torch.zeros(n)).to(device)
    exact = _evaluate(_triton_fn(deterministic, grad_filter=0.0), x, w, t, s, None, loss_kw, g_loss, g_lse)
    sparse = _evaluate(_triton_fn(deterministic, grad_filter=TOL), x, w, t, s, None, loss_kw, g_loss, g_lse)

    # The forward is untouched.
    assert torch.equal(exact["loss"], sparse["loss"]) and torch.equal(exact["lse"], sparse["lse"])
    # Tiles were skipped: classes >= 256 get exactly no gradient, which the
    # exact kernel gives them (tiny, non-zero).
    assert exact["dw"][256:].abs().amax(dim=1).gt(0).all()
    assert torch.equal(sparse["dw"][256:], torch.zeros_like(sparse["dw"][256:]))
    _check_bound(exact, sparse, x, w, _dcos_l1(x, w, t, g_loss, g_lse, s, loss_kw).max())
    # Bias and scale gradients are reduced before the filter: exact.
    torch.testing.assert_close(sparse.get("dscale"), exact.get("dscale"), rtol=1e-6, atol=0.0)


def _check_bound(exact, sparse, x, w, m):
    """The bound (cce_backward, step 0): with M = max_i ||d cos_i||_1 (at least
    the kernel's lower bound of it), ||d dx_i|| <= tol M / ||x_i|| (W
    normalized) and ||d dw_j|| <= tol M N / C / ||w_j||; plus float32
    rounding of the sums that skipping reorders."""
    n, c = x.shape[0], w.shape[0]
    xn = x.double().norm(dim=1).cpu()
    wn = w.double().norm(dim=1).cpu()
    dx_bound = TOL * m / xn + 1e-6 * exact["dx"].norm(dim=1)
    dw_bound = TOL * m * n / c / wn + 1e-6 * exact["dw"].norm(dim=1)
    dx_err = (sparse["dx"] - exact["dx"]).norm(dim=1)
    dw_err = (sparse["dw"] - exact["dw"]).norm(dim=1)
    assert (dx_err <= dx_bound).all(), (dx_err / dx_bound).max()
    assert (dw_err <= dw_bound).all(), (dw_err / dw_bound).max()


def test_filter_bound_holds_where_the_target_derivative_exceeds_one(device):
    """The threshold's M must not exceed max_i ||d cos_i||_1. Row 0 lies on
    its class (ArcFace's d psi / d cos clamps near 480) while a duplicate of
    that class takes its softmax, and only its lse carries a gradient: a mass
    estimate s |sum_c dz_c| d psi, without min(1, d psi), overstated its norm
    480x and skipped tiles the bound does not allow (dW error 4.8x the bound)."""
    n, d, c, s = 65, 59, 1031, 64.0
    x, w, t, _, _ = _case(device, torch.float32, n, d, c)
    w[(int(t[0]) + 1) % c] = w[t[0]]
    x[0] = w[t[0]]
    kw = dict(angular_margin=0.5, reduction="none")
    g_loss = torch.full((n,), 1e-3, device=device)
    g_loss[0] = 0.0
    g_lse = torch.zeros(n, device=device)
    g_lse[0] = 1.0
    exact = _evaluate(_triton_fn(True, grad_filter=0.0), x, w, t, s, None, kw, g_loss, g_lse)
    sparse = _evaluate(_triton_fn(True, grad_filter=TOL), x, w, t, s, None, kw, g_loss, g_lse)
    _check_bound(exact, sparse, x, w, _dcos_l1(x, w, t, g_loss, g_lse, s, kw).max())


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the interpreter's numpy max
def test_filter_lets_nan_through(device):
    """A NaN row makes the threshold NaN: nothing may be skipped, so the NaN
    reaches dx and dW as in the exact kernel (and in PyTorch), instead of
    every tile being filtered into exact, finite zeros."""
    x, w, t = _skippable_case(device)
    x[5, 0] = float("nan")
    g = torch.tensor(1.0, device=device)
    glse = torch.zeros(x.shape[0], device=device)
    kw = dict(angular_margin=0.5)
    exact = _evaluate(_triton_fn(True, grad_filter=0.0), x, w, t, 64.0, None, kw, g, glse)
    sparse = _evaluate(_triton_fn(True, grad_filter=TOL), x, w, t, 64.0, None, kw, g, glse)
    assert exact["dw"].isnan().all()
    for name in ("dx", "dw"):
        assert torch.equal(sparse[name].isnan(), exact[name].isnan()), name


def test_filter_keeps_flat_softmax_exact(device):
    """A flat softmax (s = 1) has no negligible tile: the sparse backward
    computes the same gradients as the exact one. C > 1 / tol: every entry
    is about M / C, below tol M (a threshold C times too loose would skip
    them) but above the bound's tol M / C."""
    n, c = 4, 5000  # D = 256: cosines within +-0.25, so no entry stands out of its tile
    x, w, t, s, bias = _case(device, torch.float32, n, 256, c, scale=1.0)
    kw = dict(label_smoothing=0.1, reduction="sum")
    g = torch.tensor(1.0, device=device)
    glse = torch.zeros(n, device=device)
    exact = _evaluate(_triton_fn(True, grad_filter=0.0), x, w, t, s, bias, kw, g, glse)
    sparse = _evaluate(_triton_fn(True, grad_filter=TOL), x, w, t, s, bias, kw, g, glse)
    for name in exact:
        if device.type == "cpu":
            assert torch.equal(exact[name], sparse[name]), name
        else:
            # A GPU compiles the two variants apart, and may contract other
            # multiply-adds into FMAs: d z entries ulps apart, which entries of
            # d W that nearly cancel over the 4 rows turn into large relative
            # differences; a skipped tile would move entries by ~1 / C (2e-4)
            # of the largest.
            tol = 2.0**-20 * exact[name].abs().max().item()
            torch.testing.assert_close(sparse[name], exact[name], rtol=0.0, atol=tol,
                                       msg=lambda m, name=name: f"{name}: {m}")


def test_filter_env_parsing(monkeypatch):
    from nnk.impl.triton.configs import DEFAULT_GRAD_FILTER, grad_filter

    for value, tol in (("0", 0.0), ("1", DEFAULT_GRAD_FILTER), ("1e-3", 1e-3)):
        monkeypatch.setenv("NNK_TRITON_GRAD_FILTER", value)
        assert grad_filter() == tol
    for bad in ("2", "-1", "on"):
        monkeypatch.setenv("NNK_TRITON_GRAD_FILTER", bad)
        with pytest.raises(ValueError, match="NNK_TRITON_GRAD_FILTER"):
            grad_filter()


def test_env_var_turns_it_on(device, monkeypatch):
    """NNK_TRITON_GRAD_FILTER=1 as the forward runs selects the sparse
    backward of that call through the public API."""
    import nnk

    x, w, t = _skippable_case(device)
    dws = []
    for value in ("0", "1"):
        monkeypatch.setenv("NNK_TRITON_GRAD_FILTER", value)
        wl = w.clone().requires_grad_(True)
        loss = nnk.cosine_cross_entropy(x, wl, t, scale=64.0, angular_margin=0.5, impl="triton")
        monkeypatch.setenv("NNK_TRITON_GRAD_FILTER", "0")
        loss.backward()
        dws.append(wl.grad[256:])
    assert dws[0].abs().amax(dim=1).gt(0).all() and not dws[1].any()
