"""impl="triton" of nnk.cosine_cross_entropy against the reference.

Criterion: for the loss, the lse and every gradient, the kernel's error
against a float64 ground truth (the reference run in float64 on the same
rounded inputs) is at most 2x the error of the reference run in the input
dtype, plus a small atol. Errors are max-abs, relative to the largest
true value of the tensor, or of each row for matrices (see ``_error``).

On the CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py), in
float32, float16 and bfloat16; for bfloat16 the ``bf16_triton`` fixture gives
the interpreter a GPU's bfloat16 rounding and dots (tests/bf16_emulation.py),
so that the tensor-core path runs, not a float32 fallback.
"""
from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys

import pytest
import torch

import nnk
from nnk._options import check_tensors, make_options
from nnk.ops import cce as ext_cce
from nnk.ops import has_op
from nnk.reference import cosine_cross_entropy_ref

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from nnk.impl.triton.backward import _expm1  # noqa: E402

# atol, relative to the largest true value (of the row, for matrices), per
# input dtype: below the dtype's own rounding of the returned gradients, so
# that the 2x rule does the judging.
ATOL_REL = {torch.float32: 2e-6, torch.float16: 5e-5, torch.bfloat16: 4e-4}


OPTION_DEFAULTS = dict(
    normalize_input=True, normalize_weight=True, additive_margin=0.0, angular_margin=0.0,
    margin_grad="exact", ignore_index=-100, label_smoothing=0.0, z_loss=0.0, eps=1e-12,
)


def _triton_fn(deterministic=False, **tuning):
    """nnk.cosine_cross_entropy(impl="triton") with work-splitting overrides
    passed to the backend (same checks and reduction as nnk.functional)."""
    from nnk.impl.triton import cosine_cross_entropy_triton
    from nnk.reference import reduce_rows

    def fn(x, w, target, *, scale, bias, reduction="mean", return_lse=False, **kw):
        opts = make_options(**{**OPTION_DEFAULTS, **kw}, deterministic=deterministic)
        target, scale = check_tensors(x, w, target, scale, bias, opts)
        row, lse = cosine_cross_entropy_triton(x, w, target, scale, bias, opts, **tuning)
        loss = reduce_rows(row, target != opts.ignore_index, reduction)
        return (loss, lse) if return_lse else loss

    return fn


def _public_fn(x, w, target, **kw):
    return nnk.cosine_cross_entropy(x, w, target, impl="triton", **kw)


def _public_deterministic(x, w, target, **kw):
    return nnk.cosine_cross_entropy(x, w, target, impl="triton", deterministic=True, **kw)


def _evaluate(fn, x, w, target, scale, bias, kw, g_loss, g_lse):
    """Loss, lse and the gradients of <g_loss, loss> + <g_lse, lse> for every
    differentiable input, as float64 tensors on the CPU."""
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    leaves = [x, w]
    if isinstance(scale, torch.Tensor):
        scale = scale.detach().clone().requires_grad_(True)
        leaves.append(scale)
    if bias is not None:
        bias = bias.detach().clone().requires_grad_(True)
        leaves.append(bias)
    out = fn(x, w, target, scale=scale, bias=bias, return_lse=g_lse is not None, **kw)
    loss, lse = out if g_lse is not None else (out, None)
    objective = (loss * g_loss.to(loss.dtype)).sum()
    if lse is not None:
        objective = objective + (lse * g_lse.to(lse.dtype)).sum()
    grads = torch.autograd.grad(objective, leaves)
    for leaf, grad in zip(leaves, grads):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape
    outs = {"loss": loss, "lse": lse, "dx": grads[0], "dw": grads[1]}
    if isinstance(scale, torch.Tensor):
        outs["dscale"] = grads[2]
    if bias is not None:
        outs["dbias"] = grads[-1]
    return {k: v.detach().to("cpu", torch.float64) for k, v in outs.items() if v is not None}


def _error(got: torch.Tensor, truth: torch.Tensor) -> float:
    """Max error relative to the largest true value: per row for matrices
    (rows of x and W gradients differ by orders of magnitude, e.g. the 1/eps
    rows of zero-norm inputs), over the whole tensor otherwise."""
    if truth.numel() == 0:
        return 0.0
    if truth.dim() < 2:
        return ((got - truth).abs().max() / truth.abs().max().clamp_min(1e-300)).item()
    denom = truth.abs().amax(dim=1).clamp_min(truth.abs().max() * 1e-12).clamp_min(1e-300)
    return ((got - truth).abs().amax(dim=1) / denom).max().item()


def _case(device, dtype, n, d, c, *, seed=0, scale=10.0, bias=False, ignore=(), peaked=False,
          zero_x_rows=(), zero_w_rows=(), ignore_index=-100, short_rows=0):
    """Inputs rounded to ``dtype`` on ``device`` (scale and bias float32)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    w = torch.randn(c, d, generator=gen)
    target = torch.randint(0, c, (n,), generator=gen)
    if peaked:
        # Rows almost aligned with their class: p(target) -> 1 at s = 64.
        x = w[target] + 0.05 * x
    # The first short_rows rows of x and of W at 1/20 of their norm (~0.3 at D = 40: below eps = 0.5).
    x[:short_rows] *= 0.05
    w[:short_rows] *= 0.05
    for i in zero_x_rows:
        x[i] = 0.0
    for j in zero_w_rows:
        w[j] = 0.0
    for i in ignore:
        target[i] = ignore_index
    if isinstance(scale, str):  # "scalar" (float64, 0-d) / "class" (float32, (C,)): a tensor scale with its gradient
        scale = (torch.tensor(12.0, dtype=torch.float64) if scale == "scalar"
                 else 8.0 + 8.0 * torch.rand(c, generator=gen)).to(device)
    b = (0.5 * torch.randn(c, generator=gen)).to(device) if bias else None
    return x.to(device, dtype), w.to(device, dtype), target.to(device), scale, b


def _check(fn, x, w, target, scale, bias, kw, *, lse=True, g_scale=1.0, factor=2.0, seed=1):
    """Kernel vs reference (input dtype) vs ground truth (float64), with
    upstream gradients of size ``g_scale`` for the loss and the lse: kernel
    error <= factor x reference error + atol."""
    n = x.shape[0]
    gen = torch.Generator().manual_seed(seed)
    g_loss = torch.rand(n, generator=gen) + 0.5 if kw.get("reduction") == "none" else torch.tensor(1.7)
    g_loss = g_scale * g_loss
    g_lse = (g_scale * torch.randn(n, generator=gen) if lse else None)
    dev = x.device
    g_loss = g_loss.to(dev)
    g_lse = g_lse.to(dev) if g_lse is not None else None
    ref64 = _evaluate(
        cosine_cross_entropy_ref, x.double(), w.double(), target,
        scale.double() if isinstance(scale, torch.Tensor) else scale,
        bias.double() if bias is not None else None, kw, g_loss, g_lse)
    ref = _evaluate(cosine_cross_entropy_ref, x, w, target, scale, bias, kw, g_loss, g_lse)
    got = _evaluate(fn, x, w, target, scale, bias, kw, g_loss, g_lse)
    assert got.keys() == ref64.keys()
    for name, truth in ref64.items():
        assert torch.isfinite(got[name]).all(), f"{name}: non-finite values"
        err, ref_err = _error(got[name], truth), _error(ref[name], truth)
        atol = ATOL_REL[x.dtype]
        assert err <= factor * ref_err + atol, (
            f"{name}: kernel error {err:.3e} > {factor} x reference error {ref_err:.3e} + atol {atol:.1e} (relative)")
    return got


F32 = torch.float32

# (id, shape (N, D, C), case options, loss options). Each runs one forward and
# one backward under the interpreter: keep them small.
CASES = [
    ("plain-odd", (97, 59, 1031), dict(), dict()),
    ("arcface-exact-s64", (97, 59, 1031), dict(scale=64.0, ignore=(3, 50)),
     dict(angular_margin=0.5)),
    ("arcface-detached-s64", (61, 40, 300), dict(scale=64.0), dict(angular_margin=0.5, margin_grad="detached")),
    ("cosface-exact-s64-smooth-zloss", (61, 40, 300), dict(scale=64.0, bias=True),
     dict(additive_margin=0.35, label_smoothing=0.1, z_loss=1e-3)),
    ("combined-detached", (61, 40, 300), dict(scale=30.0), dict(
        angular_margin=0.3, additive_margin=0.2, margin_grad="detached")),
    ("class-scale-bias-sum", (61, 40, 300), dict(scale="class", bias=True), dict(reduction="sum")),
    ("tensor-scale-none", (61, 40, 300), dict(scale="scalar", ignore=(0, 7)), dict(reduction="none")),
    ("no-normalization", (61, 40, 300), dict(scale=0.5, bias=True), dict(
        normalize_input=False, normalize_weight=False, additive_margin=0.1)),
    ("normalize-x-only", (61, 40, 300), dict(scale=5.0), dict(normalize_weight=False)),
    ("peaked-s64-arcface", (61, 40, 300), dict(scale=64.0, peaked=True), dict(angular_margin=0.5)),
    ("zero-norm-rows", (61, 40, 300), dict(scale=20.0, zero_x_rows=(1, 60), zero_w_rows=(5,)),
     dict(additive_margin=0.2)),
    ("ignore-index-in-range", (61, 40, 300), dict(ignore=(2, 4), ignore_index=0), dict(ignore_index=0)),
    ("rows-below-a-large-eps", (61, 40, 300), dict(scale=20.0, short_rows=10, zero_x_rows=(20,)),
     dict(eps=0.5, additive_margin=0.2)),
    ("feature-loop-D200", (40, 200, 300), dict(scale=16.0), dict(angular_margin=0.2)),
    ("C1", (37, 24, 1), dict(scale=8.0, bias=True), dict(label_smoothing=0.2)),
    ("N1", (1, 33, 300), dict(scale=64.0), dict(angular_margin=0.5)),
]


@pytest.mark.parametrize("shape,case_kw,loss_kw", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_matches_reference_fp32(device, shape, case_kw, loss_kw):
    x, w, t, scale, bias = _case(device, F32, *shape, **case_kw)
    _check(_triton_fn(), x, w, t, scale, bias, loss_kw)


def _record_upcasts(monkeypatch) -> list[bool]:
    """The UPCAST flag of every launch from here on: a bfloat16 test must run
    the tensor-core path (UPCAST false), not pass on the float32 fallback."""
    from nnk.impl.triton import backward, forward

    seen = []
    for module in (forward, backward):
        def spy(dtype, upcast=False, _original=module.dtype_args):
            args = _original(dtype, upcast)
            seen.append(args["UPCAST"])
            return args

        monkeypatch.setattr(module, "dtype_args", spy)
    return seen


@pytest.mark.parametrize("shape,case_kw,loss_kw", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_matches_reference_bf16_tensor_cores(device, bf16_triton, monkeypatch, shape, case_kw, loss_kw):
    upcasts = _record_upcasts(monkeypatch)
    x, w, t, scale, bias = _case(device, torch.bfloat16, *shape, **case_kw)
    _check(_triton_fn(), x, w, t, scale, bias, loss_kw)
    assert upcasts and not any(upcasts), upcasts


def test_public_api_all_ignored_and_return_lse_off(device):
    """Through nnk.cosine_cross_entropy: the loss alone (no lse output) and a
    batch whose rows are all ignored (sum = 0, zero gradients)."""
    x, w, t, scale, bias = _case(device, F32, 97, 59, 1031, scale=30.0, bias=True, ignore=(5, 9))
    _check(_public_fn, x, w, t, scale, bias, dict(angular_margin=0.4, reduction="mean"), lse=False)
    x, w, t, scale, bias = _case(device, F32, 9, 16, 50, ignore=range(9))
    got = _check(_public_fn, x, w, t, scale, bias, dict(reduction="sum"), lse=False)
    assert got["loss"].item() == 0.0 and not got["dx"].any()


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_empty_batch(device, deterministic):
    """N = 0: loss 0 (sum), empty d x, zero d W."""
    x = torch.randn(0, 8, device=device, requires_grad=True)
    w = torch.randn(5, 8, device=device, requires_grad=True)
    loss = nnk.cosine_cross_entropy(x, w, torch.zeros(0, dtype=torch.long, device=device), impl="triton",
                                    reduction="sum", deterministic=deterministic)
    dx, dw = torch.autograd.grad(loss, (x, w))
    assert loss.item() == 0.0 and dx.shape == (0, 8) and torch.equal(dw, torch.zeros_like(w))


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_splits_and_class_chunks(device, deterministic):
    """More programs than row blocks (class splits / row splits, including
    empty splits) and several class chunks of d W: the same results."""
    x, w, t, scale, bias = _case(device, F32, 97, 59, 1031, scale="class", bias=True, ignore=(4,))
    fn = _triton_fn(deterministic, class_splits=3, row_splits=2, class_chunk=256)
    kw = dict(angular_margin=0.5, label_smoothing=0.05)
    _check(fn, x, w, t, scale, bias, kw)
    # More splits than tiles (5 class tiles, 2 row tiles in the interpreter):
    # empty splits must contribute nothing.
    _check(_triton_fn(deterministic, class_splits=9, row_splits=5), x, w, t, scale, bias, kw)


def test_autotuning_starts_each_run_from_zero(device, monkeypatch):
    """Autotuning times every candidate on the real arguments, several runs
    each, and the backward adds into its accumulators: each timed run and the
    launch after the timing must start from zero. Two candidates, timed by a
    stand-in benchmark that runs each twice (the interpreter has no GPU timer)
    and picks the second (not the interpreter's config), over five class
    chunks; with every accumulator, and with those of d s and d b absent
    (None: triton 3.6's restore_value called .clone() on them and failed)."""
    if device.type != "cpu":
        pytest.skip("the GPU autotunes every Triton test already")
    import triton

    from nnk.impl.triton import backward

    timed = []

    def bench(kernel_call, quantiles):
        kernel_call()
        kernel_call()
        timed.append(len(timed))
        return [-float(len(timed))] * len(quantiles)  # the later candidate is faster

    options = dict(backward._cce_bwd_tuned._options, do_bench=bench, prune_configs_by=None, configs=[
        triton.Config({"BLOCK_N": 64, "BLOCK_C": 256, "BLOCK_D": 64}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_N": 32, "BLOCK_C": 128, "BLOCK_D": 32}, num_warps=4, num_stages=1)])
    monkeypatch.setattr(backward, "_cce_bwd_tuned", backward.PerDeviceAutotune(backward._cce_bwd_kernel, **options))
    fn = _triton_fn(False, class_chunk=256)
    kw = dict(angular_margin=0.5, label_smoothing=0.05)
    x, w, t, scale, bias = _case(device, F32, 97, 59, 1031, scale="class", bias=True, ignore=(4,))
    _check(fn, x, w, t, scale, bias, kw)
    _check(fn, x, w, t, 10.0, None, kw)
    assert len(timed) == 4, timed  # two keys (with and without d s, d b), two candidates each


def test_no_autotune_launches_the_fixed_config(device, monkeypatch):
    """NNK_TRITON_NO_AUTOTUNE=1: the forward and backward launch FIXED_FWD /
    FIXED_BWD, no autotuner is asked; unset or 0, both kernels are autotuned;
    a value other than 0 or 1 is refused."""
    from nnk.impl.triton import backward, forward
    from nnk.impl.triton.launch import PerDeviceAutotune

    asked, on = [], PerDeviceAutotune.on

    def recorded(self, dev):
        asked.append(self)
        return on(self, dev)

    monkeypatch.setattr(PerDeviceAutotune, "on", recorded)
    x, w, t, scale, bias = _case(device, F32, 97, 59, 1031, scale=16.0, bias=True, ignore=(4,))
    for value, tuned in (("1", []), ("0", [forward._cce_fwd_tuned, backward._cce_bwd_tuned])):
        monkeypatch.setenv("NNK_TRITON_NO_AUTOTUNE", value)
        asked.clear()
        _check(_public_fn, x, w, t, scale, bias, dict(additive_margin=0.2))
        assert asked == tuned, value
    monkeypatch.setenv("NNK_TRITON_NO_AUTOTUNE", "yes")
    with pytest.raises(ValueError, match="NNK_TRITON_NO_AUTOTUNE must be 0 or 1"):
        _public_fn(x, w, t, scale=scale, bias=bias)


def test_backward_prunes_block_d_64_for_float32_operands(device, monkeypatch):
    """configs.prune_backward, installed on the backward's autotuner: with
    float32 dot operands the BLOCK_D = 64 candidate (ptxas: 32 registers and
    10-50 KB of stack per thread) is neither compiled nor timed; 16-bit
    operands keep it; a lone candidate stays."""
    import triton

    from nnk.impl.triton import backward, configs

    bd64 = triton.Config({"BLOCK_N": 64, "BLOCK_C": 256, "BLOCK_D": 64}, num_warps=4, num_stages=1)
    bd32 = triton.Config({"BLOCK_N": 32, "BLOCK_C": 128, "BLOCK_D": 32}, num_warps=4, num_stages=1)
    assert configs.prune_backward([bd32, bd64], {}, DOT_PRECISION="ieee") == [bd32]
    assert configs.prune_backward([bd32, bd64], {}, DOT_PRECISION="tf32") == [bd32, bd64]
    assert configs.prune_backward([bd64], {}, DOT_PRECISION="ieee") == [bd64]
    options = backward._cce_bwd_tuned._options
    assert options["prune_configs_by"]["early_config_prune"] is configs.prune_backward
    if device.type != "cpu":
        return  # the stand-in timing below is the interpreter's
    timed = []

    def bench(kernel_call, quantiles):
        kernel_call()
        timed.append(1)
        return [1.0] * len(quantiles)

    tuned = backward.PerDeviceAutotune(backward._cce_bwd_kernel, **dict(options, do_bench=bench, configs=[bd64, bd32]))
    monkeypatch.setattr(backward, "_cce_bwd_tuned", tuned)
    x, w, t, scale, bias = _case(device, F32, 37, 19, 300, scale=8.0, bias=False, ignore=())
    _check(_triton_fn(False), x, w, t, scale, bias, {})
    chosen = list(tuned.on(x.device).cache.values())
    assert len(chosen) == 1 and chosen[0].kwargs["BLOCK_D"] == 32 and len(timed) <= 1


def test_autotuning_refuses_a_later_chunk():
    """The accumulators are zero when autotuning starts only at the first class
    chunk (later chunks hold earlier ones' sums): the hook zeroing them says
    so rather than dropping gradients, should a later chunk ever be tuned."""
    from nnk.impl.triton.backward import _cce_bwd_kernel, _zero_accumulators

    acc = dict(DX_ptr=torch.ones(3), DW_ptr=None, DB_ptr=torch.ones(2), DS_ptr=None)
    with pytest.raises(RuntimeError, match="class chunk after the first"):
        _zero_accumulators(dict(acc, c_lo=256))
    _zero_accumulators(dict(acc, c_lo=256), reset_only=True)  # after the timing: the tuned launch is next
    assert not acc["DX_ptr"].any() and not acc["DB_ptr"].any()
    # Triton < 3.2 passes the positional arguments as a tuple (c_lo, a keyword, is not among them).
    acc = dict(acc, DX_ptr=torch.ones(3), DB_ptr=torch.ones(2))
    names = _cce_bwd_kernel.arg_names
    _zero_accumulators(tuple(acc.get(name) for name in names[:names.index("DS_ptr") + 1]))
    assert not acc["DX_ptr"].any() and not acc["DB_ptr"].any()


def test_class_major_split_stays_within_the_scratch_budget(monkeypatch):
    """Deterministic mode: the class-major pass's float32 partials, d wn
    (parts, chunk, D) and d s, d b (parts, chunk) each, stay within
    SCRATCH_BYTES on GPUs of 108-148 SMs up to D = 8192 and C = 10^7 (at
    D = 8192 an H100's 17 parts took the 256-class chunk floor to 136 MiB of
    d wn, and d s, d b were (parts, C) whatever the chunk: 1.3 GiB at 10^7)."""
    from types import SimpleNamespace

    from nnk.impl.triton import configs

    cuda = torch.device("cuda")
    for sms in (108, 132, 148):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev, sms=sms: SimpleNamespace(
            multi_processor_count=sms))
        for n in (1, 1024, 8192, 1 << 20):
            for c in (1, 1000, 131072, 10**7):
                for d in (1, 64, 512, 4096, 6144, 8192):
                    for with_dw in (False, True):
                        parts, chunk = configs.class_major_split(n, c, d, cuda, with_dw)
                        assert parts >= 1 and 1 <= chunk <= c, (sms, n, c, d, with_dw, parts, chunk)
                        assert chunk == c or chunk % 256 == 0
                        live = 4 * parts * chunk * ((d if with_dw else 0) + 2)
                        assert live <= configs.SCRATCH_BYTES, (sms, n, c, d, with_dw, parts, chunk)
        # Few class blocks per chunk (32 at D = 4096) still get row splits.
        assert configs.class_major_split(8192, 131072, 4096, cuda, True)[0] > 1


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_programs_in_reverse_order(device, deterministic, monkeypatch):
    """A GPU runs a grid's programs in any order; the interpreter runs them in
    grid order, where a program that wrongly also writes a row's target
    cosine (the split before the target's tile) is overwritten by the right
    one, unseen. Run the grids backwards: results must not depend on it (the
    split ownership off by one tile gave row losses off by up to 9.3)."""
    if device.type != "cpu":
        pytest.skip("the program order is the GPU's own")
    import builtins
    import sys

    import triton.runtime.interpreter as interpreter

    reversed_grids = []

    def grid_range(*args):
        # The interpreter's launcher loops over the grid with range(); only
        # its loops are reversed.
        frame = sys._getframe(1)
        if frame.f_code.co_name == "__call__" and "grid" in frame.f_locals:
            reversed_grids.append(args)
            return list(reversed(builtins.range(*args)))
        return builtins.range(*args)

    monkeypatch.setattr(interpreter, "range", grid_range, raising=False)
    x, w, t, scale, bias = _case(device, F32, 97, 59, 1031, scale="class", bias=True, ignore=(4,))
    _check(_triton_fn(deterministic, class_splits=3, row_splits=2, class_chunk=256), x, w, t, scale, bias,
           dict(angular_margin=0.5, label_smoothing=0.05))
    assert any(len(a) == 1 and a[0] > 1 for a in reversed_grids), "no grid was reversed: the interpreter changed"


def test_deterministic_bitwise(device):
    """deterministic=True: two runs give bitwise-identical loss, lse and gradients."""
    x, w, t, scale, bias = _case(device, F32, 97, 59, 1031, scale="class", bias=True)
    kw = dict(angular_margin=0.5, label_smoothing=0.1, z_loss=1e-4)
    g = torch.ones((), device=device)
    glse = torch.linspace(-1, 1, 97, device=device)
    runs = [_evaluate(_public_deterministic, x, w, t, scale, bias, kw, g, glse) for _ in range(2)]
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name


def test_strided_inputs(device):
    """x and W of any strides (transposed storage), int32 targets."""
    x, w, t, scale, bias = _case(device, F32, 61, 40, 300, scale=20.0)
    xt = x.T.contiguous().T
    wt = w.T.contiguous().T
    assert not xt.is_contiguous() and not wt.is_contiguous()
    _check(_public_fn, xt, wt, t.int(), scale, bias, dict(additive_margin=0.3))


@pytest.mark.parametrize("loss_kw,g_scale", [
    (dict(angular_margin=0.5), 1.0),
    (dict(additive_margin=0.35, label_smoothing=0.1), 1.0),
    # d logits ~ 1e-4 p: below float16's normal range without the kernel's
    # power-of-two rescaling of each gradient row.
    (dict(additive_margin=0.35), 1e-4),
], ids=["arcface", "cosface-smooth", "tiny-upstream-grad"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_matches_reference_16bit(device, bf16_triton, dtype, loss_kw, g_scale):
    from nnk.impl.triton import configs

    x, w, t, scale, bias = _case(device, dtype, 97, 59, 1031, scale=64.0, bias=True, ignore=(8,))
    # With hi + lo gradient operands the kernel is as accurate as the float32
    # reference (measured: equal to 3 digits); one rounding passes 2x only.
    _check(_public_fn, x, w, t, scale, bias, loss_kw, g_scale=g_scale,
           factor=1.25 if configs.split_grad() else 2.0)


def test_bf16_gradients_where_the_class_sum_cancels(device, bf16_triton):
    """D = 1, x not normalized: d x_i = s sum_j d z_ij sign(w_j), a small
    difference of O(1) terms. bfloat16 hi + lo operands (16 bits of each
    d z) gave 3x the reference's error (a fuzz case, minimized); below
    D = 16 the backward now takes float32 operands (backward.SPLIT_OPERANDS_MIN_D)."""
    g = torch.Generator().manual_seed(0)
    x = 0.25 + 0.1 * torch.rand(8, 1, generator=g)
    w = torch.randn(64, 1, generator=g).abs()
    w[:8] = -w[:8]                      # 1/8 of the classes point against x and its target
    x, w, t = x.bfloat16(), w.bfloat16(), torch.full((8,), 63)
    kw, g = dict(normalize_input=False, reduction="sum"), torch.tensor(1.0)
    truth = _evaluate(cosine_cross_entropy_ref, x.double(), w.double(), t, 10.0, None, kw, g, None)
    ref = _evaluate(cosine_cross_entropy_ref, x, w, t, 10.0, None, kw, g, None)
    got = _evaluate(_public_fn, x.to(device), w.to(device), t.to(device), 10.0, None, kw, g.to(device), None)
    for name in ("dx", "dw"):
        assert _error(got[name], truth[name]) <= 2 * _error(ref[name], truth[name]) + ATOL_REL[torch.bfloat16], name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16bit_backward_takes_float32_operands_below_d16(device, bf16_triton, monkeypatch, dtype):
    upcasts = _record_upcasts(monkeypatch)
    for d in (15, 16):
        x, w, t, scale, bias = _case(device, dtype, 9, d, 33)
        xx = x.clone().requires_grad_()
        nnk.cosine_cross_entropy(xx, w, t, scale=8.0, impl="triton").backward()
    assert upcasts == [False, True, False, False], upcasts   # (forward, backward) at D = 15, then 16


@pytest.mark.parametrize("kind", ["near-parallel", "arcface-odd"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16bit_gradient_as_exact_as_float32_rounded_once(device, bf16_triton, dtype, kind):
    """With hi + lo gradient operands the 16-bit d x is as exact as the
    float32 reference's rounded once to the input dtype. The 16-bit
    reference's own error is about 2x that floor, which hid the lo part from
    the 2x rule: a mutation run zeroed it, or flipped its sign, unseen
    (float16 d x errors 1.7e-3 and 3.5e-3 against the floor's 4.3e-4).
    Nearly parallel classes make the sum over classes cancel."""
    from nnk.impl.triton import configs

    if not configs.split_grad():
        pytest.skip("NNK_TRITON_FAST_GRAD=1: one rounding of the gradient operand")
    g = torch.Generator().manual_seed(0)
    if kind == "near-parallel":
        base = torch.randn(32, generator=g)
        w = (base + 0.01 * torch.randn(300, 32, generator=g)).to(dtype)
        x = (base + 0.03 * torch.randn(64, 32, generator=g)).to(dtype)
        t = torch.randint(0, 300, (64,), generator=g)
        kw = {}
    else:
        x, w, t, _, _ = _case("cpu", dtype, 97, 59, 1031, scale=64.0)
        kw = dict(angular_margin=0.5)
    g_loss = torch.tensor(1.7)
    truth = _evaluate(cosine_cross_entropy_ref, x.double(), w.double(), t, 64.0, None, kw, g_loss, None)["dx"]
    floor = _evaluate(cosine_cross_entropy_ref, x.float(), w.float(), t, 64.0, None, kw, g_loss, None)["dx"]
    got = _evaluate(_public_fn, x.to(device), w.to(device), t.to(device), 64.0, None, kw, g_loss.to(device),
                    None)["dx"]
    assert _error(got, truth) <= 1.5 * _error(floor.to(dtype).double(), truth) + 1e-6


def test_rows_of_norm_beyond_2_pow_127(device):
    """A feature row of norm 2.5e38 (float32's largest is 3.4e38): the
    power-of-two row scaling of the gradient operands caps its exponent
    (tile._pow2_split), and a cap one higher gave NaN (a mutation run).
    W scaled down so that the raw products stay finite."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, generator=g)
    x[0] *= 2.5e38 / x[0].norm()
    w = 0.02 * torch.randn(40, 16, generator=g)
    t = torch.arange(8)
    loss, lse = nnk.cosine_cross_entropy(x.to(device), w.to(device), t.to(device), scale=16.0, impl="triton",
                                         reduction="none", return_lse=True)
    want, want_lse = cosine_cross_entropy_ref(x.double(), w.double(), t, scale=16.0, reduction="none",
                                              return_lse=True)
    torch.testing.assert_close(loss.double().cpu(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double().cpu(), want_lse, rtol=1e-5, atol=1e-5)


def test_deterministic_row_splits_own_their_partials(device, monkeypatch):
    """Deterministic mode: each row split writes its own slice of the chunk's
    d wn partials. The interpreter runs the splits one after another, so a
    slice shared by all (a non-atomic race on a GPU) still summed right there
    (a mutation run); here each slice must hold its own, non-zero rows."""
    from nnk.impl.triton import backward

    seen = []
    normalize_backward = backward.normalize_backward

    def spy(partials, raw, norm, eps, out):
        seen.append(partials.clone())
        return normalize_backward(partials, raw, norm, eps, out)

    monkeypatch.setattr(backward, "normalize_backward", spy)
    x, w, t, scale, bias = _case(device, F32, 97, 59, 300, scale=16.0)
    _check(_triton_fn(True, row_splits=2), x, w, t, scale, bias, dict())
    dw_parts = [p for p in seen if p.shape[:2] == (2, 300)]
    assert dw_parts and all(p[k].abs().amax(dim=1).gt(0).all() for p in dw_parts for k in range(2))


# The zero row's own d W (d wn / 1e-12) overflows float16 when stored: expected.
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_fp16_zero_weight_row(device):
    # A zero class row carries the 1/eps factor in its d cos column; left in
    # the power-of-two scaling of the fp16 gradient operand it underflowed
    # every other entry of the row (a mutation test: 0.12 of max |dx|).
    # d x only: that row's own d W, d wn / 1e-12, is beyond float16 (inf in
    # the reference too).
    x, w, t, scale, bias = _case(device, torch.float16, 61, 40, 300, scale=20.0, zero_w_rows=(7,))
    g_loss, g_lse = torch.tensor(1.7, device=device), None
    kw = dict(additive_margin=0.2)
    truth = _evaluate(cosine_cross_entropy_ref, x.double(), w.double(), t, scale, bias, kw, g_loss, g_lse)["dx"]
    ref = _evaluate(cosine_cross_entropy_ref, x, w, t, scale, bias, kw, g_loss, g_lse)["dx"]
    got = _evaluate(_public_fn, x, w, t, scale, bias, kw, g_loss, g_lse)["dx"]
    assert _error(got, truth) <= 1.25 * _error(ref, truth) + ATOL_REL[torch.float16]


def test_fast_grad_switch_is_read_at_each_backward(device, monkeypatch):
    # It was read once at import: setting it later changed nothing.
    x, w, t, scale, bias = _case(device, torch.float16, 9, 16, 33, scale=64.0, bias=False, ignore=())

    def grad_x(fast):
        monkeypatch.setenv("NNK_TRITON_FAST_GRAD", fast)
        xx = x.clone().requires_grad_()
        nnk.cosine_cross_entropy(xx, w, t, scale=scale, impl="triton").backward()
        return xx.grad

    split, fast = grad_x("0"), grad_x("1")
    assert torch.equal(split, grad_x("0")) and not torch.equal(split, fast)


GEMM_BACKWARD_CASES = [c for c in CASES if c[0] in (
    "plain-odd", "arcface-exact-s64", "cosface-exact-s64-smooth-zloss", "class-scale-bias-sum", "tensor-scale-none",
    "zero-norm-rows", "C1")]


@pytest.mark.skipif(not has_op("cosine_cross_entropy_bwd", "cpu"), reason="nnk._C not built")
@pytest.mark.parametrize("shape,case_kw,loss_kw", [c[1:] for c in GEMM_BACKWARD_CASES],
                         ids=[c[0] for c in GEMM_BACKWARD_CASES])
def test_gemm_backward_matches_reference(device, monkeypatch, shape, case_kw, loss_kw):
    # NNK_TRITON_GEMM_BACKWARD=1: the Triton forward, the extension's backward
    # op (here its CPU kernels) on the forward's lse and lse_lo.
    monkeypatch.setenv("NNK_TRITON_GEMM_BACKWARD", "1")
    calls = []
    backward = ext_cce.cce_backward
    monkeypatch.setattr(ext_cce, "cce_backward", lambda *a: calls.append(1) or backward(*a))
    x, w, t, scale, bias = _case(device, F32, *shape, **case_kw)
    _check(_triton_fn(), x, w, t, scale, bias, loss_kw)
    assert calls, "the extension's backward did not run"


@pytest.mark.skipif(not has_op("cosine_cross_entropy_bwd", "cpu"), reason="nnk._C not built")
def test_gemm_backward_takes_the_chunk_budget_of_its_forward(device, monkeypatch):
    # NNK_CHUNK_MB is read when the forward runs (as impl="cuda" reads it):
    # a value changed before the backward, even a bad one, is not seen.
    monkeypatch.setenv("NNK_TRITON_GEMM_BACKWARD", "1")
    budgets = []
    backward = ext_cce.cce_backward
    monkeypatch.setattr(ext_cce, "cce_backward", lambda *a: budgets.append(a[-2][-1]) or backward(*a))
    x, w, t, scale, bias = _case(device, F32, 9, 16, 33, scale=8.0, bias=False, ignore=())
    x.requires_grad_(True)
    monkeypatch.setenv("NNK_CHUNK_MB", "1")
    loss = nnk.cosine_cross_entropy(x, w, t, scale=scale, impl="triton")
    monkeypatch.setenv("NNK_CHUNK_MB", "bad")
    loss.backward()
    assert budgets == [1 << 20]
    # Without the GEMM backward the budget is not read at all.
    monkeypatch.setenv("NNK_TRITON_GEMM_BACKWARD", "0")
    assert torch.isfinite(nnk.cosine_cross_entropy(x, w, t, scale=scale, impl="triton"))


def test_gemm_backward_refuses_float16_under_fp16_accumulation(device, monkeypatch):
    # As impl="cuda": cuBLAS has no float16 compute with the float32 outputs
    # of the extension's GEMMs (nnk._dispatch.cublas_accumulates_in_fp16,
    # mocked: the setting only matters on CUDA).
    from nnk.impl.triton import function

    if not has_op("cosine_cross_entropy_bwd", device.type):
        pytest.skip(f"nnk._C has no cosine_cross_entropy_bwd for {device.type}")

    monkeypatch.setenv("NNK_TRITON_GEMM_BACKWARD", "1")
    monkeypatch.setattr(function, "cublas_accumulates_in_fp16", lambda op, dev, dtype: dtype == torch.float16)
    x, w, t, scale, bias = _case(device, torch.float16, 9, 16, 33, scale=8.0, bias=False, ignore=())
    with pytest.raises(ValueError, match="allow_fp16_accumulation"):
        nnk.cosine_cross_entropy(x, w, t, scale=scale, impl="triton")


def test_float64_is_rejected(device):
    # On the test device: under --device cuda the interpreter is off, and
    # triton on CPU tensors is then a ValueError before the dtype is looked at.
    x = torch.randn(4, 3, dtype=torch.float64, device=device)
    with pytest.raises(TypeError, match="float64 runs on impl='torch'"):
        nnk.cosine_cross_entropy(x, torch.randn(5, 3, dtype=torch.float64, device=device),
                                 torch.zeros(4, dtype=torch.long, device=device), impl="triton")


@pytest.fixture(scope="module")
def launcher_args(device):
    """Valid arguments of cce_forward, and of cce_backward (the forward's results)."""
    from nnk.impl.triton.forward import cce_forward

    opts = make_options(**OPTION_DEFAULTS)
    x, w = torch.randn(5, 4, device=device), torch.randn(7, 4, device=device)
    fwd = dict(x=x, weight=w, target=torch.tensor([0, 3, 6, -100, 2], device=device),
               scale=torch.full((1,), 8.0, device=device), bias=torch.zeros(7, device=device), opts=opts)
    out = cce_forward(**fwd)
    bwd = dict(fwd, lse=out.lse, lse_lo=out.lse_lo, cos_t=out.cos_t, sin_t=out.sin_t, xnorm=out.xnorm,
               wnorm=out.wnorm, g_row=torch.ones(5, device=device), g_lse=torch.zeros(5, device=device))
    return fwd, bwd


def _other(t):
    """t's shape and dtype on the meta device, where no test's tensors are."""
    return t.to("meta")


def _strided(t):
    return torch.stack([t, t], dim=-1)[..., 0]


# (id, replacement of valid arguments, exception, message) for cce_forward and cce_backward.
BAD_LAUNCH_INPUTS = [
    ("x_1d", lambda a: dict(x=a["x"].flatten()), ValueError, "x must be 2-D"),
    ("x_not_tensor", lambda a: dict(x=a["x"].tolist()), TypeError, "x must be a torch.Tensor"),
    ("weight_3d", lambda a: dict(weight=a["weight"][None]), ValueError, "weight must be 2-D"),
    ("weight_columns", lambda a: dict(weight=a["weight"][:, :3]), ValueError, "D=4 columns"),
    ("no_class", lambda a: dict(weight=a["weight"][:0]), ValueError, "at least one class"),
    ("float64", lambda a: dict(x=a["x"].double(), weight=a["weight"].double()), TypeError,
     "float16, bfloat16 or float32"),
    ("weight_dtype", lambda a: dict(weight=a["weight"].half()), TypeError, "must match x dtype"),
    ("weight_device", lambda a: dict(weight=_other(a["weight"])), ValueError, "weight is on meta"),
    ("target_int32", lambda a: dict(target=a["target"].int()), TypeError, "target must be torch.int64"),
    ("target_shape", lambda a: dict(target=a["target"][:4]), ValueError, r"target must have shape \(5,\)"),
    ("target_2d", lambda a: dict(target=a["target"][:, None]), ValueError, r"target must have shape \(5,\)"),
    ("target_strided", lambda a: dict(target=_strided(a["target"])), ValueError, "target must be contiguous"),
    ("target_device", lambda a: dict(target=_other(a["target"])), ValueError, "target is on meta"),
    ("scale_float", lambda a: dict(scale=8.0), TypeError, "scale must be a torch.Tensor"),
    ("scale_0d", lambda a: dict(scale=a["scale"][0]), ValueError, r"scale must have shape \(1,\) or \(7,\)"),
    ("scale_shape", lambda a: dict(scale=a["scale"].expand(6).contiguous()), ValueError, "scale must have shape"),
    ("scale_float64", lambda a: dict(scale=a["scale"].double()), TypeError, "scale must be torch.float32"),
    ("scale_strided", lambda a: dict(scale=_strided(a["scale"].expand(7))), ValueError, "scale must be contiguous"),
    ("bias_shape", lambda a: dict(bias=a["bias"][:6]), ValueError, r"bias must have shape \(7,\)"),
    ("bias_dtype", lambda a: dict(bias=a["bias"].half()), TypeError, "bias must be torch.float32"),
    ("bias_strided", lambda a: dict(bias=_strided(a["bias"])), ValueError, "bias must be contiguous"),
    ("bias_device", lambda a: dict(bias=_other(a["bias"])), ValueError, "bias is on meta"),
]
BAD_BACKWARD_INPUTS = [
    ("lse_shape", lambda a: dict(lse=a["lse"][:4]), ValueError, r"lse must have shape \(5,\)"),
    ("lse_lo_dtype", lambda a: dict(lse_lo=a["lse_lo"].double()), TypeError, "lse_lo must be torch.float32"),
    ("cos_t_strided", lambda a: dict(cos_t=_strided(a["cos_t"])), ValueError, "cos_t must be contiguous"),
    ("xnorm_missing", lambda a: dict(xnorm=None), ValueError, "xnorm must be the forward's norms"),
    ("wnorm_unasked", lambda a: dict(opts=dataclasses.replace(a["opts"], normalize_weight=False)), ValueError,
     "wnorm must be the forward's norms"),
    ("wnorm_shape", lambda a: dict(wnorm=a["wnorm"][:6]), ValueError, r"wnorm must have shape \(7,\)"),
    ("sin_t_unasked", lambda a: dict(sin_t=a["cos_t"]), ValueError, "sin_t must be the forward's target sines"),
    ("sin_t_missing", lambda a: dict(opts=dataclasses.replace(a["opts"], angular_margin=0.5)), ValueError,
     "sin_t must be the forward's target sines"),
    ("sin_t_dtype", lambda a: dict(opts=dataclasses.replace(a["opts"], angular_margin=0.5), sin_t=a["cos_t"].double()),
     TypeError, "sin_t must be torch.float32"),
    ("g_row_int", lambda a: dict(g_row=a["g_row"].long()), TypeError, "g_row must be floating point"),
    ("g_lse_shape", lambda a: dict(g_lse=a["g_lse"][:, None]), ValueError, r"g_lse must have shape \(5,\)"),
    ("g_lse_device", lambda a: dict(g_lse=_other(a["g_lse"])), ValueError, "g_lse is on meta"),
]
_NEEDS = dict(need_dx=True, need_dw=True, need_ds=True, need_db=True)


@pytest.mark.parametrize("launcher", ["cce_forward", "cce_backward"])
@pytest.mark.parametrize("case,replace,exc,match", BAD_LAUNCH_INPUTS, ids=[c[0] for c in BAD_LAUNCH_INPUTS])
def test_launchers_reject_bad_inputs(launcher_args, launcher, case, replace, exc, match):
    """The host launchers check what they give the kernels (shapes, dtypes,
    devices, layouts; not values) before anything runs."""
    from nnk.impl.triton import backward, forward

    fwd, bwd = launcher_args
    with pytest.raises(exc, match=f"{launcher}: .*{match}"):
        if launcher == "cce_forward":
            forward.cce_forward(**{**fwd, **replace(fwd)})
        else:
            backward.cce_backward(**{**bwd, **replace(bwd)}, **_NEEDS)


@pytest.mark.parametrize("case,replace,exc,match", BAD_BACKWARD_INPUTS, ids=[c[0] for c in BAD_BACKWARD_INPUTS])
def test_backward_launcher_rejects_bad_saved_tensors(launcher_args, case, replace, exc, match):
    from nnk.impl.triton.backward import cce_backward

    _, bwd = launcher_args
    with pytest.raises(exc, match=f"cce_backward: .*{match}"):
        cce_backward(**{**bwd, **replace(bwd)}, **_NEEDS)


def test_backward_launcher_takes_the_valid_arguments(launcher_args):
    from nnk.impl.triton.backward import cce_backward

    _, bwd = launcher_args
    grads = cce_backward(**bwd, **_NEEDS)
    assert grads.dx.shape == (5, 4) and grads.dw.shape == (7, 4) and grads.ds.shape == grads.db.shape == (7,)


def test_launchers_refuse_cpu_tensors_without_the_interpreter(launcher_args, monkeypatch):
    from nnk.impl.triton import configs
    from nnk.impl.triton.forward import cce_forward

    fwd, _ = launcher_args
    if fwd["x"].device.type != "cpu":
        pytest.skip("CPU tensors")
    monkeypatch.setattr(configs, "INTERPRET", False)
    with pytest.raises(ValueError, match="cce_forward: the Triton kernels need CUDA tensors"):
        cce_forward(**fwd)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("NNK_TEST_SLOW") != "1",
                    reason="compiles 117 GPU kernels, ~7 CPU-minutes: set NNK_TEST_SLOW=1")
def test_kernels_compile_for_gpus(tmp_path):
    """The GPU code path (which the interpreter does not exercise: constexpr
    branches, loop-carried types, dot lowering) compiles for sm_80 and sm_90
    in every autotune config, and each fits the GPU's shared memory per block
    (A100: 163 KB, H100: 227 KB; sm_86 GPUs have 99 KB, and there the
    autotuner drops what does not fit). Pointers and the row strides carry
    the 16-byte alignment a real launch at D % 16 == 0 gets, which turns on
    the pipelined (cp.async) loads that use the most shared memory. Runs in a
    subprocess: this process defined the kernels for the interpreter."""

    script = tmp_path / "compile.py"
    script.write_text(COMPILE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().endswith("compiled 117"), proc.stdout


COMPILE_SCRIPT = """
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from nnk.impl.triton import backward, configs, forward, norms

FLOATS = {"eps", "cos_m", "sin_m", "arc_fallback", "additive", "label_smoothing", "z_loss"}
ALIGNED = {"D", "stride_xn", "stride_wc"}
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

def build(fn, dtype, arch, cfg, constexprs, pointers=None):
    unit = {k: 1 for k in ("stride_xd", "stride_wd") if k in fn.arg_names}  # contiguous rows
    constexprs = dict(constexprs, **cfg.kwargs, **unit)
    pointers = dict({"X_ptr": "*" + dtype, "W_ptr": "*" + dtype, "T_ptr": "*i64"}, **(pointers or {}))
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        if name in pointers:
            sig[name] = pointers[name]
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        else:
            sig[name] = "fp32" if name in FLOATS else "i32"
        if name.endswith("_ptr") or name in ALIGNED:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                       options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    shared = k.metadata.shared
    print(fn.__name__, arch, dtype, cfg, "shared", shared, flush=True)
    # Divisions correctly rounded (tl.div_rn): a bare "/" of floats is
    # div.full.f32, 2 ulp. ex2.approx (tl.exp) is the one approximation left.
    assert not re.search(r"div[.](full|approx)", k.asm["ptx"]), (fn.__name__, arch, dtype, cfg)
    assert shared <= SHARED_LIMIT[arch], (fn.__name__, arch, dtype, cfg, shared)

count = 0
# UPCAST with 16-bit inputs: the backward below D = 16, and for float16 rows below eps.
for arch, dtype, upcast in ((80, "bf16", False), (80, "fp32", False), (80, "fp16", False), (80, "fp16", True),
                            (80, "bf16", True), (90, "bf16", False), (90, "fp32", False), (90, "bf16", True),
                            (90, "fp16", True)):
    flags = dict(NORM_X=True, NORM_W=True, HAS_CLASS_SCALE=True, HAS_BIAS=True, HAS_ARC=True, UPCAST=upcast,
                 DOT_PRECISION="ieee" if dtype == "fp32" or upcast else "tf32")
    # Every candidate in the row-major (autotuned) pass; the fixed config in
    # the class-major pass of the deterministic mode too.
    for cfg in configs.FWD_CONFIGS:
        build(forward._cce_fwd_kernel, dtype, arch, cfg, dict(flags, HAS_SMOOTHING=True))
        count += 1
    for cfg, row_major in [(c, True) for c in configs.BWD_CONFIGS] + [(configs.FIXED_BWD, False)]:
        build(backward._cce_bwd_kernel, dtype, arch, cfg, dict(
            flags, ROW_MAJOR=row_major, EXACT_MARGIN=True, HAS_DX=row_major, HAS_DW=True, HAS_DB=True,
            HAS_DS=True, SPLIT_GRAD=True, HAS_FILTER=row_major))
        count += 1
# The target sines of the angular margin (float64 sums), in every input dtype.
for arch in (80, 90):
    for dtype in ("bf16", "fp16", "fp32"):
        block_r, block_d = configs.rowwise_blocks(4096)
        cfg = triton.Config({"BLOCK_R": block_r, "BLOCK_D": block_d}, num_warps=4)
        build(norms._target_sine_kernel, dtype, arch, cfg, {}, pointers={"SIN_ptr": "*fp32", "THR_ptr": "*fp64"})
        count += 1
# The neural-collapse kernels (one config each), in every feature dtype.
from nnk.nc import triton_kernels as nc
for arch in (80, 90):
    for dtype in ("bf16", "fp16", "fp32"):
        build(nc._nc_centered_gram_kernel, dtype, arch,
              triton.Config({"BLOCK_N": nc.GRAM_BLOCK_N, "BLOCK_D": nc.GRAM_BLOCK_D,
                             "CHUNK_ROWS": nc.GRAM_CHUNK_ROWS}, num_warps=nc.GRAM_WARPS),
              {}, pointers={"Y_ptr": "*i64", "OUT_ptr": "*fp64"})
        build(nc._nc_class_sums_kernel, dtype, arch,
              triton.Config({"BLOCK_N": nc.SUMS_BLOCK_N, "BLOCK_D": nc.SUMS_BLOCK_D}, num_warps=4),
              {}, pointers={"PERM_ptr": "*i64", "OFFS_ptr": "*i64", "OUT_ptr": "*fp64"})
        count += 2
print("compiled", count)
"""


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(97, 59, 1031), (256, 128, 131072)], ids=["odd", "C131072"])
def test_matches_reference_bf16(device, shape):
    x, w, t, scale, bias = _case(device, torch.bfloat16, *shape, scale=64.0, bias=True, ignore=(8,))
    _check(_public_fn, x, w, t, scale, bias, dict(angular_margin=0.5, label_smoothing=0.1))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_large_gpu(device, dtype, monkeypatch):
    """GPU sizes with the default work splitting and autotuning (also in a
    GPU session that runs the other tests with NNK_TRITON_NO_AUTOTUNE=1)."""
    monkeypatch.delenv("NNK_TRITON_NO_AUTOTUNE", raising=False)
    x, w, t, scale, bias = _case(device, dtype, 1024, 512, 50_000, scale="class", bias=True, ignore=(8,))
    _check(_public_fn, x, w, t, scale, bias, dict(additive_margin=0.35, z_loss=1e-4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_target_sines_match_the_reference(device, bf16_triton, dtype):
    """norms.target_sines (the angular margin's sin(theta) from float64 sums)
    against target_sine_ref: rows near and far from their class and past
    ArcFace's branch threshold (-1), strided x,
    ignored rows and a target past C (class 0's sine: the launcher's values
    are unchecked, nothing may be read out of bounds), zero, sub-eps and NaN
    rows (NaN stays NaN), D past one block."""
    from nnk.impl.triton.norms import target_sines
    from nnk.reference import target_sine_ref

    g = torch.Generator().manual_seed(3)
    n, d, c = 37, 300, 11
    w = torch.randn(c, d, generator=g, dtype=torch.float64)
    t = torch.randint(0, c, (n,), generator=g)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x[:12] = w[t[:12]] * 2 + 1e-3 * x[:12]
    x[12] = 0
    x[13] *= 1e-14
    x[17, 5] = float("nan")
    x[19:21] = -w[t[19:21]]  # past ArcFace's threshold: -1
    t[14:17] = -100
    t[18] = c
    xs = _strided(x.to(device, dtype))
    w, t = w.to(device, dtype), t.to(device)
    opts = make_options(**{**OPTION_DEFAULTS, "angular_margin": 0.5, "eps": 1e-12})
    got = target_sines(xs, w, t, opts)
    want = target_sine_ref(xs, w, torch.where((t < 0) | (t >= c), 0, t), angular_margin=0.5)
    assert got.dtype == torch.float32 and got.shape == (n,) and got[17].isnan() and xs.stride(1) == 2
    assert (got[19:21] == -1).all()
    assert (got[:12] < 1e-2).all()  # the near rows
    torch.testing.assert_close(got, want, rtol=2 * 2.0**-24, atol=1e-9, equal_nan=True)


@triton.jit
def _expm1_kernel(U_ptr, OUT_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(OUT_ptr + offs, _expm1(tl.load(U_ptr + offs, mask=mask, other=0.0)), mask=mask)


def test_target_p_minus_one_within_a_few_ulp(device, gpu_exp):
    """backward._expm1, the target's p - 1 in d z, against float64 expm1:
    exp(u) - 1 with a GPU's exp (ex2.approx, tests/gpu_exp_emulation.py) errs
    by 12% at u = -1e-6, a confident row's target."""
    u = torch.cat([-torch.logspace(-12, math.log10(0.2499), 40, dtype=torch.float64), torch.tensor(
        [0.0, 1e-7, 0.1, 0.2499, 0.25, -0.25, -0.3, -1.0, -5.0, -20.0, -float("inf"), float("nan")],
        dtype=torch.float64)]).float()
    out = torch.empty_like(u, device=device)
    _expm1_kernel[(1,)](u.to(device), out, u.numel(), BLOCK=64)
    out = out.cpu().double()
    want = u.double().expm1()
    rel = ((out - want) / want.abs().clamp_min(1e-300))[~want.isnan()].abs()
    small = (u.abs() < 0.25)[~want.isnan()]
    assert rel[small].max() <= 4 * 2.0**-24, rel[small].max()
    assert rel[~small].max() <= 2.0**-20, rel[~small].max()
    assert out[u == 0].item() == 0.0 and out[-1].isnan() and out[-2].item() == -1.0


@triton.jit
def _exp_kernel(U_ptr, OUT_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(OUT_ptr + offs, tl.exp(tl.load(U_ptr + offs, mask=mask, other=0.0)), mask=mask)


def test_interpreter_exp_is_a_gpus(device, gpu_exp):
    """Every Triton kernel of a CPU run takes the GPU's exp (conftest.py):
    ex2.approx's of u log2(e) rounded to float32, then 2^-23 high
    relatively, not numpy's correctly rounded exp."""
    if device.type != "cpu":
        pytest.skip("the model of a GPU's exp is for the interpreter")
    from gpu_exp_emulation import gpu_exp as model

    u = torch.tensor([0.0, -1e-6, 0.3, -2.5, -20.0, 7.0])
    out = torch.empty_like(u)
    _exp_kernel[(1,)](u, out, u.numel(), BLOCK=8)
    assert torch.equal(out, torch.from_numpy(model(u.numpy())))
    assert out[0] == 1 and int((out > u.exp()).sum()) >= 4


def test_autotune_keys_are_size_buckets():
    # Exact N and C in the keys would re-tune (several configs, timed) for
    # every new batch size and, with Partial-FC sampling, at every step.
    from nnk.impl.triton.backward import _cce_bwd_tuned
    from nnk.impl.triton.forward import _cce_fwd_tuned
    from nnk.impl.triton.launch import shape_buckets

    for tuned in (_cce_fwd_tuned, _cce_bwd_tuned):
        assert {"N_BUCKET", "C_BUCKET"} <= set(tuned.keys) and not {"N", "C"} & set(tuned.keys)
    assert shape_buckets(1000, 131072) == {"N_BUCKET": 1024, "C_BUCKET": 131072}
    assert shape_buckets(0, 1) == {"N_BUCKET": 1, "C_BUCKET": 1}


def test_autotuners_are_per_gpu_model(monkeypatch):
    # An autotuner's cache key holds no device: a config timed on one GPU
    # model would be reused on another (over an sm_86's shared memory after
    # tuning on an sm_90). Each model gets its own autotuner over one kernel.
    from nnk.impl.triton import configs, launch as launch_mod
    from nnk.impl.triton.forward import _cce_fwd_tuned

    models = iter([("NVIDIA A100", 8, 0), ("NVIDIA H100", 9, 0), ("NVIDIA A100", 8, 0)])
    monkeypatch.setattr(launch_mod, "device_model", lambda device: next(models))
    tuned = launch_mod.PerDeviceAutotune(_cce_fwd_tuned.fn, configs=configs.FWD_CONFIGS, key=_cce_fwd_tuned.keys)
    a100, h100, again = (tuned.on(torch.device("cpu")) for _ in range(3))
    assert again is a100 and h100 is not a100
    assert a100.fn is h100.fn is _cce_fwd_tuned.fn and a100.keys == _cce_fwd_tuned.keys


def test_float16_rows_below_a_large_eps_keep_their_gradient(device):
    # float16 gradient operands left out rows with 0 < norm <= eps (dx / dW
    # errors of 9.8 / 15.9 against 0.029 / 0.013 for the reference at eps=1e-2);
    # the launcher now switches to float32 operands when such rows exist.
    torch.manual_seed(0)
    x, w = torch.randn(8, 16).half(), torch.randn(10, 16).half()
    t = torch.randint(0, 10, (8,)).to(device)
    w[3] = (w[3].float() / w[3].float().norm() * 5e-3).half()  # norm eps / 2
    x[2] = (x[2].float() / x[2].float().norm() * 5e-3).half()

    def grads(fn, dtype):
        xx, ww = x.to(device, dtype).clone().requires_grad_(), w.to(device, dtype).clone().requires_grad_()
        fn(xx, ww, t, scale=16.0, eps=1e-2).backward()
        return xx.grad.double(), ww.grad.double()

    truth = grads(cosine_cross_entropy_ref, torch.float64)
    ref = grads(cosine_cross_entropy_ref, torch.float16)
    got = grads(lambda *a, **k: nnk.cosine_cross_entropy(*a, **k, impl="triton"), torch.float16)
    for g, r, tr in zip(got, ref, truth):
        assert (g - tr).abs().max() <= 2 * (r - tr).abs().max() + 1e-3
