"""Extreme numerics on every impl that runs on this machine (the blockwise
torch path; the extension's CPU kernels; Triton under the interpreter on CPU,
or on the GPU with --device cuda): no NaN/Inf where the fp64 reference is
finite, and errors within 2x the same-dtype reference's (+ atol)."""
import math

import pytest
import torch

import nnk
from cce_cases import assert_within_bound, error_table, make_inputs
from nnk.functional import resolve_impl
from nnk.reference import cosine_cross_entropy_ref

IMPLS = ["torch", "cuda", "triton"]


@pytest.fixture(params=IMPLS)
def impl(request, device):
    try:
        resolve_impl(request.param, device, torch.float32)
    except (ValueError, TypeError) as e:
        pytest.skip(f"impl={request.param!r} unavailable here: {e}")
    return request.param


def _fn(impl, **extra):
    return lambda x, w, t, kw: nnk.cosine_cross_entropy(x, w, t, impl=impl, return_lse=True, **kw, **extra)


@pytest.mark.parametrize("margin_grad", ["exact", "detached"])
def test_arcface_s64_at_cos_plus_minus_one(impl, device, bf16_triton, margin_grad):
    """The classic ArcFace NaN: theta -> 0 (x parallel to its class) and
    theta -> pi (anti-parallel), s=64, m=0.5, in every dtype."""
    def mutate(x, w, t):
        x[:8] = w[t[:8]] * 2.0
        x[8:16] = -w[t[8:16]] * 0.5

    opts = {"scale": 64.0, "angular_margin": 0.5, "additive_margin": 0.1, "margin_grad": margin_grad}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        errs = error_table(_fn(impl), opts, 33, 24, 257, dtype, device=device, mutate=mutate)
        assert all(math.isfinite(v) for v in errs["impl"].values()), errs
        # float32: 1e-4 of each quantity's magnitude beyond 2x the reference
        # (over seeds 0-11 nnk needed up to 4e-5 on this ill-conditioned case;
        # 2e-3 absolute once let float32 gradients rounded through float16, 3e-4
        # relative off, pass).
        if dtype == torch.float32:
            assert_within_bound(errs, atol=0.0, rtol=1e-4)
        else:
            assert_within_bound(errs, atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_arcface_exact_gradient_of_rows_near_their_class(impl, device, bf16_triton, dtype):
    """Rows at angles 0 to 0.01 from their class in 16 bits, s = 64, m = 0.5,
    the exact margin gradient (~cos / sin there): d x and d W within a few
    roundings of the output dtype. The same-dtype reference is far off here
    (d x 0.5-3.7 in bf16), so its 2x bound would pass anything: the CUDA
    path's 16-bit GEMM operands once put d x and d W 0.2-4.8 off (bf16; 0.08-0.44 in
    fp16), measured in the CUDA emulation (tests/test_cuda_emulation.py)."""
    def near(x, w, t):
        wt = torch.nn.functional.normalize(w[t[:16]].double(), dim=1)
        u = torch.randn(16, x.shape[1], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        u = torch.nn.functional.normalize(u - (u * wt).sum(1, keepdim=True) * wt, dim=1)
        theta = torch.tensor([0.0, 0.003, 0.01, 0.0] * 4, dtype=torch.float64)[:, None]
        x[:16] = (3.1 * (theta.cos() * wt + theta.sin() * u)).to(x.dtype)
        x[12:16] = w[t[12:16]] * 2.0  # exactly parallel

    opts = {"scale": 64.0, "angular_margin": 0.5, "additive_margin": 0.1, "margin_grad": "exact"}
    errs = error_table(_fn(impl), opts, 33, 24, 257, dtype, device=device, mutate=near)
    unit = 2.0**-11 if dtype == torch.float16 else 2.0**-8
    for k in ("x", "weight"):
        assert errs["impl"][k] <= 8 * unit * errs["mag"][k], (k, errs["impl"][k], errs["mag"][k])


@pytest.mark.parametrize("margin", [2.0, 2.5])
def test_angular_margins_beyond_pi_over_2(impl, device, margin):
    """The definition puts no bound below pi on m: the ArcFace branch then
    holds for cos_t >= -cos m > 0 only (0.42 at m = 2, 0.80 at 2.5). Target
    cosines spread over [-0.99, 0.99] put rows on both branches."""
    def spread(x, w, t):
        wt = torch.nn.functional.normalize(w[t.clamp_min(0)].double(), dim=1)
        u = x.double() - (x.double() * wt).sum(1, keepdim=True) * wt
        c = torch.linspace(-0.99, 0.99, x.shape[0], dtype=torch.float64, device=x.device)[:, None]
        x.copy_(c * wt + (1 - c * c).sqrt() * torch.nn.functional.normalize(u, dim=1))
        assert (c > -math.cos(margin)).sum() >= 4 and (c < -math.cos(margin)).sum() >= 4

    opts = {"scale": 16.0, "angular_margin": margin, "margin_grad": "exact"}
    errs = error_table(_fn(impl), opts, 33, 24, 257, torch.float32, device=device, mutate=spread)
    assert_within_bound(errs, atol=1e-5)


def test_all_logits_equal(impl, device):
    x, w, t, kw, leaves = make_inputs(9, 16, 130, {"scale": 30.0}, dtype=torch.float32, device=device)
    with torch.no_grad():
        w.copy_(w[:1].expand_as(w))
    loss, lse = nnk.cosine_cross_entropy(x, w, t, impl=impl, return_lse=True, **kw)
    cos = torch.nn.functional.normalize(x.double(), dim=1) @ torch.nn.functional.normalize(w[0].double(), dim=0)
    assert abs(loss.item() - math.log(130)) < 1e-5
    assert (lse.double() - (30.0 * cos + math.log(130))).abs().max() < 1e-4
    loss.backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


def test_one_logit_dominates(impl, device):
    """softmax = 1 to fp32 precision on the target: loss ~ 1e-14, gradients
    ~1e-14 and exact relative to that (p - 1 must not cancel to garbage; the
    1e-6 atol of the lse's case below would pass zero gradients)."""
    def mutate(x, w, t):
        x.copy_(w[t] * 3.0)

    fn = lambda x, w, t, kw: nnk.cosine_cross_entropy(x, w, t, impl=impl, **kw)  # noqa: E731
    errs = error_table(fn, {"scale": 64.0}, 17, 32, 300, torch.float32, device=device, mutate=mutate,
                       with_lse=False)
    assert 1e-15 < errs["mag"]["x"] < 1e-10 and 1e-15 < errs["mag"]["weight"] < 1e-10, errs["mag"]
    assert_within_bound(errs, atol=0.0, rtol=1e-4)
    # With the lse in the objective its gradient adds an O(s) vector along x
    # (d lse / d x_t = p_t s w_t / |x|), which the normalization's projection
    # removes: what its float32 rounding leaves (~1e-7) is more than the true
    # d x (~2e-8), in the reference as in nnk.
    errs = error_table(_fn(impl), {"scale": 64.0}, 17, 32, 300, torch.float32, device=device, mutate=mutate)
    assert_within_bound(errs, atol=1e-6)


def test_a_huge_z_loss_spares_rows_without_upstream_gradient(impl, device):
    """z_loss near float32's largest, where 2 z_loss lse overflows: rows whose
    upstream gradient is 0 get d x = 0, as through autograd of the reference
    (z_loss * g first), not inf * 0 = NaN."""
    x, w, t, kw, leaves = make_inputs(6, 8, 11, {"scale": 4.0}, dtype=torch.float32, device=device)
    kw["z_loss"] = 3e38
    g = torch.zeros(6, device=device)
    g[0] = 1.0
    for fn in (lambda: nnk.cosine_cross_entropy(x, w, t, impl=impl, reduction="none", **kw),
               lambda: cosine_cross_entropy_ref(x, w, t, reduction="none", **kw)):
        (dx,) = torch.autograd.grad(fn(), [x], g)
        assert torch.equal(dx[1:], torch.zeros_like(dx[1:])), dx


@pytest.mark.parametrize("magnitude", [1e-30, 1e30])
def test_tiny_and_huge_feature_norms(impl, device, magnitude):
    x, w, t, kw, leaves = make_inputs(12, 8, 50, {"scale": 16.0, "additive_margin": 0.2}, dtype=torch.float32,
                                      device=device)
    with torch.no_grad():
        x.mul_(magnitude)
    loss = nnk.cosine_cross_entropy(x, w, t, impl=impl, **kw)
    ref = cosine_cross_entropy_ref(x.double(), w.double(), t, **kw)
    assert torch.isfinite(loss) and abs(loss.item() - ref.item()) < 1e-4 * max(1.0, abs(ref.item()))
    loss.backward()
    assert torch.isfinite(w.grad).all() and torch.isfinite(x.grad).all()


def test_one_feature_rows_get_no_input_gradient(impl, device):
    """D = 1: x / ||x|| = sign(x) exactly, so d loss / d x = (g - y <y, g>) / ||x||
    is 0 up to rounding, and 1 / ||x|| (here up to 1e5) multiplies that rounding
    (a reciprocal-then-multiply normalization once left 1e-3 here)."""
    x = torch.tensor([[6.6e-4], [2.7e-4], [-4.5e-4], [1e-5], [3.0]], device=device, requires_grad=True)
    w = torch.tensor([[-0.17], [-1.5]], device=device, requires_grad=True)
    t = torch.tensor([0, 1, 0, 1, 0], device=device)
    for normalize_weight in (False, True):
        loss = nnk.cosine_cross_entropy(x, w, t, impl=impl, scale=3.0, normalize_weight=normalize_weight,
                                        reduction="sum")
        (gx,) = torch.autograd.grad(loss, [x])
        assert gx.abs().max().item() < 1e-6, (normalize_weight, gx.flatten().tolist())


def test_single_row_one_million_classes(impl, device):
    if impl == "triton" and device.type == "cpu":
        pytest.skip("C=1e6 is ~8000 class tiles: too slow for the Triton interpreter (runs with --device cuda)")
    errs = error_table(_fn(impl), {"scale": 30.0, "angular_margin": 0.5}, 1, 8, 1_000_000, torch.float32,
                       device=device)
    assert_within_bound(errs, atol=1e-5)


def test_empty_batch(impl, device):
    x = torch.zeros(0, 5, device=device, requires_grad=True)
    w = torch.randn(7, 5, device=device, requires_grad=True)
    t = torch.zeros(0, dtype=torch.long, device=device)
    total = nnk.cosine_cross_entropy(x, w, t, impl=impl, reduction="sum")
    assert total.item() == 0.0
    total.backward()
    assert x.grad.shape == (0, 5) and torch.equal(w.grad, torch.zeros_like(w))
    assert torch.isnan(nnk.cosine_cross_entropy(x, w, t, impl=impl))  # mean over no rows, as F.cross_entropy


def test_non_contiguous_and_overlapping_inputs(impl, device):
    x, w, t, kw, _ = make_inputs(10, 12, 40, {"scale": 8.0, "bias": True}, dtype=torch.float32, device=device,
                                 requires_grad=False)
    xs = x.t().contiguous().t()                       # column-major
    ws = torch.cat([w, w], dim=1)[:, ::2]             # strided columns: same values as w
    xe = x[:1].expand(10, 12)                         # overlapping rows (stride 0)
    ts = torch.stack([t, t.flip(0)], dim=1)[:, 0]     # strided int64 targets: same values as t
    for xi, wi, ti in ((xs, w, t), (x, ws, t), (xe, w, t), (x, w, ts)):
        got = nnk.cosine_cross_entropy(xi, wi, ti, impl=impl, **kw)
        want = cosine_cross_entropy_ref(xi.contiguous(), wi.contiguous(), t, **kw)
        assert abs(got.item() - want.item()) < 1e-5


def test_minus_inf_bias_masks_whole_class_tiles(impl, device):
    """A -inf bias masks classes (probability 0, as in PyTorch). Masking the
    first 256 classes empties whole leading tiles of a row's online
    log-sum-exp, whose running max is then still -inf."""
    x, w, t, kw, leaves = make_inputs(8, 16, 300, {"scale": 16.0, "bias": True}, dtype=torch.float32,
                                      device=device)
    with torch.no_grad():
        kw["bias"][:256] = -math.inf
        t.copy_(torch.arange(256, 300, 6)[:8])

    def run(fn):
        loss, lse = fn(x, w, t, return_lse=True, **kw)
        return [loss, lse, *torch.autograd.grad(loss + 0.3 * lse.sum(), list(leaves.values()))]

    got = run(lambda *a, **k: nnk.cosine_cross_entropy(*a, impl=impl, **k))
    want = run(cosine_cross_entropy_ref)
    for name, a, b in zip(["loss", "lse", *leaves], got, want):
        assert torch.isfinite(a).all(), name
        assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item()), name


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter computing on NaN
def test_a_row_without_finite_logits_is_nan_as_in_pytorch(impl, device):
    """Every class masked by a -inf bias: F.cross_entropy's loss and
    gradients are NaN. The p = 0 that a masked class-parallel shard gets
    (its rows carry no upstream gradient) must not make them finite here,
    where GradScaler relies on the NaN to skip the step."""
    x, w, t, kw, leaves = make_inputs(6, 8, 40, {"scale": 8.0, "bias": True}, dtype=torch.float32, device=device)
    with torch.no_grad():
        kw["bias"].fill_(-math.inf)
    for opts in ({}, {"z_loss": 1e-3}, {"label_smoothing": 0.1}):
        loss = nnk.cosine_cross_entropy(x, w, t, impl=impl, **kw, **opts)
        want = cosine_cross_entropy_ref(x, w, t, **kw, **opts)
        got_g = torch.autograd.grad(loss, list(leaves.values()))
        want_g = torch.autograd.grad(want, list(leaves.values()))
        assert loss.isnan() and want.isnan()
        for name, a, b in zip(leaves, got_g, want_g):
            assert b.isnan().all() and a.isnan().all(), (opts, name)
    # Through the lse output alone (no gradient of the loss): d lse / d z is
    # the softmax, NaN here too; only a row without any upstream gradient
    # (a masked class-parallel shard's) gets p = 0.
    _, lse = nnk.cosine_cross_entropy(x, w, t, impl=impl, return_lse=True, **kw)
    _, want = cosine_cross_entropy_ref(x, w, t, return_lse=True, **kw)
    got_g = torch.autograd.grad(lse.sum(), list(leaves.values()))
    want_g = torch.autograd.grad(want.sum(), list(leaves.values()))
    for name, a, b in zip(leaves, got_g, want_g):
        assert b.isnan().all() and a.isnan().all(), ("lse", name)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter computing on NaN
@pytest.mark.parametrize("angular_margin", [0.0, 0.5])
def test_a_nan_weight_row_makes_its_rows_nan(impl, device, angular_margin):
    """A NaN in one class's weight row makes every row's loss NaN, as the
    reference's: a NaN logit in each row, the target's own in the rows
    targeting that class. ArcFace clamps the target cosine to [-1, 1], and
    a clamp by max/min (PTX max.f32 / min.f32, the GPU lowering of
    tl.maximum) turned NaN into -1 there: a finite psi and, the other
    logits being finite, a finite loss on those rows. The interpreter keeps
    NaN either way, so the GPU run is the one that tells."""
    x, w, t, kw, _ = make_inputs(8, 16, 40, {"scale": 8.0}, dtype=torch.float32, device=device, requires_grad=False)
    with torch.no_grad():
        w[3, 2] = math.nan
        t[:3] = 3
        t[3:] = torch.arange(10, 15, device=device)
    opts = dict(kw, angular_margin=angular_margin, reduction="none")
    loss = nnk.cosine_cross_entropy(x, w, t, impl=impl, **opts)
    want = cosine_cross_entropy_ref(x, w, t, **opts)
    assert want.isnan().all() and loss.isnan().all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter computing on NaN
def test_a_plus_inf_logit_makes_the_row_nan_as_in_pytorch(impl, device):
    """A +inf bias on one class (one that no row targets, in a later class
    tile than the targets): F.cross_entropy's log_softmax gives NaN (inf -
    inf), so the reference's loss and gradients are NaN; its lse is +inf. A
    (max, rest) partial that kept the +inf entry out as "the max" gave a loss
    of +inf with finite bias gradients instead."""
    x, w, t, kw, leaves = make_inputs(5, 8, 300, {"scale": 8.0, "bias": True}, dtype=torch.float32, device=device)
    with torch.no_grad():
        t.copy_(torch.arange(5))
    # One +inf, and two (a tie, which the extension's merge made lse NaN
    # with: exp(inf - inf)); the z-loss gave the extension a loss of +inf.
    for cols in ([290], [7, 290]):
        with torch.no_grad():
            kw["bias"][cols] = math.inf
        for opts in ({}, {"z_loss": 1e-3}, {"label_smoothing": 0.1}):
            loss, lse = nnk.cosine_cross_entropy(x, w, t, impl=impl, reduction="none", return_lse=True, **kw, **opts)
            want, want_lse = cosine_cross_entropy_ref(x, w, t, reduction="none", return_lse=True, **kw, **opts)
            assert want.isnan().all() and loss.isnan().all(), (cols, opts)
            assert (want_lse == math.inf).all() and (lse == math.inf).all(), (cols, opts)  # as torch.logsumexp
            for name, g in zip(leaves, torch.autograd.grad(loss.sum(), list(leaves.values()))):
                assert g.isnan().all(), (cols, opts, name)


def test_deterministic_mode_is_bitwise_reproducible(impl, device):
    x, w, t, kw, leaves = make_inputs(37, 19, 211, {"scale": "per_class", "bias": True, "angular_margin": 0.3},
                                      dtype=torch.float32, device=device)
    runs = []
    for _ in range(2):
        loss = nnk.cosine_cross_entropy(x, w, t, impl=impl, deterministic=True, **kw)
        grads = torch.autograd.grad(loss, list(leaves.values()))
        runs.append([loss, *grads])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_float32_products_ignore_the_tf32_setting(impl, device):
    """Training scripts enable TF32 for their backbones; the head's fp32
    products must stay IEEE fp32 (TF32 puts 6e-5 in a cosine, 4e-3 in a logit
    at s = 64): the same bits with TF32 on as off."""
    if impl == "torch":
        pytest.skip("the torch path is plain PyTorch and follows torch's TF32 setting (README)")
    x, w, t, kw, leaves = make_inputs(97, 59, 1031, {"scale": 64.0, "angular_margin": 0.5, "bias": True},
                                      dtype=torch.float32, device=device)

    def run():
        loss, lse = nnk.cosine_cross_entropy(x, w, t, impl=impl, deterministic=True, return_lse=True, **kw)
        return [loss, lse, *torch.autograd.grad(loss + lse.sum(), list(leaves.values()))]

    ieee = run()
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls
    try:
        tf32 = run()
    finally:
        torch.set_float32_matmul_precision(before)
    for a, b in zip(ieee, tf32):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_more_logits_than_int32_indexes(impl, device):
    """N * C > 2^31: offsets must be 64-bit everywhere. A GPU test: 2^31 logits
    take minutes on 2 CPU cores (measured 307 s for impl="torch")."""
    n, c = 2**16 + 3, 2**15 + 7
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g).to(device).requires_grad_()
    w = torch.randn(c, 4, generator=g).to(device).requires_grad_()
    t = torch.randint(0, c, (n,), generator=g).to(device)
    t[-1] = c - 1
    loss = nnk.cosine_cross_entropy(x, w, t, scale=10.0, impl=impl, reduction="sum")
    loss.backward()
    # Last row's loss by hand (it sits at the far end of the index space).
    xn = torch.nn.functional.normalize(x[-1].detach().double(), dim=0)
    z = 10.0 * torch.nn.functional.normalize(w.detach().double(), dim=1) @ xn
    last = torch.logsumexp(z, 0) - z[c - 1]
    row = nnk.cosine_cross_entropy(x[-1:].detach(), w.detach(), t[-1:], scale=10.0, impl=impl)
    assert abs(row.item() - last.item()) < 1e-4
    assert torch.isfinite(loss) and torch.isfinite(w.grad).all() and x.grad[-1].abs().sum() > 0


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_double_backward_is_a_clear_error(impl, device, reduction):
    """create_graph=True (a gradient penalty) raises instead of returning
    silently detached gradients; a plain backward still works."""
    x = torch.randn(6, 5, device=device, requires_grad=True)
    w = torch.randn(7, 5, device=device, requires_grad=True)
    t = torch.randint(0, 7, (6,), device=device)
    loss = nnk.cosine_cross_entropy(x, w, t, scale=10.0, impl=impl, reduction=reduction).sum()
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(loss, x, create_graph=True)
    loss = nnk.cosine_cross_entropy(x, w, t, scale=10.0, impl=impl, reduction=reduction).sum()
    (gx,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(gx).all() and not gx.requires_grad


def test_autocast_casts_the_operands(impl, device):
    """Under torch.autocast (bf16): float32 x and W, or bf16 features of an
    autocast backbone with the float32 master weight, give the loss of the
    bf16 operands and float32 gradients for float32 leaves."""
    g = torch.Generator().manual_seed(0)
    x32 = torch.randn(9, 16, generator=g).to(device)
    w32 = torch.randn(11, 16, generator=g).to(device)
    t = torch.randint(0, 11, (9,), generator=g).to(device)
    kw = dict(scale=16.0, angular_margin=0.3, impl=impl)
    want = nnk.cosine_cross_entropy(x32.bfloat16(), w32.bfloat16(), t, **kw)
    for x in (x32, x32.bfloat16()):
        x = x.clone().requires_grad_(True)
        w = w32.clone().requires_grad_(True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = nnk.cosine_cross_entropy(x, w, t, **kw)
        loss.backward()
        assert torch.equal(loss, want)
        assert w.grad.dtype == torch.float32 and x.grad.dtype == x.dtype
        assert torch.isfinite(w.grad).all() and torch.isfinite(x.grad).all()


def test_backward_inside_autocast(impl, device):
    """loss.backward() inside the torch.autocast block, as many training loops
    call it, gives the gradients of a backward after the block: the backward
    runs with autocast off, as the forward does (the blockwise backward's
    matmuls were cast to bf16: a scatter dtype error)."""
    g = torch.Generator().manual_seed(0)
    leaves = [torch.randn(9, 16, generator=g), torch.randn(11, 16, generator=g),
              torch.full((11,), 16.0) + torch.rand(11, generator=g), torch.randn(11, generator=g)]
    t = torch.randint(0, 11, (9,), generator=g).to(device)
    kw = dict(angular_margin=0.3, label_smoothing=0.1, z_loss=1e-3, impl=impl)
    grads = []
    for inside in (False, True):
        x, w, s, b = (v.to(device).requires_grad_(True) for v in leaves)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss, lse = nnk.cosine_cross_entropy(x, w, t, scale=s, bias=b, return_lse=True, **kw)
            if inside:
                (loss + lse.sum()).backward()
        if not inside:
            (loss + lse.sum()).backward()
        grads.append([v.grad for v in (x, w, s, b)])
    for outside, inside in zip(*grads):
        assert inside.dtype == outside.dtype == torch.float32
        assert torch.equal(inside, outside)


def test_ignore_index_at_or_above_num_classes(impl, device):
    # A pad label equal to C (or any value outside [0, C)) as ignore_index, as
    # F.cross_entropy allows; the range check used to reject it.
    g = torch.Generator().manual_seed(3)
    c = 10
    x, w = torch.randn(6, 5, generator=g).to(device), torch.randn(c, 5, generator=g).to(device)
    for pad in (c, 1000):
        t = torch.tensor([0, pad, 3, pad, 9, 1], device=device)
        for reduction in ("mean", "none"):
            got = nnk.cosine_cross_entropy(x, w, t, scale=8.0, ignore_index=pad, reduction=reduction, impl=impl)
            want = cosine_cross_entropy_ref(x.double(), w.double(), t, scale=8.0, ignore_index=pad,
                                            reduction=reduction)
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="got 10"):  # but not as a target of another ignore_index
        nnk.cosine_cross_entropy(x, w, torch.tensor([0, c, 3, 4, 9, 1], device=device), impl=impl)


def test_arcface_one_feature_dimension(impl, device):
    # D = 1: every cosine is exactly +-1, where sqrt(1 - cos^2) amplifies any
    # rounding of the cosine itself (Triton's x * (1/|x|) * (1/|w|) gave
    # 1 - 1 ulp: loss error 1e-2 against the reference's 1e-6).
    opts = {"scale": 64.0, "angular_margin": 0.5}
    errs = error_table(_fn(impl), opts, 17, 1, 9, torch.float32, device=device)
    assert_within_bound(errs, atol=1e-5)
    # m = pi puts ArcFace's threshold -cos(m) at exactly 1, where D = 1 puts
    # the target cosines: the branch test must be cos >= threshold, as the
    # reference's theta + m <= pi (a strict > was a loss error of 7.7).
    errs = error_table(_fn(impl), {"scale": 4.0, "angular_margin": math.pi}, 16, 1, 5, torch.float32,
                       device=device)
    assert_within_bound(errs, atol=1e-5)


def _near_their_class(seed):
    """mutate for error_table: each row a few hundredths of a radian from its
    class (x = |x| (w_t / |w_t| + d), d orthogonal to w_t, |d| in [0.015, 0.045])."""
    def mutate(x, w, t):
        g = torch.Generator().manual_seed(seed)
        wt = w[t].double().cpu()
        wt = wt / wt.norm(dim=1, keepdim=True)
        d = torch.randn(wt.shape, generator=g, dtype=torch.float64)
        d -= (d * wt).sum(1, keepdim=True) * wt
        d *= 0.015 * (1 + 2 * torch.rand(len(t), 1, generator=g, dtype=torch.float64)) / d.norm(dim=1, keepdim=True)
        x.copy_((wt + d) * (0.5 + 3 * torch.rand(len(t), 1, generator=g, dtype=torch.float64)))
    return mutate


@pytest.mark.parametrize("margin_grad", ["exact", "detached"])
@pytest.mark.parametrize("d,c", [(3, 16), (59, 257)])
def test_arcface_rows_close_to_their_class(impl, device, margin_grad, d, c):
    # sin(theta) = sqrt(1 - cos^2) of a float32 cosine errs by ~6e-8 / theta^2
    # relative (1e-4 at theta = 0.03), which ArcFace's psi and its derivative
    # (~sin m / sin theta) carry into the loss and the gradients. Every impl
    # takes the target's sin(theta) from float64 sums (target_sine_ref), so
    # its errors on such rows are a fraction of the float32 reference's
    # (before, the same size: summed over the seeds 0.8-1.3x, single seeds up
    # to 3.7x).
    opts = {"scale": 8.0, "angular_margin": 0.5, "margin_grad": margin_grad}
    total = {"impl": {}, "ref": {}}
    for seed in range(4):
        errs = error_table(_fn(impl), opts, 32, d, c, torch.float32, device=device, seed=seed,
                           mutate=_near_their_class(seed))
        for side in total:
            for name, e in errs[side].items():
                total[side][name] = total[side].get(name, 0.0) + e
    # Measured (all impls): loss 0.03-0.12x, exact gradients 0.04-0.08x,
    # detached 0.12-0.18x at D = 3 but 0.53-0.85x at D = 59, where d psi /
    # d cos = 1 and the other logits' rounding is most of the error.
    grad_bound = 1.0 if (margin_grad, d) == ("detached", 59) else 0.25
    for name, bound in (("loss", 0.25), ("x", grad_bound), ("weight", grad_bound)):
        assert total["impl"][name] <= bound * total["ref"][name], (name, total)


@pytest.mark.parametrize("margin", [0.5, 2.0, math.pi])
def test_arcface_branch_decided_on_the_exact_cosine(impl, device, margin):
    # Rows 1e-9 from ArcFace's threshold cos(theta) = -cos m (theta + m = pi),
    # on both sides (at m = pi, where the threshold is cos = 1, on the
    # fallback side only: the other is exactly parallel rows, whose float64
    # cosine itself may round below 1): a float32 cosine (~6e-8 off) takes
    # either branch, and psi jumps between them (by 0.12 at m = 0.5, by 2 at
    # m = pi). Every impl decides on the float64 cosine of target_sine_ref,
    # the float32 reference on its own.
    g = torch.Generator().manual_seed(7)
    n, d, c = 48, 8, 20
    w = torch.randn(c, d, generator=g, dtype=torch.float64)
    t = torch.randint(0, c, (n,), generator=g)
    wn = w / w.norm(dim=1, keepdim=True)
    u = torch.randn(n, d, generator=g, dtype=torch.float64)
    u -= (u * wn[t]).sum(1, keepdim=True) * wn[t]
    u /= u.norm(dim=1, keepdim=True)
    side = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0).double()
    cos = (-math.cos(margin) + 1e-9 * side).clamp(max=1 - 1e-9)
    x = (cos[:, None] * wn[t] + (1 - cos[:, None] ** 2).sqrt() * u) * (1 + torch.rand(n, 1, generator=g))
    x, w = x.float(), w.float()
    kw = dict(scale=4.0, angular_margin=margin, reduction="sum")

    def errors(fn, dev):
        xx, ww = x.to(dev).clone().requires_grad_(), w.to(dev).clone().requires_grad_()
        loss = fn(xx, ww, t.to(dev), **kw)
        got = [loss, *torch.autograd.grad(loss, [xx, ww])]
        return [float((a.detach().double().cpu() - b).abs().max() / b.abs().max()) for a, b in zip(got, truth)]

    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    loss64 = cosine_cross_entropy_ref(x64, w64, t, **kw)
    truth = [loss64.detach(), *torch.autograd.grad(loss64, [x64, w64])]
    ref = errors(cosine_cross_entropy_ref, "cpu")
    got = errors(lambda *a, **k: nnk.cosine_cross_entropy(*a, impl=impl, **k), device)
    assert max(ref) > 1e-3, ref  # the float32 reference's cosine does flip some rows
    assert max(got) < 1e-5, (got, ref)


def test_arcface_gradient_at_the_branch_threshold(impl, device):
    # cos theta exactly at ArcFace's threshold -cos m (m = pi/3: -1/2 in
    # float32, theta + m = pi): the ArcFace branch (cos >= -cos m), whose
    # derivative there is 0, not the fallback's 1. x = (1, 1, 1, 1) against
    # w_t = (-1, 0, 0, 0): a cosine of exactly -1/2, at D > 1 (at D = 1 the
    # normalizations project d psi / d cos out of dx and dW).
    x = torch.ones(3, 4, device=device)
    w = torch.tensor([[-1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0.5], [0.3, -0.2, 0.1, 1.0]], device=device)
    t = torch.zeros(3, dtype=torch.long, device=device)
    kw = dict(scale=4.0, angular_margin=math.pi / 3, margin_grad="exact", reduction="sum")
    got, want = [], []
    for fn, out in ((lambda *a, **k: nnk.cosine_cross_entropy(*a, impl=impl, **k), got),
                    (cosine_cross_entropy_ref, want)):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fn(xg, wg, t, **kw)
        out.extend([loss, *torch.autograd.grad(loss, [xg, wg])])
    for name, a, b in zip(("loss", "dx", "dW"), got, want):
        assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item()), (name, a, b)


def test_norm_product_beyond_float32_and_zero_rows_under_a_tiny_eps(impl, device):
    # The kernels divide the raw dot by max(|x|, eps) max(|w|, eps): formed as
    # a product, that overflowed when |x| |w| > 3.4e38 (all cosines 0; the dot
    # itself stays finite while |<x, w>| < 3.4e38: nearly orthogonal rows
    # here) and underflowed to 0 for zero rows under eps = 1e-30 (0 / 0 = NaN).
    g = torch.Generator().manual_seed(11)
    e = torch.eye(5)
    far = (1e24 * (e[0] + 0.02 * torch.randn(6, 5, generator=g)),
           1e15 * (e[1] + 0.02 * torch.randn(7, 5, generator=g)))
    zero = torch.randn(6, 5, generator=g), torch.randn(7, 5, generator=g)
    zero[0][2].zero_(), zero[1][2].zero_()
    t = torch.tensor([0, 1, 2, 3, 4, 5], device=device)
    for (xx, ww), eps in ((far, 1e-12), (zero, 1e-30)):
        xx, ww = xx.to(device).requires_grad_(), ww.to(device).requires_grad_()
        loss, lse = nnk.cosine_cross_entropy(xx, ww, t, scale=64.0, eps=eps, impl=impl,
                                             reduction="none", return_lse=True)
        x64, w64 = xx.detach().double().requires_grad_(), ww.detach().double().requires_grad_()
        ref, ref_lse = cosine_cross_entropy_ref(x64, w64, t, scale=64.0, eps=eps, reduction="none",
                                                return_lse=True)
        torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-4, atol=1e-4)
        loss.sum().backward()
        ref.sum().backward()
        for got, want in ((xx.grad, x64.grad), (ww.grad, w64.grad)):
            assert torch.isfinite(got).all()
            assert float((got.double() - want).abs().max() / want.abs().max()) < 1e-3


def test_one_class_with_label_smoothing_is_exactly_zero(impl, device):
    # C = 1: every row loss is exactly 0. Grouped as lse - (1 - ls) z_t - ls z
    # the torch and extension paths left an ulp of |z| ~ 1000 behind (3e-5).
    torch.manual_seed(0)
    x, w = torch.randn(6, 4, device=device), torch.randn(1, 4, device=device)
    t = torch.zeros(6, dtype=torch.long, device=device)
    for ls in (0.3, 0.1):
        loss = nnk.cosine_cross_entropy(x, w, t, scale=64.0, bias=torch.tensor([1000.3], device=device),
                                        additive_margin=0.2, label_smoothing=ls, reduction="none", impl=impl)
        assert loss.abs().max() <= 1e-6, loss


def test_one_class_with_label_smoothing_has_zero_gradients(impl, device, bf16_triton):
    # C = 1: p = 1 and dz = g ((1 - ls) - (1 - ls)) = 0 exactly, as in the
    # reference. Formed as g p - g ls - g (1 - ls) (the torch and Triton
    # paths) it left ~1e-7 g, which a zero row's 1 / eps took to 6e5 in its
    # d x (float32) and to inf (float16), where the truth is 0 (a fuzz run).
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 16, generator=gen), torch.randn(1, 16, generator=gen)
    x[:4] = 0.0
    g = torch.randn(8, generator=gen).to(device)
    t = torch.zeros(8, dtype=torch.long, device=device)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        xx = x.to(device, dtype).requires_grad_(True)
        ww = w.to(device, dtype).requires_grad_(True)
        s = torch.tensor(16.0, device=device, requires_grad=True)
        b = torch.zeros(1, device=device, dtype=dtype, requires_grad=True)
        loss = nnk.cosine_cross_entropy(xx, ww, t, scale=s, bias=b, label_smoothing=0.1,
                                        reduction="none", impl=impl)
        grads = torch.autograd.grad((loss * g).sum(), (xx, ww, s, b))
        for name, grad in zip(("x", "weight", "scale", "bias"), grads):
            assert grad.abs().max().item() == 0.0, (dtype, name, grad)


@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_confident_row_losses_do_not_inherit_the_rounding_of_lse(impl, device, ls):
    # Rows near their class at s = 64: losses of 1e-15..1e-5. lse - z_t with
    # lse rounded to float32 erred by half an ulp of |lse| (1.8e-6, 35x the
    # reference's 5e-8); (lse - z_t) + lse_lo errs as log_softmax does.
    g = torch.Generator().manual_seed(0)
    w = torch.randn(50, 16, generator=g)
    t = torch.randint(0, 50, (64,), generator=g)
    x = w[t] + 0.05 * torch.randn(64, 16, generator=g)
    kw = dict(scale=64.0, additive_margin=0.1, label_smoothing=ls, reduction="none")
    truth = cosine_cross_entropy_ref(x.double(), w.double(), t, **kw)
    ref = cosine_cross_entropy_ref(x, w, t, **kw).double()
    got = nnk.cosine_cross_entropy(x.to(device), w.to(device), t.to(device), impl=impl, **kw).double().cpu()
    for mean in (False, True):  # the rows, and the "mean" loss users print
        err, ref_err = ((got - truth).abs(), (ref - truth).abs()) if not mean else \
            ((got.mean() - truth.mean()).abs(), (ref.mean() - truth.mean()).abs())
        assert err.max() <= 2 * ref_err.max() + 1e-7 * truth.abs().max(), (mean, err.max(), ref_err.max())


@pytest.mark.parametrize("shift", [0.0, 2000.0])
def test_probabilities_do_not_inherit_the_rounding_of_lse(impl, device, shift):
    # p = exp(z - lse) with lse rounded to float32 errs by half an ulp of |lse|
    # in every probability: a bias shift of 2000 (which changes no softmax)
    # made the kernels' dx 3.4x the reference's error (s = 64, 7x in seeds
    # sweeps at shift 0). p = exp((z - max) - log sum), as log_softmax, or
    # exp((z - lse) - lse_lo) with the residue of lse's rounding.
    g = torch.Generator().manual_seed(7)
    x, w = torch.randn(64, 16, generator=g), torch.randn(50, 16, generator=g)
    b = torch.randn(50, generator=g) + shift
    t = torch.randint(0, 50, (64,), generator=g)

    def grads(fn, dtype, dev):
        leaves = [v.to(dev, dtype).clone().requires_grad_() for v in (x, w, b)]
        fn(leaves[0], leaves[1], t.to(dev), scale=64.0, bias=leaves[2], reduction="sum").backward()
        return [v.grad.double().cpu() for v in leaves]

    truth = grads(cosine_cross_entropy_ref, torch.float64, "cpu")
    ref = grads(cosine_cross_entropy_ref, torch.float32, "cpu")
    got = grads(lambda *a, **k: nnk.cosine_cross_entropy(*a, **k, impl=impl), torch.float32, device)
    for g_, r, tr in zip(got, ref, truth):
        assert (g_ - tr).abs().max() <= 2 * (r - tr).abs().max() + 1e-7 * tr.abs().max()


def _confident_rows(n, d, c, closeness, seed):
    """Rows near their class's weight (x = (1 - a) noise + a w_t): confident
    softmax rows, whose losses and target d logits are tiny differences."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c, d, generator=g, dtype=torch.float64)
    t = torch.randint(0, c, (n,), generator=g)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * (1 - closeness) + closeness * w[t]
    return x.float(), w.float(), t


@pytest.mark.parametrize("scale,c", [(16.0, 200), (16.0, 1031), (64.0, 1031)])
def test_confident_row_losses_over_many_classes(impl, device, gpu_exp, scale, c):
    # A running sum that held the max's exp(0) = 1 rounded each of the C
    # small exps to an ulp of 1: the extension's row losses of ~1e-4 erred by
    # up to 1.3% (4.5-7x the reference) at C = 200. The max's 1 now stays out
    # of the sum (math.h lse_merge), and lse = max + log1p(rest).
    x, w, t = _confident_rows(97, 59, c, 0.9, seed=1)
    kw = dict(scale=scale, reduction="none")
    truth = cosine_cross_entropy_ref(x.double(), w.double(), t, **kw)
    ref = cosine_cross_entropy_ref(x, w, t, **kw).double()
    got = nnk.cosine_cross_entropy(x.to(device), w.to(device), t.to(device), impl=impl, **kw).double().cpu()
    assert (got - truth).abs().max() <= 2 * (ref - truth).abs().max() + 1e-7 * truth.abs().max()


@pytest.mark.parametrize("z_loss", [1e-5, 1e-4])
def test_z_loss_gradients_of_confident_rows(impl, device, gpu_exp, z_loss):
    # d z_t = g (p_t - 1) + 2 zl lse g p_t: with the z-loss term folded into
    # p (1 + 2 zl lse) it was rounded against 1, and every impl's d x was
    # 30-60x the reference's error at zl = 1e-5, s = 64.
    x, w, t = _confident_rows(97, 59, 1031, 0.9, seed=2)

    def grads(fn, dtype, dev):
        leaves = [v.to(dev, dtype).clone().requires_grad_() for v in (x, w)]
        fn(leaves[0], leaves[1], t.to(dev), scale=64.0, z_loss=z_loss, reduction="sum").backward()
        return [v.grad.double().cpu() for v in leaves]

    truth = grads(cosine_cross_entropy_ref, torch.float64, "cpu")
    ref = grads(cosine_cross_entropy_ref, torch.float32, "cpu")
    got = grads(lambda *a, **k: nnk.cosine_cross_entropy(*a, **k, impl=impl), torch.float32, device)
    for name, g_, r, tr in zip(("dx", "dW"), got, ref, truth):
        err, ref_err = (g_ - tr).abs().max().item(), (r - tr).abs().max().item()
        assert err <= 2 * ref_err + 1e-7 * tr.abs().max().item(), (name, err, ref_err)


def test_tiny_row_losses_keep_their_relative_precision(impl, device, gpu_exp):
    # Row losses down to ~1e-11 (median ~4e-7; s = 64, rows near their
    # class): lse = max + log1p(rest) with the max's own exp(0) kept out of
    # the sum (math.h lse_merge, nnk/impl/lse.py) leaves them a relative error
    # of ~1e-5 at most; a sum 1 + rest rounds rest to an ulp of 1 (the
    # float32 reference's, and before this the torch and Triton paths': up to
    # 100% here).
    g = torch.Generator().manual_seed(0)
    w = torch.randn(200, 32, generator=g)
    t = torch.randint(0, 200, (64,), generator=g)
    x = w[t] + torch.randn(64, 32, generator=g)
    kw = dict(scale=64.0, reduction="none")
    truth = cosine_cross_entropy_ref(x.double(), w.double(), t, **kw)
    got = nnk.cosine_cross_entropy(x.to(device), w.to(device), t.to(device), impl=impl, **kw).double().cpu()
    assert truth.median() < 1e-6
    rel = (got - truth).abs() / truth
    assert rel.max() < 1e-4, rel.max()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter computing on NaN
@pytest.mark.parametrize("where", ["weight", "bias"])
def test_nan_classes_make_every_row_nan(impl, device, where):
    # NaN in the first 256 classes: a whole leading class tile of NaN logits
    # (the interpreter's BLOCK_C). tl.max drops NaN, and a partial (max, rest)
    # that reset rest to 0 while its max was still -inf hid them: a finite
    # loss and lse over NaN gradients. As in PyTorch, every row is NaN.
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(4, 8, generator=g), torch.randn(600, 8, generator=g)
    b = torch.zeros(600)
    (w if where == "weight" else b)[:256] = float("nan")
    t = torch.tensor([300, 400, 500, 599])
    dev = lambda v: v.to(device)  # noqa: E731
    loss, lse = nnk.cosine_cross_entropy(dev(x), dev(w), dev(t), bias=dev(b), scale=8.0, reduction="none",
                                         return_lse=True, impl=impl)
    ref_loss, ref_lse = cosine_cross_entropy_ref(x, w, t, bias=b, scale=8.0, reduction="none", return_lse=True)
    assert ref_loss.isnan().all() and ref_lse.isnan().all()
    assert loss.isnan().all() and lse.isnan().all(), (loss, lse)
