"""nnk.CosineLinear, replace_head, project_after_step and CosineCrossEntropyLoss,
checked against nn.Linear, nnk.cosine_cross_entropy and the reference."""
import copy
import json
import math
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nnk
from nnk.modules import default_scale
from nnk.reference import cosine_cross_entropy_ref
from peak_rss import FIXED_MMAP_THRESHOLD


def _cos(x, w):
    return F.normalize(x.double(), dim=-1) @ F.normalize(w.double(), dim=-1).T


# --- construction and the default scale ---------------------------------------


def test_default_scale_reaches_target_prob_at_the_etf():
    for c, m in [(10, 0.0), (1000, 0.0), (100_000, 0.35)]:
        s = default_scale(c, additive_margin=m)
        gap = 1.0 - m + 1.0 / (c - 1)  # target cos 1 - m, others -1/(C-1)
        p = 1.0 / (1.0 + (c - 1) * math.exp(-s * gap))
        assert p == pytest.approx(0.999, abs=1e-9)
    assert default_scale(10) == pytest.approx(8.1936, abs=1e-3)
    assert nnk.CosineLinear(4, 1000).scale == pytest.approx(default_scale(1000))
    assert default_scale(1) == 1.0
    with pytest.raises(ValueError, match="scale="):
        default_scale(10, additive_margin=2.5)


@pytest.mark.parametrize("args, kwargs, err, name", [
    ((0,), {}, ValueError, "num_classes"), ((-5,), {}, ValueError, "num_classes"),
    ((10.5,), {}, TypeError, "num_classes"), ((True,), {}, TypeError, "num_classes"),
    (("10",), {}, TypeError, "num_classes"),
    ((10,), {"additive_margin": float("nan")}, ValueError, "additive_margin"),
    ((10,), {"additive_margin": -math.inf}, ValueError, "additive_margin"),
    ((10,), {"angular_margin": float("nan")}, ValueError, "angular_margin"),
    ((10,), {"angular_margin": -1.0}, ValueError, "angular_margin"),
    ((10,), {"angular_margin": 2 * math.pi}, ValueError, "angular_margin"),
    ((10,), {"target_prob": float("nan")}, ValueError, "target_prob"),
])
def test_default_scale_checks_its_arguments(args, kwargs, err, name):
    # They gave NaN, 0.0 or a number for a margin the loss refuses.
    with pytest.raises(err, match=name):
        default_scale(*args, **kwargs)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan"), "8", True])
def test_bad_scale_names_the_argument(bad):
    err = TypeError if isinstance(bad, (str, bool)) else ValueError
    with pytest.raises(err, match="scale"):
        nnk.CosineLinear(4, 3, scale=bad)
    with pytest.raises(err, match="scale"):
        nnk.CosineCrossEntropyLoss(scale=bad)


def test_bad_options_name_the_argument():
    with pytest.raises(ValueError, match="angular_margin"):
        nnk.CosineLinear(4, 3, angular_margin=0.5, normalize_weight=False)
    with pytest.raises(ValueError, match="margin_grad"):
        nnk.CosineLinear(4, 3, margin_grad="straight")
    head = nnk.CosineLinear(4, 3)
    x, t = torch.randn(2, 4), torch.tensor([0, 1])
    with pytest.raises(TypeError, match="scale is set by the module"):
        head.loss(x, t, scale=3.0)
    with pytest.raises(TypeError, match="smoothing"):
        head.loss(x, t, smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        head.loss(x, t, label_smoothing=2.0)
    with pytest.raises(ValueError, match="shape"):
        head(torch.randn(2, 5))
    with pytest.raises(ValueError, match="target"):
        head.loss(torch.randn(2, 3, 4), torch.tensor([0, 1]))


# --- state_dict with nn.Linear ---------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
def test_state_dict_round_trips_with_linear(bias):
    torch.manual_seed(0)
    head = nnk.CosineLinear(7, 5, bias=bias, scale=3.0)
    lin = nn.Linear(7, 5, bias=bias)
    assert set(head.state_dict()) == set(lin.state_dict())
    lin.load_state_dict(head.state_dict())  # strict
    for name, p in lin.state_dict().items():
        assert torch.equal(p, head.state_dict()[name])
    lin2 = nn.Linear(7, 5, bias=bias)
    head.load_state_dict(lin2.state_dict())  # strict
    for name, p in lin2.state_dict().items():
        assert torch.equal(p, head.state_dict()[name])


@pytest.mark.parametrize("per_class", [False, True])
def test_state_dict_with_learned_scale(per_class):
    torch.manual_seed(0)
    head = nnk.CosineLinear(6, 4, bias=True, scale=10.0, learn_scale=True, per_class_scale=per_class)
    assert head.log_scale.shape == ((4,) if per_class else (1,))  # FSDP2 refuses 0-d parameters
    assert head.scale.shape == ((4,) if per_class else ())
    with torch.no_grad():
        head.log_scale.add_(torch.linspace(0.1, 0.4, 4) if per_class else torch.tensor(0.3))
    learned = head.log_scale.detach().clone()
    lin = nn.Linear(6, 4)
    other = copy.deepcopy(head)
    param = other.log_scale
    other.load_state_dict(lin.state_dict())  # strict: log_scale starts at the initial scale
    assert torch.equal(other.weight, lin.weight) and other.log_scale is param
    assert torch.allclose(other.log_scale, torch.full_like(learned, math.log(10.0)))
    with pytest.raises(RuntimeError, match="log_scale"):
        nn.Linear(6, 4).load_state_dict(head.state_dict())
    res = lin.load_state_dict(head.state_dict(), strict=False)
    assert res.unexpected_keys == ["log_scale"] and not res.missing_keys
    other = nnk.CosineLinear(6, 4, bias=True, scale=10.0, learn_scale=True, per_class_scale=per_class)
    other.load_state_dict(head.state_dict())
    assert torch.equal(other.log_scale, learned)
    other.reset_parameters()
    assert torch.allclose(other.log_scale, torch.full_like(learned, math.log(10.0)))
    if not per_class:  # a checkpoint of the 0-d log_scale of earlier versions
        other.load_state_dict({**head.state_dict(), "log_scale": learned.reshape(())})
        assert torch.equal(other.log_scale, learned)


@pytest.mark.parametrize("per_class", [False, True])
def test_built_on_the_meta_device_then_materialized(per_class):
    # How heads of millions of classes are built for FSDP: no memory until
    # to_empty, then reset_parameters initializes every parameter as __init__.
    with torch.device("meta"):
        head = nnk.CosineLinear(6, 5, bias=True, scale=10.0, learn_scale=True, per_class_scale=per_class)
    assert head.weight.is_meta
    head = head.to_empty(device="cpu")
    head.reset_parameters()
    fresh = nnk.CosineLinear(6, 5, bias=True, scale=10.0, learn_scale=True, per_class_scale=per_class)
    assert torch.equal(head.log_scale, fresh.log_scale)
    bound = 1 / math.sqrt(6)  # nn.Linear's init, which CosineLinear keeps
    for p in (head.weight, head.bias):
        assert p.abs().max() <= bound and p.std() > 0
    x, t = torch.randn(4, 6), torch.randint(0, 5, (4,))
    assert torch.isfinite(head.loss(x, t))


@pytest.mark.parametrize("per_class", [False, True])
@pytest.mark.parametrize("assign", [False, True])
def test_meta_head_loads_a_linear_state(per_class, assign):
    # A learnable-scale head built on the meta device takes an nn.Linear
    # checkpoint: log_scale, absent from it, must get the initial scale, not
    # to_empty's uninitialized memory nor stay on meta (assign=True).
    lin = nn.Linear(6, 5, bias=True, dtype=torch.float64)
    with torch.device("meta"):
        head = nnk.CosineLinear(6, 5, bias=True, scale=10.0, learn_scale=True, per_class_scale=per_class)
    if not assign:
        head = head.to_empty(device="cpu").double()
        with torch.no_grad():
            head.log_scale.fill_(float("nan"))  # stands for to_empty's arbitrary memory
    head.load_state_dict(lin.state_dict(), assign=assign)
    assert head.log_scale.device == head.weight.device == torch.device("cpu")
    assert head.log_scale.dtype == torch.float64 and head.log_scale.requires_grad
    torch.testing.assert_close(head.log_scale, torch.full((5 if per_class else 1,), math.log(10.0),
                                                          dtype=torch.float64))
    assert torch.equal(head.weight, lin.weight)
    assert torch.isfinite(head.loss(torch.randn(4, 6, dtype=torch.float64), torch.randint(0, 5, (4,))))


def test_a_state_without_the_head_leaves_its_learnt_scale():
    # Only a state of this head (its weight present) resets a missing
    # log_scale: a backbone-only checkpoint loaded with strict=False reset the
    # trained scale of 20.1 to its initial 10 and hid log_scale from the
    # missing keys.
    model = nn.Sequential(nn.Linear(4, 6), nnk.CosineLinear(6, 5, scale=10.0, learn_scale=True))
    with torch.no_grad():
        model[1].log_scale.fill_(3.0)
    res = model.load_state_dict({"0.weight": torch.randn(6, 4), "0.bias": torch.randn(6)}, strict=False)
    assert sorted(res.missing_keys) == ["1.log_scale", "1.weight"]
    assert model[1].log_scale.item() == 3.0
    assert "scale=20.09 (learned" in repr(model[1])


def test_forward_returns_its_logits_not_a_view():
    # FSDP2 warns about module outputs that are views (an in-place op on one
    # would skip its backward hook): for 2-D x, as nn.Linear, a fresh tensor.
    head = nnk.CosineLinear(6, 4)
    assert head(torch.randn(3, 6))._base is None


# --- forward ---------------------------------------------------------------------


def test_forward_is_scaled_cosine_plus_bias_with_leading_dims():
    torch.manual_seed(0)
    head = nnk.CosineLinear(9, 6, bias=True, scale=5.0)
    x = torch.randn(2, 3, 9)
    want = 5.0 * _cos(x, head.weight) + head.bias.double()
    got = head(x)
    assert got.shape == (2, 3, 6) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_forward_without_normalization_is_linear():
    torch.manual_seed(0)
    lin = nn.Linear(9, 6)
    head = nnk.CosineLinear.from_linear(lin, scale=1.0, normalize_input=False, normalize_weight=False)
    x = torch.randn(4, 9)
    torch.testing.assert_close(head(x), lin(x))


def test_half_module_gives_float32_logits():
    head = nnk.CosineLinear(8, 5, scale=20.0).half()
    x = torch.randn(3, 8).half()
    out = head(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), 20.0 * _cos(x, head.weight), rtol=0, atol=2e-2)


# --- from_linear / replace_head ----------------------------------------------------


def test_from_linear_shares_parameters_and_keeps_cosine_argmax():
    torch.manual_seed(0)
    lin = nn.Linear(16, 11)
    head = nnk.CosineLinear.from_linear(lin, bias=False, scale=12.0)
    assert head.weight is lin.weight and head.bias is None
    assert head.weight.device == lin.weight.device and not head.weight.is_meta
    x = torch.randn(50, 16)
    want = _cos(x, lin.weight).argmax(1)
    assert torch.equal(head(x).argmax(1), want)
    assert torch.equal(head.predict(x)[0].squeeze(1), want)

    kept = nnk.CosineLinear.from_linear(lin)  # keeps the bias by default
    assert kept.bias is lin.bias
    added = nnk.CosineLinear.from_linear(nn.Linear(16, 11, bias=False), bias=True)
    assert torch.equal(added.bias, torch.zeros(11))
    learned = nnk.CosineLinear.from_linear(lin, per_class_scale=True, scale=4.0)
    assert not learned.log_scale.is_meta
    torch.testing.assert_close(learned.scale, torch.full((11,), 4.0))
    with pytest.raises(TypeError, match="nn.Linear"):
        nnk.CosineLinear.from_linear(nn.Conv1d(3, 3, 1))


def test_from_linear_refuses_a_weight_normed_linear():
    # The head takes linear's Parameters; a weight-normed linear's weight is
    # computed from others (assigning it was "cannot assign 'torch.FloatTensor'").
    from torch.nn.utils import parametrizations, parametrize

    lin = parametrizations.weight_norm(nn.Linear(5, 3))
    with pytest.raises(TypeError, match=r"linear.weight is computed by a parametrization \(_WeightNorm\).*"
                                        r"remove_parametrizations\(linear, 'weight'\)"):
        nnk.CosineLinear.from_linear(lin)
    with pytest.raises(TypeError, match="remove_parametrizations"):
        nnk.replace_head(nn.Sequential(lin), "0")
    parametrize.remove_parametrizations(lin, "weight")
    assert nnk.CosineLinear.from_linear(lin).weight is lin.weight
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the older weight_norm is deprecated
        old_style = torch.nn.utils.weight_norm(nn.Linear(5, 3))
    with pytest.raises(TypeError, match=r"weight_norm's hook.*remove_weight_norm\(linear, 'weight'\)"):
        nnk.CosineLinear.from_linear(old_style)
    torch.nn.utils.remove_weight_norm(old_style)
    assert nnk.CosineLinear.from_linear(old_style).weight is old_style.weight


@pytest.mark.parametrize("kind", ["prune", "weight_norm", "spectral_norm"])
def test_loss_and_predict_run_the_hooks_that_compute_the_weight(kind):
    # loss and predict bypass nn.Module.__call__, hence the forward pre-hooks
    # that compute the weight: they read the last forward's weight (a pruned
    # head's second backward failed, predict ranked stale weights).
    from torch.nn.utils import prune

    torch.manual_seed(0)
    head = nnk.CosineLinear(8, 5, scale=10.0, bias=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the older weight_norm is deprecated
        if kind == "prune":
            prune.random_unstructured(head, "weight", amount=0.3)
            prune.l1_unstructured(head, "bias", amount=0.4)
        else:
            getattr(torch.nn.utils, kind)(head, "weight")
    computed = {  # the weight as each hook computes it, independently (spectral_norm: its own)
        "prune": lambda: head.weight_orig * head.weight_mask,
        "weight_norm": lambda: head.weight_g * head.weight_v / head.weight_v.norm(dim=1, keepdim=True),
        "spectral_norm": lambda: head.weight,
    }[kind]
    bias = (lambda: head.bias_orig * head.bias_mask) if kind == "prune" else (lambda: head.bias)
    x, t = torch.randn(16, 8), torch.randint(0, 5, (16,))
    opt = torch.optim.SGD(head.parameters(), lr=1.0)
    for _ in range(3):
        opt.zero_grad()
        loss = head.loss(x, t)
        want = cosine_cross_entropy_ref(x, computed(), t, scale=10.0, bias=bias())
        torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().max() > 0 for p in head.parameters())
        opt.step()
    with torch.no_grad():
        head.eval()  # spectral_norm: no power iteration, so forward and predict see one weight
        for p in head.parameters():
            p.add_(torch.randn_like(p))
        classes, _ = head.predict(x, 2)
        logits = 10.0 * F.normalize(x) @ F.normalize(computed()).T + bias()
        assert torch.equal(classes, logits.topk(2).indices)
        assert torch.equal(classes, head(x).topk(2).indices)


def test_replace_head_of_an_uninitialized_lazy_linear_says_so():
    # It said "in_features must be >= 1, got 0", of an argument never passed.
    model = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.LazyLinear(3))
    with pytest.raises(ValueError, match="uninitialized LazyLinear.*forward pass"):
        nnk.replace_head(model, "2")
    assert isinstance(model[2], nn.LazyLinear)
    model(torch.randn(2, 5))
    head = nnk.replace_head(model, "2")
    assert head.in_features == 8 and head.weight is model[2].weight


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 8), nn.ReLU())
        self.heads = nn.ModuleDict({"cls": nn.Sequential(nn.Dropout(0.0), nn.Linear(8, 3))})

    def forward(self, x):
        return self.heads["cls"](self.body(x))


def test_replace_head_dotted_path_keeps_the_optimizer_working():
    torch.manual_seed(0)
    net = _Net()
    old = net.heads.cls[1]
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    head = nnk.replace_head(net, "heads.cls.1", scale=4.0)
    assert net.heads.cls[1] is head and isinstance(head, nnk.CosineLinear)
    assert head.weight is old.weight and head.bias is old.bias
    x, y = torch.randn(10, 5), torch.randint(0, 3, (10,))
    before = head.weight.detach().clone()
    head.loss(net.body(x), y).backward()
    opt.step()
    assert not torch.equal(head.weight, before)
    assert net(x).shape == (10, 3)
    with pytest.raises(ValueError, match="heads.nope"):
        nnk.replace_head(net, "heads.nope")
    with pytest.raises(ValueError, match="non-empty"):
        nnk.replace_head(net, "")
    with pytest.raises(TypeError, match="path must be a str"):
        nnk.replace_head(net, 3)
    with pytest.raises(TypeError, match="nn.Linear"):
        nnk.replace_head(net, "body.1")
    with pytest.raises(TypeError, match="nn.Linear"):
        nnk.replace_head(net, "heads.cls.1")  # already a CosineLinear


# --- predict ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "n,c,k,block,per_class,bias",
    [
        (37, 1031, 1, 100, False, False),
        (37, 1031, 7, 100, True, True),
        (37, 1031, 150, 100, False, True),  # k larger than a block
        (1100, 53, 5, None, False, False),  # two row blocks
        (3, 5, 5, 2, True, False),  # k = C
    ],
)
def test_predict_equals_topk_of_materialized_logits(n, c, k, block, per_class, bias):
    torch.manual_seed(1)
    head = nnk.CosineLinear(19, c, bias=bias, scale=9.0, per_class_scale=per_class)
    with torch.no_grad():
        if per_class:
            head.log_scale.uniform_(0.0, 3.0)
        if bias:
            head.bias.normal_()
    x = torch.randn(n, 19, dtype=torch.float64)
    head.double()
    logits = head(x)
    want = logits.topk(k, dim=1)
    classes, cosines = head.predict(x, k, block_classes=block)
    assert classes.shape == cosines.shape == (n, k) and cosines.dtype == torch.float64
    assert torch.equal(classes, want.indices)
    torch.testing.assert_close(cosines, _cos(x, head.weight).gather(1, want.indices))


def test_predict_leading_dims_and_bad_k():
    torch.manual_seed(0)
    head = nnk.CosineLinear(6, 9, scale=3.0)
    x = torch.randn(2, 4, 6)
    classes, cosines = head.predict(x, 3, block_classes=4)
    assert classes.shape == (2, 4, 3) and cosines.dtype == torch.float32
    assert torch.equal(classes, head(x).topk(3).indices)
    for k, exc in ((0, ValueError), (10, ValueError), (1.0, TypeError)):
        with pytest.raises(exc, match="k must"):
            head.predict(x, k)


def test_repr_shows_the_learnt_scale_and_prints_on_meta():
    head = nnk.CosineLinear(4, 3, scale=8.0, learn_scale=True)
    with torch.no_grad():
        head.log_scale.fill_(math.log(20.0))
    assert "scale=20 (learned, init 8)" in repr(head)
    assert "scale=learned (init 8)" in repr(nnk.CosineLinear(4, 3, scale=8.0, learn_scale=True, device="meta"))


def test_bad_sizes_and_integer_features_are_clear_errors():
    for args in ((-1, 5), (3, 0)):
        with pytest.raises(ValueError, match="features must be >= 1"):
            nnk.CosineLinear(*args)
    # Checked before the default scale, which is computed from out_features.
    for args, name in (((8, "6"), "out_features"), ((8, 6.0), "out_features"), (("8", 6), "in_features")):
        with pytest.raises(TypeError, match=f"{name} must be an int"):
            nnk.CosineLinear(*args)
    head = nnk.CosineLinear(3, 5)
    for call in (head, lambda v: head.predict(v, 2)):
        with pytest.raises(TypeError, match="x must be a floating-point tensor, got torch.int64"):
            call(torch.ones(4, 3, dtype=torch.long))


# --- loss ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        dict(scale=16.0),
        dict(bias=True, additive_margin=0.2, learn_scale=True),
        dict(angular_margin=0.4, margin_grad="detached", per_class_scale=True),
        dict(angular_margin=0.3, additive_margin=0.1, bias=True),
    ],
)
def test_loss_equals_functional_and_reference(kw):
    torch.manual_seed(0)
    kw = dict(kw)
    bias = kw.pop("bias", False)
    head = nnk.CosineLinear(23, 61, bias=bias, **kw)
    with torch.no_grad():
        if head.log_scale is not None:
            head.log_scale.add_(torch.rand_like(head.log_scale))
        if bias:
            head.bias.normal_()
    x = torch.randn(29, 23, requires_grad=True)
    t = torch.randint(0, 61, (29,))
    t[3] = -100
    params = [x] + [p for p in head.parameters()]
    opts = dict(additive_margin=head.additive_margin, angular_margin=head.angular_margin,
                margin_grad=head.margin_grad, label_smoothing=0.05)

    got = head.loss(x, t, label_smoothing=0.05)
    g_got = torch.autograd.grad(got, params)
    by_hand = nnk.cosine_cross_entropy(x, head.weight, t, scale=head.scale, bias=head.bias, **opts)
    g_hand = torch.autograd.grad(by_hand, params)
    ref = cosine_cross_entropy_ref(x, head.weight, t, scale=head.scale, bias=head.bias, **opts)
    g_ref = torch.autograd.grad(ref, params)

    assert torch.equal(got, by_hand)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for a, b, r in zip(g_got, g_hand, g_ref):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


def test_loss_input_errors_name_x():
    head = nnk.CosineLinear(7, 6)
    t = torch.zeros(4, dtype=torch.long)
    for x in (torch.randn(4, 5), torch.randn(4, 0), torch.tensor(1.0)):
        with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 7\), got"):
            head.loss(x, t[:len(x)] if x.dim() else torch.tensor(0))
    loss = nnk.CosineCrossEntropyLoss()
    for x in (torch.randn(4, 0), torch.tensor(1.0)):
        with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., D\) with D >= 1"):
            loss(x, torch.randn(6, 0), t[:len(x)] if x.dim() else torch.tensor(0))
    x = torch.randn(4, 7)
    with pytest.raises(TypeError, match="weight is the module's own .* per-class loss weights are not supported"):
        head.loss(x, t, weight=torch.randn(6, 7))
    # (N, C) probability targets (mixup, distillation): named, not a shape error.
    soft = torch.softmax(torch.randn(4, 6), dim=1)
    for call in (lambda: head.loss(x, soft), lambda: nnk.cosine_cross_entropy(x, head.weight, soft),
                 lambda: nnk.CosineCrossEntropyLoss()(x, head.weight, soft)):
        with pytest.raises(TypeError, match="soft, probability targets .* are not supported"):
            call()
    with pytest.raises(TypeError, match=r"CosineLinear.loss: x is torch.bfloat16 but the head's weight is "
                                        r"torch.float32; cast x .*torch.autocast"):
        head.loss(x.bfloat16(), t)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # casts both
        assert torch.isfinite(head.loss(x.bfloat16(), t))


def test_loss_leading_dims_and_reductions():
    torch.manual_seed(0)
    head = nnk.CosineLinear(8, 13, scale=6.0, additive_margin=0.1)
    x = torch.randn(3, 5, 8)
    t = torch.randint(0, 13, (3, 5))
    flat = head.loss(x.reshape(15, 8), t.reshape(15), reduction="none", return_lse=True)
    rows, lse = head.loss(x, t, reduction="none", return_lse=True)
    assert rows.shape == lse.shape == (3, 5)
    torch.testing.assert_close(rows.reshape(15), flat[0])
    torch.testing.assert_close(lse.reshape(15), flat[1])
    torch.testing.assert_close(head.loss(x, t), flat[0].mean())
    torch.testing.assert_close(head.loss(x, t, reduction="sum"), flat[0].sum())
    # Overriding a margin for one call (a margin schedule).
    torch.testing.assert_close(
        head.loss(x, t, additive_margin=0.0),
        cosine_cross_entropy_ref(x.reshape(15, 8), head.weight, t.reshape(15), scale=6.0),
    )


def test_learnable_scales_get_gradients():
    torch.manual_seed(0)
    x, t = torch.randn(16, 10), torch.randint(0, 7, (16,))
    for per_class in (False, True):
        head = nnk.CosineLinear(10, 7, scale=5.0, learn_scale=True, per_class_scale=per_class)
        head.loss(x, t).backward()
        g = head.log_scale.grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
        # d loss / d log s = s * d loss / d s, against the reference.
        s = head.scale.detach().requires_grad_()
        (g_s,) = torch.autograd.grad(cosine_cross_entropy_ref(x, head.weight, t, scale=s), [s])
        torch.testing.assert_close(g, (s.detach() * g_s).reshape(g.shape), rtol=1e-4, atol=1e-6)


def test_loss_module_equals_functional():
    torch.manual_seed(0)
    emb = torch.randn(40, 12, requires_grad=True)  # e.g. a tied embedding
    x, t = torch.randn(2, 9, 12), torch.randint(0, 40, (2, 9))
    b = torch.randn(40)
    crit = nnk.CosineCrossEntropyLoss(scale=7.0, angular_margin=0.3, label_smoothing=0.1)
    got = crit(x, emb, t, bias=b)
    want = nnk.cosine_cross_entropy(x.reshape(18, 12), emb, t.reshape(18), scale=7.0,
                                    angular_margin=0.3, label_smoothing=0.1, bias=b)
    assert torch.equal(got, want)
    assert "angular_margin=0.3" in repr(crit)
    with pytest.raises(ValueError, match="reduction"):
        nnk.CosineCrossEntropyLoss(reduction="avg")
    with pytest.raises(TypeError, match="unknown option"):
        nnk.CosineCrossEntropyLoss(margin=0.2)
    with pytest.raises(TypeError, match="bias"):
        nnk.CosineCrossEntropyLoss(bias=b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("per_class", [False, True])
def test_half_head_scale_is_exp_of_log_scale_in_float32(dtype, per_class):
    # The scale a 16-bit log_scale encodes, exp'd in float32: not rounded to
    # 16 bits (bfloat16 at s = 30: a loss error of ~1e-2 against ~3e-7).
    torch.manual_seed(0)
    head = nnk.CosineLinear(32, 50, scale=30.0, per_class_scale=per_class, learn_scale=True).to(dtype)
    x, t = torch.randn(40, 32).to(dtype), torch.randint(0, 50, (40,))
    assert head.scale.dtype == torch.float32
    log_s = head.log_scale.detach().double().requires_grad_()
    s = log_s.exp() if per_class else log_s.exp().reshape(())
    want = cosine_cross_entropy_ref(x.double(), head.weight.double(), t, scale=s)
    (g_want,) = torch.autograd.grad(want, [log_s])
    got = head.loss(x, t)
    got.backward()
    assert abs(got.item() - want.item()) < 1e-5
    assert head.log_scale.grad.dtype == dtype
    torch.testing.assert_close(head.log_scale.grad.double(), g_want, rtol=8e-3, atol=1e-5)  # 16-bit grad
    logits_want = s.detach() * _cos(x, head.weight)
    torch.testing.assert_close(head(x).double(), logits_want, rtol=1e-5, atol=1e-4)


# --- projection --------------------------------------------------------------------


def test_project_weight_normalizes_every_chunk_of_rows():
    # C D above the bounded temporary (2^21 elements): several chunks.
    head = nnk.CosineLinear(512, 5000)
    with torch.no_grad():
        head.weight.mul_(3.0)
    head.project_weight_()
    torch.testing.assert_close(head.weight.norm(dim=1), torch.ones(5000))


def test_project_weight_and_the_optimizer_hook():
    torch.manual_seed(0)
    head = nnk.CosineLinear(12, 6, scale=4.0)
    with torch.no_grad():
        head.weight.mul_(torch.linspace(0.1, 5.0, 6)[:, None])
        head.weight[2].zero_()
    x = torch.randn(5, 12)
    before = head(x)
    head.project_weight_()
    norms = head.weight.norm(dim=1)
    torch.testing.assert_close(norms[[0, 1, 3, 4, 5]], torch.ones(5))
    assert norms[2] == 0
    torch.testing.assert_close(head(x), before)  # normalize_weight: invariant

    model = nn.Sequential(nn.Linear(12, 12), head)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    handle = nnk.project_after_step(opt, model)
    t = torch.randint(0, 6, (5,))
    head.loss(model[0](x), t).backward()
    opt.step()
    torch.testing.assert_close(head.weight.norm(dim=1)[[0, 1, 3, 4, 5]], torch.ones(5))
    handle.remove()
    with torch.no_grad():
        head.weight.mul_(3.0)
    opt.step()
    assert head.weight.norm(dim=1)[0] > 2.0  # the hook is gone
    with pytest.raises(ValueError, match="no CosineLinear"):
        nnk.project_after_step(opt, nn.Linear(2, 2))


def test_project_weight_refuses_a_parametrized_weight():
    # Renormalizing the tensor a parametrization computes changed nothing, silently.
    from torch.nn.utils import parametrizations

    head = parametrizations.weight_norm(nnk.CosineLinear(6, 4))
    with pytest.raises(TypeError, match=r"project_weight_: head.weight is computed by a parametrization"):
        head.project_weight_()
    with pytest.raises(TypeError, match="project_after_step: .*remove_parametrizations"):
        nnk.project_after_step(torch.optim.SGD(head.parameters(), lr=0.1), nn.Sequential(head))


def test_a_pruned_weight_is_named_with_its_remedy():
    # A pruned weight is recomputed from weight_orig by prune's hook:
    # project_weight_ renormalized that copy to no effect, silently, and
    # from_linear failed with "cannot assign 'torch.FloatTensor' as parameter".
    from torch.nn.utils import prune

    head = prune.random_unstructured(nnk.CosineLinear(6, 4), "weight", amount=0.5)
    with pytest.raises(TypeError, match=r"head.weight is computed by torch.nn.utils.prune's hook.*"
                                        r"prune.remove\(head, 'weight'\)"):
        head.project_weight_()
    lin = prune.l1_unstructured(nn.Linear(6, 4), "weight", amount=0.5)
    with pytest.raises(TypeError, match=r"prune.remove\(linear, 'weight'\)"):
        nnk.CosineLinear.from_linear(lin)
    prune.remove(lin, "weight")
    assert nnk.CosineLinear.from_linear(lin).weight is lin.weight


# --- torch.compile -----------------------------------------------------------------


def test_compile_fullgraph_forward_and_loss_on_cpu():
    torch.manual_seed(0)
    head = nnk.CosineLinear(16, 21, bias=True, learn_scale=True, additive_margin=0.2)
    x = torch.randn(2, 6, 16)
    t = torch.randint(0, 21, (2, 6))

    def step(x, t):
        return head(x), head.loss(x, t, label_smoothing=0.1)

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    (logits_c, loss_c), (logits_e, loss_e) = compiled(x, t), step(x, t)
    torch.testing.assert_close(logits_c, logits_e)
    torch.testing.assert_close(loss_c, loss_e)
    params = list(head.parameters())
    g_c = torch.autograd.grad(loss_c + logits_c.square().mean(), params)
    g_e = torch.autograd.grad(loss_e + logits_e.square().mean(), params)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_compiled_torch_path_serves_every_batch_size_with_one_graph():
    # A row loop over N made Dynamo specialize N on impl="torch" (what "auto"
    # runs on CPU): a graph per batch size, then FailOnRecompileLimitHit under
    # fullgraph=True at the 9th. Now the first size's graph and one dynamic one.
    torch.manual_seed(0)
    head = nnk.CosineLinear(16, 11, additive_margin=0.2)
    graphs = {"loss": 0, "predict": 0}

    def counting(name):
        def backend(gm, example_inputs):
            graphs[name] += 1
            return gm.forward
        return backend

    loss = torch.compile(lambda f, y: head.loss(f, y, impl="torch"), fullgraph=True, backend=counting("loss"))
    predict = torch.compile(lambda f: head.predict(f, k=3), fullgraph=True, backend=counting("predict"))
    for n in range(5, 16):
        f, y = torch.randn(n, 16), torch.randint(0, 11, (n,))
        got = loss(f, y)
        torch.testing.assert_close(got, head.loss(f, y, impl="torch"))
        got.backward()
        assert torch.equal(predict(f)[0], head.predict(f, k=3)[0])
    assert graphs["loss"] <= 2 and graphs["predict"] <= 2, graphs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_row_normalize_fallback_under_compile(dtype):
    """The row normalization without the extension (ops.row_normalize's
    autograd.Function over the reference) under torch.compile: gradients as
    in eager. In torch 2.11 its float32 output, passed through a .to() that
    changed nothing, got a zero gradient (CosineLinear's weight gradient
    under compile, on an install without nnk._C). On the CPU only: a GPU
    session's short test box would spend its time in Inductor."""
    from nnk.ops.row_normalize import _RowNormalizeRef

    g = torch.Generator().manual_seed(0)
    w = torch.randn(21, 16, generator=g).to(dtype).requires_grad_(True)
    a, b = torch.randn(21, 16, generator=g), torch.randn(21, generator=g)

    def f(w):
        y, norm = _RowNormalizeRef.apply(w, 1e-12)
        return (y.float() * a).sum() + (norm * b).sum()

    torch._dynamo.reset()
    (got,) = torch.autograd.grad(torch.compile(f, fullgraph=True)(w), w)
    (want,) = torch.autograd.grad(f(w), w)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("kwargs", [{}, dict(bias=True, learn_scale=True), dict(per_class_scale=True)],
                         ids=["fixed", "bias-learnt", "per-class"])
def test_fx_symbolic_trace_keeps_the_head_as_one_node(kwargs):
    # torchvision's create_feature_extractor and other fx tools trace through
    # user modules: the head's checks and reshape met fx proxies and raised.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nnk.CosineLinear(16, 10, **kwargs))
    traced = torch.fx.symbolic_trace(model)
    assert sum(node.target is nnk.cosine_logits for node in traced.graph.nodes) == 1
    x = torch.randn(3, 5, 8)
    out, want = traced(x), model(x)
    assert torch.equal(out, want)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    for g, w in zip(grads, torch.autograd.grad(want.square().sum(), list(model.parameters()))):
        assert torch.equal(g, w)
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 16\)"):
        torch.fx.symbolic_trace(model[2])(torch.randn(3, 7))


def test_export_and_jit_trace_keep_the_head():
    # The README's claim: torch.export and torch.jit.trace record the head
    # (its nnk::row_normalize op), and the results run and agree.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nnk.CosineLinear(16, 10, bias=True))
    x = torch.randn(4, 8)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 deprecates jit.trace
        traced = torch.jit.trace(model, (x,))
    torch.testing.assert_close(traced(x), model(x))


HEAD_MEMORY_SCRIPT = textwrap.dedent("""
    import ctypes, json, torch, nnk
    def hwm_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    torch.manual_seed(0)
    torch.set_num_threads(2)
    head = nnk.CosineLinear(64, 400_000, scale=10.0)
    x = torch.randn(4, 64)
    trim = ctypes.CDLL("libc.so.6").malloc_trim
    res = {"weight_mb": head.weight.numel() * 4 / 2**20, "logits_mb": 4 * 400_000 * 4 / 2**20}
    for name, fn in [("forward", lambda: head(x)), ("predict_one_row", lambda: head.predict(x[:1], k=5))]:
        trim(0)
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS to the current RSS
        base = hwm_mb()
        out = fn()
        res[name] = hwm_mb() - base
        del out
    print(json.dumps(res))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS reset needs Linux /proc")
def test_head_forward_and_predict_memory():
    """Extra peak RSS of CosineLinear's forward (autograd on) and of predict on one
    row, C=400k, D=64 (weight 98 MiB). The forward holds one normalized copy of
    the weight (it was 3.2x the weight with the reference's float64 norms);
    predict holds tiles only (it was 2x the weight for one row)."""
    out = subprocess.run([sys.executable, "-c", HEAD_MEMORY_SCRIPT], capture_output=True, text=True,
                         timeout=300, env={**os.environ, **FIXED_MMAP_THRESHOLD})
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(res)
    assert res["forward"] < 1.3 * res["weight_mb"] + res["logits_mb"], res
    assert res["predict_one_row"] < 0.4 * res["weight_mb"], res


def test_forward_logits_are_float32_under_autocast():
    # They were bfloat16 without a bias and float32 with one.
    x = torch.randn(3, 8)
    for bias in (False, True):
        head = nnk.CosineLinear(8, 5, bias=bias, scale=30.0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = head(x)
        assert out.dtype == torch.float32
        # The cosines come from the bf16 GEMM: within bf16 rounding of the
        # operands, times s.
        assert (out - head(x)).abs().max() <= 30.0 * 2 ** -6


@pytest.fixture(params=["nnk._C", "reference"])
def row_normalize_path(request, monkeypatch):
    """nnk.ops.row_normalize through the extension's op, or through its
    reference fallback (as without nnk._C)."""
    if request.param == "nnk._C" and not nnk.ops.has_op("row_normalize", "cpu"):
        pytest.skip("the extension nnk._C is not built")
    if request.param == "reference":
        # sys.modules: the package exports a function of the module's name.
        monkeypatch.setattr(sys.modules["nnk.ops.row_normalize"], "has_op", lambda *a: False)
    return request.param


def test_forward_supports_gradient_penalties(row_normalize_path):
    # create_graph=True through the logits (a gradient penalty): the row
    # normalization's backward must itself be differentiable; the kernel's is
    # not, and gave silent zeros.
    torch.manual_seed(0)
    head = nnk.CosineLinear(6, 5, scale=4.0, dtype=torch.float64)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)

    def plain(x, w):
        return F.linear(F.normalize(x, dim=1), F.normalize(w, dim=1)) * 4.0

    grads = []
    for fn in (head, lambda v: plain(v, head.weight)):
        (gx,) = torch.autograd.grad(fn(x).square().sum(), x, create_graph=True)
        grads.append(torch.autograd.grad(gx.square().sum(), (x, head.weight)))
    for got, want in zip(*grads):
        assert want.abs().max() > 1.0
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_forward_under_torch_func_and_forward_ad(row_normalize_path):
    # The head's forward under torch.func (per-sample gradients, jvp) and
    # forward-mode AD, as nn.Linear's: the op's autograd has a backward only,
    # and gave a zero jvp, a missing forward_ad tangent and an error from
    # vmap(grad(...)).
    import torch.autograd.forward_ad as fwAD
    from torch.func import functional_call, grad, jvp, vmap

    torch.manual_seed(0)
    head = nnk.CosineLinear(6, 5, scale=4.0, dtype=torch.float64)
    x, v = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    y = torch.tensor([0, 3, 4])
    w = head.weight.detach()

    def plain(x, w):
        return F.linear(F.normalize(x, dim=-1), F.normalize(w, dim=-1)) * 4.0

    want = jvp(lambda a: plain(a, w), (x,), (v,))[1]
    assert want.abs().max() > 0.5
    torch.testing.assert_close(jvp(head, (x,), (v,))[1].detach(), want, rtol=1e-12, atol=1e-12)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(head(fwAD.make_dual(x, v))).tangent
    assert tangent is not None
    torch.testing.assert_close(tangent.detach(), want, rtol=1e-12, atol=1e-12)

    params = {k: p.detach() for k, p in head.named_parameters()}
    per_row = vmap(grad(lambda p, a, b: F.cross_entropy(functional_call(head, p, (a[None],)), b[None])),
                   in_dims=(None, 0, 0))(params, x, y)
    rows = [torch.autograd.grad(F.cross_entropy(plain(x[i:i + 1], head.weight), y[i:i + 1]), head.weight)[0]
            for i in range(3)]
    torch.testing.assert_close(per_row["weight"], torch.stack(rows), rtol=1e-12, atol=1e-12)


def test_forward_saves_no_float64_copy_of_the_weight(row_normalize_path):
    head = nnk.CosineLinear(16, 3000)
    saved = {}

    def pack(t):
        saved[t.dtype] = saved.get(t.dtype, 0) + t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        head(torch.randn(4, 16))
    weight_bytes = head.weight.numel() * 4
    assert torch.float64 not in saved, saved
    assert sum(saved.values()) < 1.2 * weight_bytes, (saved, weight_bytes)


@pytest.mark.parametrize("impl", ["torch", "cuda"])
def test_compiled_loss_follows_a_margin_schedule(impl):
    # A float option that changes between calls becomes a SymFloat under
    # torch.compile; the option checks must trace it (math.isfinite did not).
    if impl == "cuda" and not nnk.ops.has_op("cosine_cross_entropy_fwd", "cpu"):
        pytest.skip("the extension nnk._C is not built")
    torch.manual_seed(0)
    head = nnk.CosineLinear(16, 11, scale=30.0)
    x, y = torch.randn(9, 16), torch.randint(0, 11, (9,))
    step = torch.compile(lambda x, y, m: head.loss(x, y, additive_margin=m, impl=impl), fullgraph=True)
    for m in (0.0, 0.1, 0.2):
        torch.testing.assert_close(step(x, y, m), head.loss(x, y, additive_margin=m, impl=impl))


def test_forward_takes_features_of_another_dtype_than_the_head():
    # float32 features into a float64 head: float32 logits (x's dtype), as the
    # docstring says; it was a matmul dtype error.
    torch.manual_seed(0)
    head = nnk.CosineLinear(4, 3, bias=True).double()
    x = torch.randn(2, 4)
    out = head(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, head(x.double()).float())
