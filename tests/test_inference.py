"""nnk.cosine_logits and nnk.cosine_topk (the functionals behind CosineLinear's
forward and predict) against the PyTorch expressions their docstrings give."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import nnk


def _data(lead=(5, 3), d=7, c=23, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, d, generator=g, dtype=dtype)
    w = torch.randn(c, d, generator=g, dtype=dtype)
    scale = torch.rand(c, generator=g, dtype=dtype) * 10 + 1
    bias = torch.randn(c, generator=g, dtype=dtype)
    return x, w, scale, bias


def _spelled_out(x, w, scale, bias, eps=1e-12):
    return scale * (F.normalize(x, dim=-1, eps=eps) @ F.normalize(w, dim=1, eps=eps).T) + bias


@pytest.mark.parametrize("lead", [(11,), (2, 5), ()])
def test_cosine_logits_is_the_spelled_out_expression(lead):
    x, w, scale, bias = _data(lead)
    if lead:
        x.view(-1, 7)[0] = 0.0  # a zero row: logits = bias, and F.normalize's gradient
    xg, wg, sg = (t.clone().requires_grad_() for t in (x, w, scale))
    got = nnk.cosine_logits(xg, wg, scale=sg, bias=bias)
    xr, wr, sr = (t.clone().requires_grad_() for t in (x, w, scale))
    want = _spelled_out(xr, wr, sr, bias)
    assert got.shape == (*lead, 23) and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    up = torch.randn_like(want)
    (got * up).sum().backward()
    (want * up).sum().backward()
    for a, b in ((xg, xr), (wg, wr), (sg, sr)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


def test_cosine_logits_float32_from_16_bit_and_mixed_dtypes():
    x, w, _, _ = _data((9,), dtype=torch.float32)
    want = _spelled_out(x.double(), w.double(), 4.0, 0.0)
    for xd, wd in ((torch.bfloat16, torch.bfloat16), (torch.float32, torch.float64)):
        got = nnk.cosine_logits(x.to(xd), w.to(wd), scale=4.0, normalize_weight=True)
        assert got.dtype == torch.float32
        tol = 4.0 * 2 ** -7 if xd == torch.bfloat16 else 1e-5
        torch.testing.assert_close(got.double(), want, rtol=0, atol=tol)
    plain = nnk.cosine_logits(x, w, normalize_input=False, normalize_weight=False)
    torch.testing.assert_close(plain, x @ w.T)


@pytest.mark.parametrize("k,block", [(1, None), (4, 5), (23, 7)])
def test_cosine_topk_is_topk_of_the_logits(k, block):
    x, w, scale, bias = _data((4, 6))
    logits = _spelled_out(x, w, scale, bias)
    classes, cosines = nnk.cosine_topk(x, w, k, scale=scale, bias=bias, block_classes=block)
    want = logits.topk(k)
    assert classes.shape == cosines.shape == (4, 6, k)
    assert torch.equal(classes, want.indices)
    cos = F.normalize(x, dim=-1) @ F.normalize(w, dim=1).T
    torch.testing.assert_close(cosines, cos.gather(-1, want.indices), rtol=1e-12, atol=1e-12)


def test_bad_arguments_are_clear_errors():
    x, w, scale, bias = _data((3,))
    bad = [
        (dict(x=x.long()), TypeError, "x must be a floating-point tensor"),
        (dict(x=x[:, :-1]), ValueError, r"x must have shape \(\.\.\., 7\)"),
        (dict(x=x[:, :0], weight=w[:, :0]), ValueError, "D >= 1"),
        (dict(weight=w[0]), TypeError, r"weight must be a \(C, D\) float tensor"),
        (dict(weight=w.long()), TypeError, r"weight must be a \(C, D\) float tensor"),
        (dict(scale=scale[:-1]), ValueError, r"scale must have shape \(\) or \(23,\)"),
        (dict(scale=scale.long()), TypeError, "scale must be float16, bfloat16, float32 or float64"),
        (dict(scale="2"), TypeError, "scale must be a real number or a tensor"),
        (dict(bias=bias[None]), ValueError, r"bias must have shape \(23,\)"),
        (dict(bias=bias.long()), TypeError, "bias must be float16"),
        (dict(bias=[0.0] * 23), TypeError, "bias must be None or a tensor"),
        (dict(weight=w.to("meta")), ValueError, "weight is on meta but x is on cpu"),
        (dict(eps=0.0), ValueError, "eps must be > 0"),
        (dict(x=x.float(), weight=w.float(), scale=2.0, bias=None, eps=1e-300), ValueError, "not a normal float32"),
    ]
    for change, exc, msg in bad:
        args = dict(x=x, weight=w, scale=scale, bias=bias) | change
        for fn in (nnk.cosine_logits, nnk.cosine_topk):
            a = dict(args)
            with pytest.raises(exc, match=msg):
                fn(a.pop("x"), a.pop("weight"), **a)
    # What cosine_cross_entropy takes too: a numpy scale, a float64 eps below float32's range.
    torch.testing.assert_close(nnk.cosine_logits(x, w, scale=np.float32(2.0), eps=1e-300),
                               2.0 * _spelled_out(x, w, 1.0, 0.0))
    for k, exc in ((0, ValueError), (24, ValueError), (1.0, TypeError)):
        with pytest.raises(exc, match="k must"):
            nnk.cosine_topk(x, w, k)
    with pytest.raises(ValueError, match="block_classes must"):
        nnk.cosine_topk(x, w, 2, block_classes=0)
