"""Property-based tests (hypothesis) of the reference and the blockwise CPU
path: random shapes, options and values; invariants of the op."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nnk
from nnk.functional import resolve_impl
from nnk.reference import cosine_cross_entropy_ref, cosine_logits_ref

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw, normalized=False):
    n = draw(st.integers(1, 12))
    d = draw(st.integers(1, 9))
    c = draw(st.integers(1, 15))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * draw(st.sampled_from([1e-3, 1.0, 50.0]))
    w = torch.randn(c, d, generator=g, dtype=torch.float64)
    ignore = draw(st.booleans())
    t = torch.randint(0, c, (n,), generator=g)
    if ignore:
        t[torch.rand(n, generator=g) < 0.3] = -100
    norm_in = True if normalized else draw(st.booleans())
    norm_w = True if normalized else draw(st.booleans())
    angular = draw(st.sampled_from([0.0, 0.3, 0.5])) if (norm_in and norm_w) else 0.0
    kind = draw(st.sampled_from(["float", "tensor", "per_class"]))
    s = draw(st.floats(0.5, 64.0))
    scale = {"float": s, "tensor": torch.tensor(s, dtype=torch.float64),
             "per_class": torch.rand(c, generator=g, dtype=torch.float64) * s + 0.5}[kind]
    opts = dict(
        scale=scale,
        bias=torch.randn(c, generator=g, dtype=torch.float64) if draw(st.booleans()) else None,
        normalize_input=norm_in, normalize_weight=norm_w,
        additive_margin=draw(st.sampled_from([0.0, 0.2, -0.1])), angular_margin=angular,
        margin_grad=draw(st.sampled_from(["exact", "detached"])),
        label_smoothing=draw(st.sampled_from([0.0, 0.1])), z_loss=draw(st.sampled_from([0.0, 1e-3])),
    )
    return x, w, t, opts


def _loss_and_grads(fn, x, w, t, opts, **extra):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fn(x, w, t, **opts, **extra)
    if loss.dim():
        loss = loss.sum()
    if torch.isnan(loss):
        return loss, None, None
    gx, gw = torch.autograd.grad(loss, (x, w))
    return loss, gx, gw


@SETTINGS
@given(problems())
def test_torch_impl_agrees_with_reference(p):
    x, w, t, opts = p
    ref = _loss_and_grads(cosine_cross_entropy_ref, x, w, t, opts, reduction="sum")
    got = _loss_and_grads(nnk.cosine_cross_entropy, x, w, t, opts, reduction="sum", impl="torch")
    for a, b in zip(ref, got):
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-9)


@SETTINGS
@given(problems(normalized=True), st.floats(1e-3, 1e3), st.floats(1e-3, 1e3))
def test_normalized_op_is_scale_invariant(p, alpha, beta):
    x, w, t, opts = p
    a = nnk.cosine_cross_entropy(x, w, t, **opts, reduction="sum", impl="torch")
    b = nnk.cosine_cross_entropy(x * alpha, w * beta, t, **opts, reduction="sum", impl="torch")
    assert torch.allclose(a, b, rtol=1e-9, atol=1e-9)


@SETTINGS
@given(problems())
def test_class_permutation_permutes_the_gradient(p):
    x, w, t, opts = p
    c = w.shape[0]
    perm = torch.randperm(c)
    inv = torch.argsort(perm)
    popts = dict(opts)
    for k in ("bias", "scale"):
        if isinstance(opts[k], torch.Tensor) and opts[k].dim() == 1:
            popts[k] = opts[k][perm]
    pt = torch.where(t >= 0, inv[t.clamp_min(0)], t)
    la, _, gwa = _loss_and_grads(nnk.cosine_cross_entropy, x, w, t, opts, reduction="sum", impl="torch")
    lb, _, gwb = _loss_and_grads(nnk.cosine_cross_entropy, x, w[perm], pt, popts, reduction="sum", impl="torch")
    assert torch.allclose(la, lb, rtol=1e-9, atol=1e-9)
    assert torch.allclose(gwa[perm], gwb, rtol=1e-8, atol=1e-9)


@SETTINGS
@given(problems())
def test_sum_is_n_times_mean_without_ignored_rows(p):
    x, w, t, opts = p
    t = t.clamp_min(0)
    mean = nnk.cosine_cross_entropy(x, w, t, **opts, impl="torch")
    total = nnk.cosine_cross_entropy(x, w, t, **opts, reduction="sum", impl="torch")
    none = nnk.cosine_cross_entropy(x, w, t, **opts, reduction="none", impl="torch")
    assert math.isclose(total.item(), x.shape[0] * mean.item(), rel_tol=1e-9, abs_tol=1e-9)
    assert torch.allclose(none.sum(), total, rtol=1e-12)


def _compiled_impls():
    """The kernel impls runnable here on float32 CPU tensors (the extension's
    CPU kernels; Triton under the interpreter)."""
    out = []
    for impl in ("cuda", "triton"):
        try:
            resolve_impl(impl, torch.device("cpu"), torch.float32)
            out.append(impl)
        except (ValueError, TypeError):
            pass
    return out


@pytest.mark.parametrize("impl", ["cuda", "triton"])
# The Triton interpreter evaluates masked-off lanes in numpy too (exp of
# garbage logits overflows there, then inf * 0): warnings, not results.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                            "ignore:invalid value encountered:RuntimeWarning")
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                HealthCheck.function_scoped_fixture])
@given(p=problems())
def test_kernel_impls_agree_with_reference(impl, p):
    """Random shapes and options through the kernels (float32): loss and both
    gradients within 2x the float32 reference's error (+ 1e-5 relative, and
    for the loss an ulp of the largest logit per row: _agrees_with_reference),
    both against the float64 reference on the same rounded inputs. (A fixed
    tolerance against the unrounded inputs failed the float32 reference
    itself on ill-conditioned draws: rows of norm 1e-3 with a raw W.)"""
    if impl not in _compiled_impls():
        pytest.skip(f"impl={impl!r} not runnable on this machine")
    _agrees_with_reference(impl, *p)


@pytest.mark.parametrize("impl", ["cuda", "triton"])
def test_kernel_loss_of_large_tied_logits(impl):
    """A draw that failed CI with the loss judged against the loss's own
    magnitude only: one raw feature of -59.6, D = 1, W normalized (+-1: three
    classes tie at logit 238.3, the target among them), scale 4. The kernels'
    loss is one float32 ulp of that logit (1.5e-5) off, the reference's exact
    by chance; within the criterion's rounding term."""
    if impl not in _compiled_impls():
        pytest.skip(f"impl={impl!r} not runnable on this machine")
    g = torch.Generator().manual_seed(120)
    x = torch.randn(1, 1, generator=g, dtype=torch.float64) * 50
    w = torch.randn(5, 1, generator=g, dtype=torch.float64)
    _agrees_with_reference(impl, x, w, torch.tensor([4]), dict(
        scale=4.0, bias=None, normalize_input=False, normalize_weight=True, additive_margin=0.0,
        angular_margin=0.0, margin_grad="exact", label_smoothing=0.0, z_loss=0.0))


def _agrees_with_reference(impl, x, w, t, opts):
    x, w = x.float(), w.float()
    opts = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in opts.items()}
    opts64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in opts.items()}
    truth = _loss_and_grads(cosine_cross_entropy_ref, x.double(), w.double(), t, opts64, reduction="sum")
    ref = _loss_and_grads(cosine_cross_entropy_ref, x, w, t, opts, reduction="sum")
    got = _loss_and_grads(nnk.cosine_cross_entropy, x, w, t, opts, reduction="sum", impl=impl)
    # A row's loss moves with the rounding of its float32 logits, by up to an
    # ulp of the largest (2^-23 |z|) whatever order computes them: the kernels
    # apply the norms after the dot, the reference before it. With D = 1 the
    # reference's normalized W is exactly +-1 and its loss exact by chance,
    # while the kernels' logits of 238 were one ulp (1.5e-5 of loss) off.
    z_max = cosine_logits_ref(x.double(), w.double(), scale=opts64["scale"], bias=opts64["bias"],
                              normalize_input=opts["normalize_input"],
                              normalize_weight=opts["normalize_weight"]).abs().max().item()
    rounding = {"loss": x.shape[0] * 2.0**-23 * z_max, "dx": 0.0, "dw": 0.0}
    for name, tr, r, g in zip(("loss", "dx", "dw"), truth, ref, got):
        if tr is None:
            continue
        err, ref_err = ((v.double() - tr).abs().max().item() for v in (g, r))
        assert err <= 2 * ref_err + 1e-5 * max(1.0, tr.abs().max().item()) + rounding[name], (name, err, ref_err)
