"""The specification (nnk.reference) against an independent fp64 computation,
and its gradients with gradcheck, for every option of the API."""
import math

import pytest
import torch
import torch.nn.functional as F

from cce_cases import OPTION_CASES, ground_truth, make_inputs, max_err
from nnk.reference import (
    cosine_cross_entropy_ref,
    margin_grad_ref,
    margin_value_ref,
    row_normalize_backward_ref,
    row_normalize_ref,
    target_sine_ref,
)


@pytest.mark.parametrize("case", OPTION_CASES, ids=[c[0] for c in OPTION_CASES])
def test_reference_matches_fp64_ground_truth(case):
    _, opts = case
    x, w, t, kw, _ = make_inputs(13, 7, 11, opts, requires_grad=False)
    kw["return_lse"] = True
    loss, lse = cosine_cross_entropy_ref(x, w, t, **kw)
    loss_gt, lse_gt = ground_truth(x, w, t, **kw)
    assert max_err(loss, loss_gt) < 1e-12
    assert max_err(lse, lse_gt) < 1e-12


EXACT_CASES = [c for c in OPTION_CASES if c[1].get("margin_grad") != "detached"]


@pytest.mark.parametrize("case", EXACT_CASES, ids=[c[0] for c in EXACT_CASES])
def test_reference_gradcheck(case):
    _, opts = case
    x, w, t, kw, leaves = make_inputs(6, 5, 7, opts)
    names = list(leaves)

    def f(*tensors):
        kws = dict(kw)
        args = dict(zip(names, tensors))
        if "scale" in args:
            kws["scale"] = args["scale"]
        if "bias" in args:
            kws["bias"] = args["bias"]
        kws["return_lse"] = True
        loss, lse = cosine_cross_entropy_ref(args["x"], args["weight"], t, **kws)
        return loss, lse

    assert torch.autograd.gradcheck(f, tuple(leaves[k] for k in names), atol=1e-6, rtol=1e-5)


def test_plain_linear_cross_entropy_equals_torch():
    x, w, t, kw, _ = make_inputs(9, 4, 6, {"bias": True}, requires_grad=False)
    got = cosine_cross_entropy_ref(x, w, t, bias=kw["bias"], normalize_input=False, normalize_weight=False)
    want = F.cross_entropy(x @ w.T + kw["bias"], t)
    assert max_err(got, want) < 1e-13


def test_all_ignored_mean_is_nan_like_torch():
    x, w, _, _, _ = make_inputs(4, 3, 5, {}, requires_grad=False)
    t = torch.full((4,), -100)
    got = cosine_cross_entropy_ref(x, w, t)
    want = F.cross_entropy(x @ w.T, t)
    assert torch.isnan(got) and torch.isnan(want)
    assert cosine_cross_entropy_ref(x, w, t, reduction="sum").item() == 0.0


def test_margin_value_is_arcface_formula():
    c = torch.linspace(-1, 1, 2001, dtype=torch.float64)
    for m in (0.1, 0.5, 1.2):
        theta = torch.acos(c)
        want = torch.where(theta + m <= math.pi, torch.cos(theta + m), c - m * math.sin(m))
        assert (margin_value_ref(c, m, 0.0) - want).abs().max() < 1e-12
    assert torch.equal(margin_value_ref(c * 1.5, 0.0, 0.25), c * 1.5 - 0.25)  # no clamp without angular margin


def test_margin_grad_is_finite_and_exact_inside():
    c = torch.linspace(-0.99, 0.99, 397, dtype=torch.float64, requires_grad=True)
    for m in (0.3, 0.5):
        (auto,) = torch.autograd.grad(torch.cos(torch.acos(c) + m).sum(), c)
        inside = torch.acos(c.detach()) + m <= math.pi
        assert (margin_grad_ref(c.detach(), m, True)[inside] - auto[inside]).abs().max() < 1e-9
    edge = torch.tensor([1.0, 1.0 - 1e-9, -1.0], dtype=torch.float64)
    g = margin_grad_ref(edge, 0.5, True)
    assert torch.isfinite(g).all()
    assert g[0] == pytest.approx(math.cos(0.5) + math.sin(0.5) / 1e-3)
    assert g[2] == 1.0  # fallback branch
    assert torch.equal(margin_grad_ref(edge, 0.5, False), torch.ones(3, dtype=torch.float64))


def test_target_sine_ref_is_exact_near_alignment():
    # Against sin(theta) = |x x w| / (|x| |w|) (the cross product: no
    # cancellation at small theta), on float32 rows 1e-5 to 0.3 rad apart:
    # rounded to float32 where the ArcFace gradient uses it (theta >= 1e-3,
    # above ARC_SIN_MIN), and within 3e-8 absolute below (the float64
    # cosine's rounding, ~1e-16, under the square root; psi = c cos m -
    # sin(theta) sin m is resolved to 6e-8), where sqrt(1 - c^2) of the
    # float32 reference's cosine errs by up to ~6e-8 / theta^2 relative.
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 3, generator=g, dtype=torch.float64)
    d = torch.linalg.cross(w, torch.randn(64, 3, generator=g, dtype=torch.float64))
    theta = torch.logspace(-5, math.log10(0.3), 64, dtype=torch.float64)
    x = (w / w.norm(dim=1, keepdim=True) + d / d.norm(dim=1, keepdim=True) * theta[:, None]) * 3.0
    x, w = x.float(), w.float()
    t = torch.arange(64)
    x64, w64 = x.double(), w.double()
    want = torch.linalg.cross(x64, w64).norm(dim=1) / (x64.norm(dim=1) * w64.norm(dim=1))
    got = target_sine_ref(x, w, t, angular_margin=0.5)
    assert got.dtype == torch.float32
    err = (got.double() - want).abs()
    assert (err / want)[theta >= 1e-3].max() < 2 * 2.0**-24 and err.max() < 3e-8
    c32 = F.normalize(x) @ F.normalize(w).T
    plain = (1 - c32.diagonal().double().clamp(max=1) ** 2).sqrt()
    assert ((plain - want).abs() / want).max() > 1e-3  # what it replaces
    # Margins with the given sine: the formula of margin_value_ref / margin_grad_ref.
    c = c32.diagonal().double().clamp(-1.0, 1.0)
    s_ = got.double()
    torch.testing.assert_close(margin_value_ref(c, 0.5, 0.1, got), c * math.cos(0.5) - s_ * math.sin(0.5) - 0.1,
                               rtol=1e-15, atol=0)
    torch.testing.assert_close(margin_grad_ref(c, 0.5, True, got),
                               math.cos(0.5) + math.sin(0.5) * c / s_.clamp_min(1e-3), rtol=1e-15, atol=0)


def test_target_sine_ref_on_zero_ignored_and_nan_rows():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [float("nan"), 1.0], [2.0, 2.0]])
    w = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    got = target_sine_ref(x, w, torch.tensor([0, 0, 1, 1]), angular_margin=0.5)
    # Parallel rows: 0 up to the float64 cosine's rounding under the root.
    assert got[0] == 1.0 and got[1] == 1.0 and got[2].isnan() and 0.0 <= got[3] < 3e-8
    assert target_sine_ref(x[:0], w, torch.zeros(0, dtype=torch.long), angular_margin=0.5).shape == (0,)


def test_row_normalize_ref_matches_F_normalize_and_its_gradient():
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        x[2] = 0
        x[3] *= 1e-14
    y, n = row_normalize_ref(x.detach(), 1e-12)
    assert max_err(y, F.normalize(x.detach(), dim=1)) < 1e-15
    g = torch.randn(6, 5, dtype=torch.float64)
    (want,) = torch.autograd.grad(F.normalize(x, dim=1), x, g)
    assert max_err(row_normalize_backward_ref(g, y, n, 1e-12), want) < 1e-12


def test_detached_margin_is_straight_through():
    """margin_grad="detached": gradients of the loss with psi - cos taken as a
    constant, i.e. autograd of psi = cos_t + (cos(theta + m) - cos_t).detach()."""
    x, w, t, kw, _ = make_inputs(8, 6, 9, {"scale": 16.0, "angular_margin": 0.5, "additive_margin": 0.1})
    loss = cosine_cross_entropy_ref(x, w, t, margin_grad="detached", **kw)
    gx, gw = torch.autograd.grad(loss, (x, w))

    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).T
    cos_t = cos.gather(1, t[:, None]).squeeze(1)
    psi = torch.cos(torch.acos(cos_t.clamp(-1, 1)) + 0.5) - 0.1
    psi_st = cos_t + (psi - cos_t).detach()
    logits = 16.0 * cos.scatter(1, t[:, None], psi_st[:, None])
    hx, hw = torch.autograd.grad(F.cross_entropy(logits, t), (x, w))
    assert max_err(gx, hx) < 1e-12 and max_err(gw, hw) < 1e-12


def test_float32_reference_takes_norms_in_float64():
    # Rows of 1e20: their float32 sum of squares overflows. The reference
    # (which every kernel test compares to) must still normalize them.
    torch.manual_seed(0)
    x, w, t = torch.randn(6, 5) * 1e20, torch.randn(4, 5), torch.randint(0, 4, (6,))
    got = cosine_cross_entropy_ref(x, w, t, scale=10.0)
    want = cosine_cross_entropy_ref(x.double(), w.double(), t, scale=10.0)
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())


@pytest.mark.parametrize("kw", [dict(), dict(additive_margin=0.2), dict(angular_margin=0.5, scale=16.0),
                                dict(angular_margin=0.5, margin_grad="detached", label_smoothing=0.1),
                                dict(normalize_input=False, normalize_weight=False)],
                         ids=["plain", "cosface", "arcface", "arcface-detached", "linear"])
def test_reference_under_torch_func(kw):
    """The README points users of torch.func to the reference: grad, vmap and
    jacrev (and their composition) run through it, margins included, and agree with
    autograd and a loop (the margin's autograd.Function had no setup_context,
    and torch.func refused it even without a margin)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 5, generator=gen, dtype=torch.float64)
    w = torch.randn(11, 5, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 11, (7,), generator=gen)

    def loss(a):
        return cosine_cross_entropy_ref(a, w, t, **kw)

    xa = x[0].clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(loss(xa), xa)
    torch.testing.assert_close(torch.func.grad(loss)(x[0]), expected, rtol=0, atol=0)
    torch.testing.assert_close(torch.func.vmap(loss)(x), torch.stack([loss(a) for a in x]), rtol=0, atol=0)
    per_set = torch.stack([torch.func.grad(loss)(a) for a in x])
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(loss))(x), per_set, rtol=1e-15, atol=1e-15)
    # jacrev of the (7,) per-row losses: row i's gradient in row i, zeros elsewhere.
    rows = torch.func.jacrev(lambda a: cosine_cross_entropy_ref(a, w, t, reduction="none", **kw))(x[0])
    for i in range(7):
        (want,) = torch.autograd.grad(cosine_cross_entropy_ref(xa, w, t, reduction="none", **kw)[i], xa)
        torch.testing.assert_close(rows[i], want, rtol=1e-15, atol=1e-15)
