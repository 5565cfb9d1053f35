"""impl="torch" (the blockwise CPU path) against the reference and an fp64
ground truth, on odd shapes, with tiles small enough to cross many blocks."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import nnk
from cce_cases import OPTION_CASES, assert_within_bound, error_table, grads, make_inputs, max_err
from nnk._options import make_options
from nnk.impl.torch_blockwise import cosine_cross_entropy_torch
from nnk.reference import cosine_cross_entropy_ref, reduce_rows
from peak_rss import peak_memory

DEFAULTS = dict(normalize_input=True, normalize_weight=True, additive_margin=0.0, angular_margin=0.0,
                margin_grad="exact", ignore_index=-100, label_smoothing=0.0, z_loss=0.0, eps=1e-12)


def _blockwise(x, w, t, kw, blocks):
    opts = make_options(**{**DEFAULTS, **{k: v for k, v in kw.items() if k in DEFAULTS}})
    row, lse = cosine_cross_entropy_torch(x, w, t, kw.get("scale", 1.0), kw.get("bias"), opts,
                                          block_rows=blocks[0], block_classes=blocks[1])
    return reduce_rows(row, t != opts.ignore_index, kw.get("reduction", "mean")), lse


@pytest.mark.parametrize("case", OPTION_CASES, ids=[c[0] for c in OPTION_CASES])
def test_blockwise_fp32_odd_shape(case):
    errs = error_table(lambda x, w, t, kw: _blockwise(x, w, t, kw, (32, 200)), case[1], 97, 59, 1031, torch.float32)
    assert_within_bound(errs, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_blockwise_half_inputs(dtype):
    opts = {"scale": 64.0, "angular_margin": 0.5, "additive_margin": 0.1, "bias": True, "ignore": True}
    errs = error_table(lambda x, w, t, kw: _blockwise(x, w, t, kw, (40, 300)), opts, 97, 59, 1031, dtype)
    assert_within_bound(errs, atol=1e-4)


@pytest.mark.parametrize("case", [c for c in OPTION_CASES if c[0] in ("everything", "arcface_detached", "linear")],
                         ids=lambda c: c[0])
def test_blockwise_fp64_equals_reference(case):
    x, w, t, kw, leaves = make_inputs(23, 9, 31, case[1])
    ref, lse_ref = cosine_cross_entropy_ref(x, w, t, return_lse=True, **kw)
    got, lse_got = _blockwise(x, w, t, kw, (5, 7))
    assert max_err(got, ref) < 1e-12
    g_ref, g_got = grads(ref, lse_ref, leaves), grads(got, lse_got, leaves)
    for k in leaves:
        assert max_err(g_got[k], g_ref[k]) < 1e-11, k


def test_blockwise_gradcheck_with_lse():
    opts = {"scale": "per_class", "bias": True, "angular_margin": 0.4, "additive_margin": 0.1,
            "label_smoothing": 0.1, "z_loss": 1e-2, "ignore": True}
    x, w, t, kw, leaves = make_inputs(7, 5, 9, opts)

    def f(x_, w_, s_, b_):
        loss, lse = _blockwise(x_, w_, t, {**kw, "scale": s_, "bias": b_}, (3, 4))
        return loss, lse

    assert torch.autograd.gradcheck(f, (x, w, kw["scale"], kw["bias"]), atol=1e-6, rtol=1e-5)


def test_peaked_softmax_and_zero_norm_rows():
    def mutate(x, w, t):
        x[:10] = w[t[:10]] * 3.0  # cos = 1 on the target: softmax ~ 1 to fp32 precision
        x[10:13] = 0.0            # zero-norm rows: normalize gives 0, cos = 0, d x ~ g / eps

    errs = error_table(lambda x, w, t, kw: _blockwise(x, w, t, kw, (16, 64)), {"scale": 64.0, "angular_margin": 0.5},
                       50, 16, 300, torch.float32, mutate=mutate)
    assert "x/zero" in errs["impl"] and errs["mag"]["x/zero"] > 1e6 * errs["mag"]["x"], errs["mag"]
    assert_within_bound(errs, atol=1e-5, rtol=1e-4)  # ArcFace at cos = 1: see test_extreme's s64 case


def test_public_api_torch_impl_and_edge_shapes():
    x, w, t, kw, _ = make_inputs(1, 3, 1, {"scale": 5.0}, dtype=torch.float32)  # N=1, C=1
    got = nnk.cosine_cross_entropy(x, w, t, impl="torch", **kw)
    assert max_err(got, cosine_cross_entropy_ref(x, w, t, **kw)) < 1e-6
    empty = nnk.cosine_cross_entropy(torch.zeros(0, 3), torch.randn(4, 3), torch.zeros(0, dtype=torch.long),
                                     impl="torch", reduction="sum")
    assert empty.item() == 0.0
    x, w, t, kw, _ = make_inputs(6, 3, 4, {}, dtype=torch.float32)
    t[:] = -100
    assert torch.isnan(nnk.cosine_cross_entropy(x, w, t, impl="torch"))
    loss, lse = nnk.cosine_cross_entropy(x, w, t.int(), impl="torch", reduction="none", return_lse=True)
    assert torch.equal(loss, torch.zeros(6)) and lse.shape == (6,) and lse.dtype == torch.float32


def test_gradients_come_back_in_input_dtype():
    x, w, t, kw, leaves = make_inputs(8, 5, 7, {"scale": "per_class", "bias": True}, dtype=torch.bfloat16)
    nnk.cosine_cross_entropy(x, w, t, impl="torch", **kw).backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    assert kw["bias"].grad.dtype == torch.bfloat16 and kw["scale"].grad.dtype == torch.float32


@pytest.mark.slow
@pytest.mark.parametrize("impl,fraction", [("torch", 10), ("cuda", 5)])
def test_no_logit_matrix_peak_memory(impl, fraction):
    """Peak extra RSS of forward + backward at N=4096, C=200,000, D=64 stays below
    a tenth of the fp32 logits (3125 MiB) on the torch path and a fifth on the
    extension's CPU kernels (measured 182 and 309 MiB); it includes the
    gradient of W (49 MiB). The extension's blocks take up to 256 MiB (its
    GEMMs want large blocks); before class chunks it held a 1 GiB block, a
    normalized copy of W and an fp32 d W."""
    if impl == "cuda" and not nnk.ops.has_op("cosine_cross_entropy_fwd", "cpu"):
        pytest.skip("nnk._C not built")
    res = peak_memory(impl, 4096, 200_000, 64)
    assert res["peak_extra_mb"] < res["logits_mb"] / fraction, res


def test_minus_inf_bias_over_whole_tiles():
    """A -inf bias on the first 256 classes empties the first four 64-class
    tiles of every row: the online log-sum-exp must not shift by their -inf
    max (exp(-inf - -inf) = NaN)."""
    x, w, t, kw, leaves = make_inputs(8, 16, 300, {"scale": 16.0, "bias": True}, dtype=torch.float32)
    with torch.no_grad():
        kw["bias"][:256] = -float("inf")
        t.copy_(torch.arange(256, 300, 6)[:8])
    got = _blockwise(x, w, t, kw, (4, 64))
    want = cosine_cross_entropy_ref(x, w, t, return_lse=True, **kw)
    g_got, g_want = grads(*got, leaves), grads(*want, leaves)
    assert max_err(got[0], want[0]) < 1e-5 and max_err(got[1], want[1]) < 1e-5
    for k in leaves:
        assert torch.isfinite(g_got[k]).all() and max_err(g_got[k], g_want[k]) < 1e-5, k


class _CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func is torch.ops.aten.mm.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("frozen", [("x",), ("weight",), ("x", "weight")], ids=["x", "weight", "both"])
@pytest.mark.parametrize("normalized", [True, False])
def test_backward_skips_the_gradient_of_a_frozen_operand(frozen, normalized, monkeypatch):
    # Linear probing on a frozen backbone needs no d x, a frozen head's weight
    # no d W: neither their GEMM per tile nor their normalization backward
    # (with both frozen, the scale and bias gradients need neither).
    import nnk.impl.torch_blockwise as tb

    normalized_rows = []
    real = tb.row_normalize_backward

    def spy(grad, rows, norms, eps):
        normalized_rows.append(tuple(rows.shape))
        return real(grad, rows, norms, eps)

    monkeypatch.setattr(tb, "row_normalize_backward", spy)
    kw = {"scale": "per_class", "bias": True, "additive_margin": 0.2, "label_smoothing": 0.1, "z_loss": 1e-3,
          "normalize_input": normalized, "normalize_weight": normalized}
    got, matmuls, rows_seen = {}, {}, {}
    for which in ((), frozen):
        x, w, t, kw_in, leaves = make_inputs(37, 9, 113, kw, dtype=torch.float32)
        for name in which:
            leaves[name].requires_grad_(False)
        opts = make_options(**{**DEFAULTS, **{k: v for k, v in kw_in.items() if k in DEFAULTS}})
        row, lse = cosine_cross_entropy_torch(x, w, t, kw_in["scale"], kw_in["bias"], opts,
                                              block_rows=16, block_classes=40)
        g = torch.Generator().manual_seed(1)
        normalized_rows.clear()
        with torch.no_grad(), _CountMatmuls() as count:  # the backward itself, with its None entries
            got[which] = row.grad_fn.apply(torch.rand(37, generator=g), torch.rand(37, generator=g))
        matmuls[which], rows_seen[which] = count.calls, list(normalized_rows)
    shapes = {"x": (37, 9), "weight": (113, 9)}
    for i, name in enumerate(("x", "weight")):
        assert got[frozen][i] is None if name in frozen else torch.equal(got[frozen][i], got[()][i])
    for a, b in zip(got[frozen][2:4], got[()][2:4]):  # d scale, d bias
        assert torch.equal(a, b)
    tiles = 3 * 3  # 37 rows in blocks of 16, 113 classes in blocks of 40
    assert matmuls[()] - matmuls[frozen] == tiles * len(frozen)
    assert rows_seen[frozen] == ([shapes[n] for n in ("x", "weight") if n not in frozen] if normalized else [])
