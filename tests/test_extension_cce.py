"""impl="cuda": the compiled extension's fused cosine cross-entropy
(nnk::cosine_cross_entropy_fwd / _bwd / _fwd_bwd) against the reference and an fp64
ground truth. On the CPU (CI) this runs the extension's CPU kernels, which
call the same element functions (csrc/include/nnk/cce_chunk.h, math.h) as the
CUDA kernels; ``pytest --device cuda`` runs the device-parametrized tests and
the ``gpu`` ones on a GPU."""
import math
import os

import pytest
import torch

import nnk
from cce_cases import (OPTION_CASES, assert_within_bound, error_table, grads as _grads, make_inputs, max_err,
                        reference as _reference)
from nnk._options import make_options
from nnk.ops import has_op
from nnk.reference import cosine_cross_entropy_ref, reduce_rows
from peak_rss import peak_memory

pytestmark = pytest.mark.skipif(not has_op("cosine_cross_entropy_fwd", "cpu"),
                                reason="nnk._C not built (or built without the CCE ops)")

DEFAULTS = dict(normalize_input=True, normalize_weight=True, additive_margin=0.0, angular_margin=0.0,
                margin_grad="exact", ignore_index=-100, label_smoothing=0.0, z_loss=0.0, eps=1e-12)


def _extension(x, w, t, kw, chunk_rows=None, chunk_classes=None):
    from nnk.impl.extension import cosine_cross_entropy_extension

    opts = make_options(**{**DEFAULTS, **{k: v for k, v in kw.items() if k in DEFAULTS}})
    row, lse = cosine_cross_entropy_extension(x, w, t, kw.get("scale", 1.0), kw.get("bias"), opts,
                                              chunk_rows=chunk_rows, chunk_classes=chunk_classes)
    return reduce_rows(row, t != opts.ignore_index, kw.get("reduction", "mean")), lse


def _sum_loss_and_grads(fn, x, w, t, **kw):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fn(x, w, t, reduction="sum", **kw)
    return [loss, *torch.autograd.grad(loss, [x, w])]


# --- accuracy on the odd shape, every option ------------------------------------


# Blocks of (rows, classes): one class chunk, or class chunks with a partial
# last one (the logits' row state merged across chunks, the target in any of them).
BLOCKS = {"rows": (32, None), "rows_x_classes": (32, 300)}


@pytest.mark.parametrize("block", BLOCKS.values(), ids=BLOCKS.keys())
@pytest.mark.parametrize("case", OPTION_CASES, ids=[c[0] for c in OPTION_CASES])
def test_fp32_odd_shape_every_option(case, block, device):
    # 97 rows in chunks of 32: three full chunks and a partial one; 1031
    # classes in one chunk or in three of 300 and one of 131.
    errs = error_table(lambda x, w, t, kw: _extension(x, w, t, kw, *block), case[1], 97, 59, 1031,
                       torch.float32, device=device)
    assert_within_bound(errs, atol=1e-5)


@pytest.mark.parametrize("classes", [None, 8], ids=["one_class_chunk", "class_chunks"])
@pytest.mark.parametrize("case", OPTION_CASES, ids=[c[0] for c in OPTION_CASES])
def test_fp64_equals_reference(case, classes, device):
    x, w, t, kw, leaves = make_inputs(23, 9, 31, case[1], device=device)
    ref = _reference(x, w, t, kw)
    got = _extension(x, w, t, kw, chunk_rows=5, chunk_classes=classes)
    assert max_err(got[0], ref[0]) < 1e-12 and max_err(got[1], ref[1]) < 1e-12
    g_ref, g_got = _grads(*ref, leaves), _grads(*got, leaves)
    for k in leaves:
        assert max_err(g_got[k], g_ref[k]) < 1e-11, k


def test_gradcheck_with_lse(device):
    opts = {"scale": "per_class", "bias": True, "angular_margin": 0.4, "additive_margin": 0.1,
            "label_smoothing": 0.1, "z_loss": 1e-2, "ignore": True}
    x, w, t, kw, _ = make_inputs(7, 5, 9, opts, device=device)

    def f(x_, w_, s_, b_):
        return _extension(x_, w_, t, {**kw, "scale": s_, "bias": b_}, chunk_rows=3, chunk_classes=4)

    assert torch.autograd.gradcheck(f, (x, w, kw["scale"], kw["bias"]), atol=1e-6, rtol=1e-5)


def _peaked_and_zero_rows(x, w, t):
    x[1:10] = w[t[1:10]] * 3.0  # cos = 1 on the target: softmax ~ 1 to fp32 precision
    x[10:13] = 0.0              # zero-norm rows: cos = 0, dx = g / eps
    w[5] = 0.0                  # a zero-norm class


def test_scale64_margins_peaked_softmax_zero_norm_rows(device):
    """At cos = 1 the ArcFace psi = c cos m - sqrt(1 - c^2) sin m turns one fp32
    ulp of c into ~1e-2 of logit at s = 64: the fp32 reference is that far from
    the fp64 truth too, so the bound is relative to its error, plus 1e-4 of
    each magnitude (the reference's error on this ill-conditioned case varies
    by seed: over seeds 0-11 nnk's d W needed up to 7e-5 beyond 2x it)."""
    opts = {"scale": 64.0, "angular_margin": 0.5, "additive_margin": 0.1, "bias": True, "ignore": True}
    errs = error_table(lambda x, w, t, kw: _extension(x, w, t, kw, chunk_rows=40), opts, 97, 59, 1031,
                       torch.float32, device=device, mutate=_peaked_and_zero_rows)
    assert all(torch.isfinite(torch.tensor(e)) for e in errs["impl"].values()), errs
    assert_within_bound(errs, atol=1e-5, rtol=1e-4)


HALF_CASES = {
    "s64_margins": {"scale": 64.0, "angular_margin": 0.5, "additive_margin": 0.1, "bias": True, "ignore": True},
    # A small bound on |d cos|: float16's gradient scale (cce_driver.h
    # grad_scale) is 2^8 here, where the margin case's is 1, so a missed unscale
    # shows as gradients 256 times too large.
    "s16_plain": {"scale": 16.0, "reduction": "sum"},
}


@pytest.mark.parametrize("case", HALF_CASES.values(), ids=HALF_CASES.keys())
@pytest.mark.parametrize("block", [(40, None), (40, 300)], ids=["rows", "rows_x_classes"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype, block, case, device):
    """fp16/bf16 inputs. On the CPU the GEMMs run in fp32: the bound is the
    reference's. On a GPU they run on the 16-bit operands (fp32 accumulation)
    and d cos and the normalized operands are rounded to 16 bits before the
    d x / d W GEMMs: allowed a few unit roundoffs of the largest entry more.
    float16 gradients are scaled by a power of two and unscaled after the
    GEMMs (cce_driver.h grad_scale), with class chunks in the (N x D) d x
    accumulator."""
    errs = error_table(lambda x, w, t, kw: _extension(x, w, t, kw, *block), case, 97, 59, 1031, dtype,
                       device=device)
    if device.type == "cpu":
        assert_within_bound(errs, atol=1e-4)
    else:
        u = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}[dtype]
        for k, e in errs["impl"].items():
            assert e <= 2 * errs["ref"][k] + 8 * u * errs["mag"][k] + 1e-4, (k, e, errs["ref"][k], errs["mag"][k])


@pytest.mark.parametrize("block", [(None, None), (64, 3)], ids=["one_block", "rows_x_classes"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_arcface_target_terms_of_classes_with_many_rows(dtype, block, device):
    """The 16-bit exact-ArcFace gradient (on a GPU, the fp32 target terms
    after the 16-bit GEMMs: cce_kernel.cu target_term_kernel and
    target_term_w_kernel) where one class is the target of 90 rows (over
    the 32 a warp takes at a time), another of 20, rows at 0 to 1 rad from
    their class (two fifths within 0.003), D = 300 (two column tiles, the second partial), ignored
    rows, in one block and in blocks of 64 rows x 3 classes: d x and d W
    within a few roundings of the output dtype, as for single rows
    (test_extreme.py)."""
    def many(x, w, t):
        t[:90], t[90:110], t[110:] = 2, 4, 0
        t[[3, 50, 95]] = -100
        wt = torch.nn.functional.normalize(w[t[:110].clamp_min(0)].double(), dim=1)
        u = torch.randn(110, x.shape[1], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        u = torch.nn.functional.normalize(u - (u * wt).sum(1, keepdim=True) * wt, dim=1)
        theta = torch.tensor([0.0, 0.003, 0.01, 0.3, 1.0] * 22, dtype=torch.float64)[:, None]
        x[:110] = (3.1 * (theta.cos() * wt + theta.sin() * u)).to(x.dtype)

    opts = {"scale": 64.0, "angular_margin": 0.5, "additive_margin": 0.1, "margin_grad": "exact",
            "reduction": "sum"}
    errs = error_table(lambda x, w, t, kw: _extension(x, w, t, kw, *block), opts, 130, 300, 7, dtype,
                       device=device, mutate=many)
    unit = 2.0**-11 if dtype == torch.float16 else 2.0**-8
    for k in ("x", "weight"):
        assert errs["impl"][k] <= 8 * unit * errs["mag"][k], (k, errs["impl"][k], errs["mag"][k])


def test_chunking_does_not_change_results(device):
    opts = {"scale": "per_class", "bias": True, "additive_margin": 0.2, "label_smoothing": 0.1, "ignore": True}
    x, w, t, kw, leaves = make_inputs(50, 17, 203, opts, dtype=torch.float32, device=device)
    one = _extension(x, w, t, kw)
    g1 = _grads(*one, leaves)
    for block in ((7, None), (7, 50), (None, 64)):
        many = _extension(x, w, t, kw, *block)
        assert max_err(one[0], many[0]) < 1e-5 and max_err(one[1], many[1]) < 1e-5, block
        g2 = _grads(*many, leaves)
        for k in leaves:
            assert max_err(g1[k], g2[k]) < 1e-5 * max(1.0, g1[k].abs().max().item()), (block, k)


def test_chunks_count_their_row_buffers(device, monkeypatch):
    """The default chunk height keeps a chunk's (rows x C) block and its
    (rows x D) row buffers (float32 d xn and the normalized rows; the
    gradient's rows are written in place) within the 256 MiB budget. With few classes the block alone let
    the chunk take every row: C = 8, D = 65536 ran one 1400-row chunk, 1.1 GiB
    of row buffers (at C = 1000, D = 8192, N = 179k in bf16: 8 GiB). The chunks
    are read off the GEMMs' shapes."""
    from torch.profiler import ProfilerActivity, profile

    monkeypatch.delenv("NNK_GRAD_IN_FORWARD", raising=False)  # two passes: forward, backward
    n, d, c = 1400, 65536, 8
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen).to(device).requires_grad_(True)
    w = torch.randn(c, d, generator=gen).to(device).requires_grad_(True)
    t = torch.randint(0, c, (n,), generator=gen).to(device)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        nnk.cosine_cross_entropy(x, w, t, scale=8.0, impl="cuda").backward()
    logit_gemms = [e.input_shapes for e in prof.events()
                   if e.name == "aten::mm" and e.input_shapes[1] == [d, c]]  # x_chunk @ W^T
    rows = [shapes[0][0] for shapes in logit_gemms]
    assert sum(rows) == 2 * n, rows  # every row in the forward and again in the backward
    assert max(rows) * (c * 4 + d * 8) + c * d * 8 <= 256 << 20, rows
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


def test_class_chunks_at_large_c(device, monkeypatch):
    """When C rows of W and a 1024-row block of all C classes outgrow the
    budget, the blocks are 1024 rows x a class chunk, and each class chunk
    is walked over all rows: W is read once per pass (before, the rows shrank
    instead: 13-26 rows per chunk at C = 10^7, each chunk streaming all of W).
    Read off the logit GEMMs' shapes; the result against the reference."""
    from torch.profiler import ProfilerActivity, profile

    monkeypatch.delenv("NNK_GRAD_IN_FORWARD", raising=False)
    n, d, c = 1500, 24, 70_000
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen).to(device).requires_grad_(True)
    w = torch.randn(c, d, generator=gen).to(device).requires_grad_(True)
    t = torch.randint(0, c, (n,), generator=gen).to(device)
    kw = {"scale": 16.0, "additive_margin": 0.1, "label_smoothing": 0.1}
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        loss = nnk.cosine_cross_entropy(x, w, t, impl="cuda", **kw)
        loss.backward()
    blocks = [(s[0][0], s[1][1]) for s in (e.input_shapes for e in prof.events() if e.name == "aten::mm")
              if len(s) >= 2 and len(s[0]) == 2 and len(s[1]) == 2 and s[0][1] == d and s[1][0] == d]
    classes = sorted({k for _, k in blocks}, reverse=True)
    assert len(classes) == 2 and sum(classes) == c, blocks  # two class chunks, the second partial
    assert nnk.ops.cce_block_shape(n, c, d, torch.float32, device.type) == (1024, classes[0])
    assert {r for r, _ in blocks} == {1024, n - 1024}, blocks
    assert len(blocks) == 2 * 2 * 2, blocks  # (2 row chunks x 2 class chunks) per pass, 2 passes
    assert max(r * k for r, k in blocks) * 4 <= 256 << 20
    xr, wr = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    ref = cosine_cross_entropy_ref(xr, wr, t, **kw)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5 * abs(ref.item())
    assert max_err(x.grad, xr.grad) < 1e-5 * xr.grad.abs().max().item()
    assert max_err(w.grad, wr.grad) < 1e-5 * wr.grad.abs().max().item()


def test_fwd_bwd_with_class_chunks_is_forward_then_backward():
    """With class chunks a row's gradients need its lse over every chunk, so
    _fwd_bwd runs the forward and then the backward: bitwise the two ops."""
    x, w, t, s, b = _op_args("cpu", torch.float32, True, True)
    g = torch.rand(9)
    fwd = (True, True, 0.1, 0.3, -100, 0.1, 1e-3, 1e-12, 4, 4, 0)
    bwd = (True, True, 0.1, 0.3, True, -100, 0.1, 1e-3, 1e-12, 4, 4, 0)
    mask = [True, True, True, True]
    fused = torch.ops.nnk.cosine_cross_entropy_fwd_bwd(x, w, t, s, b, g, *bwd, mask)
    loss, lse, lse_lo = torch.ops.nnk.cosine_cross_entropy_fwd(x, w, t, s, b, *fwd)
    grads = torch.ops.nnk.cosine_cross_entropy_bwd(g, None, x, w, t, s, b, lse, lse_lo, *bwd, mask)
    for got, want in zip(fused, (loss, lse, *grads)):
        assert torch.equal(got, want)
    one_chunk = torch.ops.nnk.cosine_cross_entropy_fwd_bwd(x, w, t, s, b, g, *bwd[:-2], 0, 0, mask)
    for got, want in zip(fused, one_chunk):
        assert max_err(got, want) < 1e-5 * max(1.0, want.abs().max().item())


def test_public_api_dispatch_and_edge_shapes(device):
    x, w, t, kw, _ = make_inputs(1, 3, 1, {"scale": 5.0}, dtype=torch.float32, device=device)  # N=1, C=1
    got = nnk.cosine_cross_entropy(x, w, t, impl="cuda", **kw)
    assert max_err(got, cosine_cross_entropy_ref(x, w, t, **kw)) < 1e-6
    empty = nnk.cosine_cross_entropy(torch.zeros(0, 3, device=device), torch.randn(4, 3, device=device),
                                     torch.zeros(0, dtype=torch.long, device=device), impl="cuda", reduction="sum")
    assert empty.item() == 0.0
    x, w, t, kw, leaves = make_inputs(6, 3, 4, {}, dtype=torch.float32, device=device)
    t[:] = -100
    assert torch.isnan(nnk.cosine_cross_entropy(x, w, t, impl="cuda"))
    loss, lse = nnk.cosine_cross_entropy(x, w, t.int(), impl="cuda", reduction="none", return_lse=True)
    assert torch.equal(loss, torch.zeros(6, device=device)) and lse.dtype == torch.float32
    loss.sum().backward()  # all rows ignored: zero gradients, not NaN
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(w.grad, torch.zeros_like(w))


def test_gradients_in_input_dtype_and_frozen_inputs(device):
    x, w, t, kw, leaves = make_inputs(8, 5, 7, {"scale": "per_class", "bias": True}, dtype=torch.bfloat16,
                                      device=device)
    nnk.cosine_cross_entropy(x, w, t, impl="cuda", **kw).backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    assert kw["bias"].grad.dtype == torch.bfloat16 and kw["scale"].grad.dtype == torch.float32
    # A frozen classifier (e.g. a fixed simplex ETF): only x gets a gradient.
    x2, w2, t2, kw2, _ = make_inputs(8, 5, 7, {"scale": 10.0}, dtype=torch.float32, device=device)
    w2.requires_grad_(False)
    loss = nnk.cosine_cross_entropy(x2, w2, t2, impl="cuda", **kw2)
    (gx,) = torch.autograd.grad(loss, [x2])
    (gx_ref,) = torch.autograd.grad(cosine_cross_entropy_ref(x2, w2, t2, **kw2), [x2])
    assert max_err(gx, gx_ref) < 1e-6


# --- gradients computed in the forward (NNK_GRAD_IN_FORWARD=1) ---------------------

REDUCED_CASES = [c for c in OPTION_CASES if c[1].get("reduction") != "none"]
FUSED = "_ExtensionCCEReducedBackward"


@pytest.fixture
def grad_in_forward(monkeypatch):
    monkeypatch.setenv("NNK_GRAD_IN_FORWARD", "1")
    return monkeypatch


def _public(x, w, t, kw):
    return nnk.cosine_cross_entropy(x, w, t, impl="cuda", **kw)


@pytest.mark.parametrize("case", REDUCED_CASES, ids=[c[0] for c in REDUCED_CASES])
def test_grad_in_forward_every_option(case, device, grad_in_forward):
    x, w, t, kw, _ = make_inputs(5, 3, 7, case[1], dtype=torch.float32, device=device)
    assert type(_public(x, w, t, kw).grad_fn).__name__ == FUSED
    errs = error_table(_public, case[1], 97, 59, 1031, torch.float32, device=device, with_lse=False)
    assert_within_bound(errs, atol=1e-5)


def test_grad_in_forward_scale64_margins_peaked_zero_norm_rows(device, grad_in_forward):
    opts = {"scale": 64.0, "angular_margin": 0.5, "additive_margin": 0.1, "bias": True, "ignore": True}
    errs = error_table(_public, opts, 97, 59, 1031, torch.float32, device=device, mutate=_peaked_and_zero_rows,
                       with_lse=False)
    assert_within_bound(errs, atol=1e-5, rtol=1e-4)  # as test_scale64_margins_peaked_softmax_zero_norm_rows


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_grad_in_forward_matches_two_pass(reduction, device, grad_in_forward):
    """The same chunk GEMMs and epilogues either way: equal losses, gradients
    equal to rounding; an upstream gradient other than 1 scales them."""
    opts = {"scale": "per_class", "bias": True, "angular_margin": 0.3, "label_smoothing": 0.1, "z_loss": 1e-3,
            "ignore": True, "reduction": reduction}
    x, w, t, kw, leaves = make_inputs(70, 19, 301, opts, dtype=torch.float32, device=device)
    fused = _public(x, w, t, kw)
    assert type(fused.grad_fn).__name__ == FUSED
    g_fused = dict(zip(leaves, torch.autograd.grad(fused * 3.0, list(leaves.values()))))
    grad_in_forward.delenv("NNK_GRAD_IN_FORWARD")
    plain = _public(x, w, t, kw)
    assert type(plain.grad_fn).__name__ != FUSED
    g_plain = dict(zip(leaves, torch.autograd.grad(plain * 3.0, list(leaves.values()))))
    assert max_err(fused, plain) <= 1e-6 * abs(plain.item())
    for k in leaves:
        assert max_err(g_fused[k], g_plain[k]) <= 1e-6 * g_plain[k].abs().max().item(), k


def test_grad_in_forward_declines_class_chunks(device, grad_in_forward):
    """With class chunks the fused op would run the forward and then the
    backward (each row's gradients need its lse over all chunks) while
    holding the gradients: such a loss takes the two-pass path."""
    n, d, c = 2, 512, 70_000
    assert nnk.ops.cce_block_shape(n, c, d, torch.float32, device.type)[1] < c
    assert nnk.ops.cce_block_shape(n, 5000, d, torch.float32, device.type) == (n, 5000)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen).to(device).requires_grad_(True)
    w = torch.randn(c, d, generator=gen).to(device).requires_grad_(True)
    t = torch.tensor([3, c - 1], device=device)
    loss = _public(x, w, t, {"scale": 8.0})
    assert type(loss.grad_fn).__name__ != FUSED
    small = _public(x, w[:5000], t % 5000, {"scale": 8.0})
    assert type(small.grad_fn).__name__ == FUSED


def test_block_shape_query():
    shape = nnk.ops.cce_block_shape
    assert shape(0, 7, 3, torch.bfloat16, "cuda") == (1, 7)
    assert shape(10**6, 1000, 8192, torch.bfloat16, "cuda")[1] == 1000  # rows shrink: C fits
    rows, classes = shape(1024, 10**6, 512, torch.bfloat16, "cuda")
    assert rows == 1024 and classes % 128 == 0 and classes < 10**6
    # The row chunk's normalized rows (256 MiB at D = 131072) take at most
    # half the budget from the class chunks.
    assert shape(1024, 10**6, 131072, torch.bfloat16, "cuda") == (1024, 128)
    with pytest.raises(ValueError, match="dtype"):
        shape(4, 4, 4, torch.int64, "cpu")
    # A budget: 1 MiB of buffers splits C = 1000 at D = 512 into class chunks.
    assert shape(1024, 1000, 512, torch.bfloat16, "cuda", 1 << 20)[1] < 1000
    with pytest.raises(ValueError, match="chunk_bytes >= 0"):
        shape(4, 4, 4, torch.float32, "cpu", -1)


def test_chunk_budget_from_the_environment(device, monkeypatch):
    """NNK_CHUNK_MB is the budget the op sizes its blocks to: a run under it
    is, bit for bit, the run that asks for those blocks, forward and
    backward (the backward recomputes the forward's GEMM shapes), and the
    gradients-in-forward path declines once it splits C into class chunks."""
    n, d, c = 300, 64, 3000
    budget = nnk.ops.cce_block_shape(n, c, d, torch.float32, device.type, 1 << 20)
    assert nnk.ops.cce_block_shape(n, c, d, torch.float32, device.type) == (n, c)
    assert budget[1] < c  # class chunks at 1 MiB
    opts = {"scale": 16.0, "additive_margin": 0.1, "angular_margin": 0.2, "label_smoothing": 0.1, "z_loss": 1e-3,
            "bias": True}
    x, w, t, kw, _ = make_inputs(n, d, c, opts, dtype=torch.float32, device=device, requires_grad=False)

    def run(**chunks):
        xg, wg = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
        loss, lse = _extension(xg, wg, t, kw, **chunks)
        (loss + lse.sum() * 1e-3).backward()
        return loss, lse, xg.grad, wg.grad

    default = run()
    monkeypatch.setenv("NNK_CHUNK_MB", "1")
    under_budget = run()
    monkeypatch.delenv("NNK_CHUNK_MB")
    asked = run(chunk_rows=budget[0], chunk_classes=budget[1])
    for got, want, ref in zip(under_budget, asked, default):
        assert torch.equal(got, want)
        assert max_err(got, ref) < 1e-5 * max(1.0, ref.abs().max().item())
    monkeypatch.setenv("NNK_GRAD_IN_FORWARD", "1")
    xg = x.detach().requires_grad_(True)
    assert type(_public(xg, w, t, kw).grad_fn).__name__ == FUSED
    monkeypatch.setenv("NNK_CHUNK_MB", "1")
    assert type(_public(xg, w, t, kw).grad_fn).__name__ != FUSED


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "64MB", " 64", str((1 << 20) + 1)])
def test_a_bad_chunk_budget_is_a_clear_error(value, device, monkeypatch):
    monkeypatch.setenv("NNK_CHUNK_MB", value)
    x, w, t, kw, _ = make_inputs(6, 3, 5, {"scale": 4.0}, dtype=torch.float32, device=device)
    with pytest.raises(ValueError, match="NNK_CHUNK_MB must be an integer number of MiB"):
        _public(x, w, t, kw)


def test_grad_in_forward_only_when_asked_and_training(device, grad_in_forward):
    x, w, t, kw, _ = make_inputs(6, 3, 5, {"scale": 4.0}, dtype=torch.float32, device=device)
    with torch.no_grad():
        assert _public(x, w, t, kw).grad_fn is None
    assert type(_public(x, w, t, {**kw, "reduction": "none"}).grad_fn).__name__ != FUSED
    loss, _ = _public(x, w, t, {**kw, "return_lse": True})
    assert type(loss.grad_fn).__name__ != FUSED
    frozen = _public(x.detach(), w.detach(), t, kw)
    assert frozen.grad_fn is None
    assert max_err(frozen, cosine_cross_entropy_ref(x, w, t, **kw)) < 1e-6
    # float16 stays on the two-pass path (its gradients at g = 1 could underflow).
    assert type(_public(x.half(), w.half(), t, kw).grad_fn).__name__ != FUSED
    grad_in_forward.delenv("NNK_GRAD_IN_FORWARD")  # the default: off
    assert type(_public(x, w, t, kw).grad_fn).__name__ != FUSED


def test_grad_in_forward_all_rows_ignored(device, grad_in_forward):
    x, w, t, kw, _ = make_inputs(6, 3, 4, {"scale": 4.0, "bias": True}, dtype=torch.float32, device=device)
    t[:] = -100
    for reduction in ("mean", "sum"):
        loss = _public(x, w, t, {**kw, "reduction": reduction})
        assert torch.isnan(loss) if reduction == "mean" else loss.item() == 0.0  # as F.cross_entropy
        grads = torch.autograd.grad(loss, [x, w, kw["bias"]])
        for g, p in zip(grads, (x, w, kw["bias"])):
            assert torch.equal(g, torch.zeros_like(p)), reduction


def test_grad_in_forward_backward_twice_is_a_clear_error(device, grad_in_forward):
    x, w, t, kw, _ = make_inputs(6, 3, 5, {"scale": 4.0}, dtype=torch.float32, device=device)
    loss = _public(x, w, t, kw)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="NNK_GRAD_IN_FORWARD"):
        loss.backward()


@pytest.mark.parametrize("upstream", [1.0, 0.3, 65536.0])
def test_grad_in_forward_bf16(upstream, device, grad_in_forward):
    """bfloat16: the gradients are saved in bf16 at an upstream gradient of 1
    and scaled in fp32 (one more rounding unless it is 1 or a power of two):
    within 2x the bf16 reference's error, also for 0.3 (not representable in
    bf16) and a GradScaler-sized 65536."""
    opts = {"scale": 64.0, "angular_margin": 0.5, "additive_margin": 0.1, "bias": True, "ignore": True}

    def scaled(fn):
        return lambda x, w, t, kw: upstream * fn(x, w, t, kw)

    ref = scaled(lambda x, w, t, kw: cosine_cross_entropy_ref(x, w, t, **kw))
    x, w, t, kw, leaves = make_inputs(97, 59, 1031, opts, dtype=torch.bfloat16, device=device)
    x64, w64, _, kw64, leaves64 = make_inputs(97, 59, 1031, opts, dtype=torch.float64, device=device)
    with torch.no_grad():
        for k in leaves:
            leaves64[k].copy_(leaves[k].double())
    truth = dict(zip(leaves64, torch.autograd.grad(ref(x64, w64, t, kw64), list(leaves64.values()))))
    got = dict(zip(leaves, torch.autograd.grad(scaled(_public)(x, w, t, kw), list(leaves.values()))))
    want = dict(zip(leaves, torch.autograd.grad(ref(x, w, t, kw), list(leaves.values()))))
    for k in leaves:
        mag = truth[k].abs().max().item()
        assert max_err(got[k], truth[k]) <= 2 * max_err(want[k], truth[k]) + 2.0 ** -8 * mag, k


def test_grad_in_forward_torch_compile_fullgraph_cpu(grad_in_forward):
    opts = {"scale": "per_class", "bias": True, "additive_margin": 0.2, "ignore": True}
    x, w, t, kw, leaves = make_inputs(33, 17, 101, opts, dtype=torch.float32)

    def f(x_, w_, s_, b_):
        return nnk.cosine_cross_entropy(x_, w_, t, **{**kw, "scale": s_, "bias": b_}, impl="cuda")

    loss = torch.compile(f, fullgraph=True)(x, w, kw["scale"], kw["bias"])
    g = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    ref = cosine_cross_entropy_ref(x, w, t, **kw)
    g_ref = dict(zip(leaves, torch.autograd.grad(ref, list(leaves.values()))))
    assert max_err(loss, ref) < 1e-5
    for k in leaves:
        assert max_err(g[k], g_ref[k]) < 1e-5 * max(1.0, g_ref[k].abs().max().item()), k


# --- registration -----------------------------------------------------------------


def _op_args(device, dtype, per_class, with_bias, c=11):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 6, generator=g).to(device=device, dtype=dtype)
    w = torch.randn(c, 6, generator=g).to(device=device, dtype=dtype)
    t = torch.randint(0, c, (9,), generator=g).to(device)
    t[2] = -100
    s = (torch.rand(c, generator=g) * 10 + 1 if per_class else torch.tensor(8.0)).to(device)
    b = torch.randn(c, generator=g).to(device=device, dtype=dtype) if with_bias else None
    return x, w, t, s, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("per_class,with_bias", [(False, False), (True, True)])
def test_opcheck(dtype, per_class, with_bias, device):
    x, w, t, s, b = _op_args(device, dtype, per_class, with_bias)
    # Blocks of 4 rows x 4 classes: 11 classes in three class chunks.
    fwd = (True, True, 0.1, 0.3, -100, 0.1, 1e-3, 1e-12, 4, 4, 0)
    torch.library.opcheck(torch.ops.nnk.cosine_cross_entropy_fwd.default, (x, w, t, s, b, *fwd))
    _, lse, lse_lo = torch.ops.nnk.cosine_cross_entropy_fwd(x, w, t, s, b, *fwd)
    g = torch.randn(9, device=device)
    bwd = (True, True, 0.1, 0.3, True, -100, 0.1, 1e-3, 1e-12, 4, 4, 0)
    for grads, mask in (((g, g * 0.5), [True, True, True, with_bias]), ((None, g), [True, False, per_class, False]),
                        ((g, None), [False, True, False, with_bias])):
        torch.library.opcheck(torch.ops.nnk.cosine_cross_entropy_bwd.default,
                              (*grads, x, w, t, s, b, lse, lse_lo, *bwd, mask))
    for mask in ([True, True, True, with_bias], [False, True, per_class, False]):
        torch.library.opcheck(torch.ops.nnk.cosine_cross_entropy_fwd_bwd.default,
                              (x, w, t, s, b, g, *bwd, mask))
    # Inputs that require grad (torch.library.opcheck's advice): the forward
    # is differentiable through the backward op; the others run below
    # autograd (their ATen calls with out= refused such inputs before).
    xg, wg, sg = (v.clone().requires_grad_() for v in (x, w, s))
    bg = b.clone().requires_grad_() if b is not None else None
    torch.library.opcheck(torch.ops.nnk.cosine_cross_entropy_fwd.default, (xg, wg, t, sg, bg, *fwd))
    torch.library.opcheck(torch.ops.nnk.cosine_cross_entropy_bwd.default,
                          (g.clone().requires_grad_(), None, xg, wg, t, sg, bg, lse, lse_lo, *bwd,
                           [True, True, True, with_bias]))
    torch.library.opcheck(torch.ops.nnk.cosine_cross_entropy_fwd_bwd.default,
                          (xg, wg, t, sg, bg, g, *bwd, [True, True, True, with_bias]))
    grads = torch.ops.nnk.cosine_cross_entropy_fwd_bwd(xg, wg, t, sg, bg, g, *bwd, [True, True, True, with_bias])
    assert not any(v.requires_grad for v in grads)


def test_forward_op_gradients_are_the_exact_derivative():
    # The op's registered derivative (the backward op, exact margin gradient)
    # against finite differences, float64, every differentiable input.
    x, w, t, s, b = _op_args("cpu", torch.float64, True, True, c=7)
    inputs = [v.clone().requires_grad_() for v in (x, w, s.double(), b)]

    def f(x, w, s, b):
        loss, lse, _ = torch.ops.nnk.cosine_cross_entropy_fwd(
            x, w, t, s, b, True, True, 0.1, 0.3, -100, 0.1, 1e-3, 1e-12, 4, 3, 0)
        return loss, lse

    assert torch.autograd.gradcheck(f, inputs)
    loss, lse = f(*inputs)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(loss.sum(), inputs[0], create_graph=True)


def test_torch_compile_fullgraph_cpu():
    opts = {"scale": "per_class", "bias": True, "angular_margin": 0.3, "label_smoothing": 0.1, "ignore": True}
    x, w, t, kw, leaves = make_inputs(33, 17, 101, opts, dtype=torch.float32)

    def f(x_, w_, s_, b_):
        return nnk.cosine_cross_entropy(x_, w_, t, **{**kw, "scale": s_, "bias": b_}, impl="cuda",
                                        return_lse=True)

    compiled = torch.compile(f, fullgraph=True)
    loss, lse = compiled(x, w, kw["scale"], kw["bias"])
    g = _grads(loss, lse, leaves)
    ref = _reference(x, w, t, kw)
    g_ref = _grads(*ref, leaves)
    assert max_err(loss, ref[0]) < 1e-5 and max_err(lse, ref[1]) < 1e-5
    for k in leaves:
        assert max_err(g[k], g_ref[k]) < 1e-5 * max(1.0, g_ref[k].abs().max().item()), k


# --- GPU only ---------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_cuda_float16_gradients_of_a_mean_over_many_classes(scale):
    """d cos = g s (p - y) is rounded to fp16 for the d x / d W GEMMs: with a
    mean's g = 1 / N and p ~ 1 / C most entries were subnormal or 0 (d x 36x
    the reference's error in an emulation) until the upstream gradients were
    scaled by a power of two (cce_driver.h grad_scale)."""
    errs = error_table(lambda x, w, t, kw: _extension(x, w, t, kw), {"scale": scale}, 1024, 64, 20_000,
                       torch.float16, device=torch.device("cuda"))
    u = 2.0 ** -11
    for k, e in errs["impl"].items():
        assert e <= 2 * errs["ref"][k] + 8 * u * errs["mag"][k], (k, e, errs["ref"][k], errs["mag"][k])


@pytest.mark.gpu
def test_cuda_fwd_bwd_refuses_float16_gradients():
    x, w, t, s, b = _op_args("cuda", torch.float16, False, True)
    bwd = (True, True, 0.0, 0.0, True, -100, 0.0, 0.0, 1e-12, 0, 0, 0)
    with pytest.raises(RuntimeError, match="float16 gradients on this device"):
        torch.ops.nnk.cosine_cross_entropy_fwd_bwd(x, w, t, s, b, torch.ones(9, device="cuda"), *bwd, [True] * 4)


@pytest.mark.gpu
def test_cuda_gradients_are_bitwise_reproducible():
    opts = {"scale": "per_class", "bias": True, "additive_margin": 0.2, "ignore": True}
    x, w, t, kw, leaves = make_inputs(300, 64, 5000, opts, dtype=torch.bfloat16, device="cuda")
    runs = []
    for _ in range(2):
        got = _extension(x, w, t, kw, chunk_rows=128)
        runs.append(_grads(*got, leaves))
    for k in leaves:
        assert torch.equal(runs[0][k], runs[1][k]), k


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS reset needs Linux /proc")
def test_extension_class_chunks_hold_no_normalized_copy_of_x():
    """With class chunks the extension's backward holds one (N x D) buffer of
    its own, the fp32 d xn accumulator, besides the gradients: the rows are
    normalized again for each block. At N = 32768, D = 512 (x 64 MiB) in
    blocks of 8 MiB: d xn + d x + blocks; a normalized copy of all of x was
    64 MiB more (195 MiB measured before, 2 class chunks)."""
    n, c, d = 32768, 1024, 512
    assert nnk.ops.cce_block_shape(n, c, d, torch.float32, "cpu", 8 << 20)[1] < c
    res = peak_memory("cuda", n, c, d, backward_only=True, env={"NNK_CHUNK_MB": "8"})
    assert res["peak_extra_mb"] < 2.5 * res["x_mb"], res


@pytest.mark.gpu
def test_cuda_peak_memory_is_one_block():
    """The extension's extra memory: its 256 MiB block budget (the block and a
    class chunk's rows of W and fp32 d wn), the (N x D) fp32 d x accumulator
    of class chunks, and the gradients themselves; with 64 MiB of slack for
    cuBLAS workspaces and small vectors."""
    n, c, d = 4096, 200_000, 64
    x = torch.randn(n, d, device="cuda", requires_grad=True)
    w = torch.randn(c, d, device="cuda", requires_grad=True)
    t = torch.randint(0, c, (n,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss, _ = _extension(x, w, t, {"scale": 30.0, "additive_margin": 0.2})
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    grads, rows = (n + c) * d * 4, n * d * 4
    assert peak < (256 << 20) + grads + rows + (64 << 20), (peak, grads, rows)
    assert peak < n * c * 4 / 5  # far below the logits


# --- the element formulas at their edges (from a mutation run of math.h) ----------


@pytest.mark.parametrize("theta", [5e-4, 3e-3, 2e-2])
def test_arcface_gradient_near_theta_zero(theta, device):
    """Target angles around math.h's kArcSinMin = 1e-3, where d psi / d cos =
    cos m + sin m cos / max(sin theta, 1e-3) is clamped (below) or exact
    (above), in float64 (kernels = reference to 1e-11). Rows exactly
    parallel to their class would hide d psi / d cos (both normalizations
    project it out): these are at angle theta. Scale 2: p_t - 1 is O(1)."""
    g = torch.Generator().manual_seed(5)
    c, d, n = 11, 8, 6
    w = torch.randn(c, d, generator=g, dtype=torch.float64)
    t = torch.arange(n) % c
    wt = torch.nn.functional.normalize(w[t], dim=1)
    u = torch.randn(n, d, generator=g, dtype=torch.float64)
    u = torch.nn.functional.normalize(u - (u * wt).sum(1, keepdim=True) * wt, dim=1)
    x = 3.0 * (math.cos(theta) * wt + math.sin(theta) * u)
    x, w, t = x.to(device), w.to(device), t.to(device)
    kw = dict(scale=2.0, angular_margin=0.5, margin_grad="exact")
    got = _sum_loss_and_grads(lambda *a, **k: _extension(*a, k)[0], x, w, t, **kw)
    want = _sum_loss_and_grads(cosine_cross_entropy_ref, x, w, t, **kw)
    for name, a, b in zip(("loss", "dx", "dW"), got, want):
        assert (a - b).abs().max() <= 1e-11 * max(1.0, b.abs().max().item()), (name, theta)


@pytest.mark.parametrize("ls", [0.0, 0.3, 1.0])
def test_losses_keep_the_rounding_residue_of_lse_under_a_large_common_bias(ls, device):
    """A linear head with integer logits in [-3, 3] + 8192 (exact in float32)
    and C = 8 (1/C exact): the only rounding left in the loss is lse's (half
    an ulp of 8194: 4.9e-4), which the row loss takes back with lse_lo in
    both terms, (1 - ls)(lse - z_t + lo) and ls (lse - mean z + lo). Without
    either residue the loss errs by 1e-4..5e-4; with them by ~2e-7, as the
    float32 reference does."""
    g = torch.Generator().manual_seed(1)
    n, d, c = 64, 3, 8
    x = torch.randint(-1, 2, (n, d), generator=g).float().to(device)
    w = torch.randint(-1, 2, (c, d), generator=g).float().to(device)
    b = torch.full((c,), 8192.0, device=device)
    t = torch.randint(0, c, (n,), generator=g).to(device)
    kw = dict(normalize_input=False, normalize_weight=False, label_smoothing=ls, reduction="none")
    got = nnk.cosine_cross_entropy(x, w, t, bias=b, impl="cuda", **kw).double()
    truth = cosine_cross_entropy_ref(x.double(), w.double(), t, bias=b.double(), **kw)
    assert (got - truth).abs().max() <= 2e-6, ((got - truth).abs().max(), ls)
