"""Neural-collapse statistics and metrics (NC1-NC4): against independent float64
formulas (tests/nc_formulas.py, scipy pinv of the D x D Sigma_B), streaming
against two passes, batched against separate calls, the Triton kernels (CPU
interpreter or --device cuda) against the reference, bad input, the CLI and
the DataLoader helper."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import nnk
from nnk.nc import collect_nc_metrics
from nnk.nc.cli import main as cli_main
from nnk.nc.stats import recenter_gram
from nnk.reference import nc_centered_gram_ref, nc_class_sums_ref

sys.path.insert(0, os.path.dirname(__file__))
import nc_formulas as F  # noqa: E402

METRIC_NAMES = ("nc1", "nc2_equinorm", "nc2_equiangular", "nc2", "nc3", "nc3_duality", "nc4")


def clustered(n, d, k, *, spread=1.0, seed=0, probs=None, dtype=torch.float32):
    """Features around k random class means; ``probs`` skews the class sizes."""
    g = torch.Generator().manual_seed(seed)
    if probs is None:
        y = torch.randint(0, k, (n,), generator=g)
    else:
        y = torch.multinomial(torch.tensor(probs, dtype=torch.float64), n, replacement=True, generator=g)
    mu = 2.0 * torch.randn(k, d, generator=g, dtype=torch.float64)
    h = mu[y] + spread * torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(k, d, generator=g, dtype=torch.float64)
    b = torch.randn(k, generator=g, dtype=torch.float64)
    return h.to(dtype), y, w.to(dtype), b.to(dtype)


def assert_metrics_close(m: nnk.NCMetrics, ref: dict, rtol: float, atol: float = 1e-9):
    for name in METRIC_NAMES:
        if name in ref:
            got = getattr(m, name)
            if ref[name] is None:
                assert got is None, name
                continue
            assert got is not None, name
            assert abs(got - ref[name]) <= atol + rtol * abs(ref[name]), (name, got, ref[name])


# --- metrics against the float64 formulas -----------------------------------

CASES = {
    # K' < D: nc1 in the K'-dimensional class space
    "random": dict(n=300, d=24, k=6),
    # K' >= D: nc1 in feature space
    "many_classes": dict(n=400, d=8, k=12),
    # skewed class sizes and a class without samples (k = 7, last prob 0)
    "imbalanced": dict(n=350, d=16, k=7, probs=[0.4, 0.25, 0.15, 0.1, 0.07, 0.03, 0.0]),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_metrics_match_float64_formulas(case, dtype):
    kw = CASES[case]
    h, y, w, b = clustered(**kw, dtype=dtype)
    ref = F.metrics64(h.double().numpy(), y.numpy(), kw["k"], w.double().numpy(), b.double().numpy())
    m = nnk.nc_metrics(h, y, w, b, impl="torch")
    assert_metrics_close(m, ref, rtol=1e-9 if dtype == torch.float64 else 2e-5)
    counts = np.bincount(y.numpy(), minlength=kw["k"])
    assert m.num_classes == kw["k"] and m.n == kw["n"]
    assert m.missing_classes == tuple(np.flatnonzero(counts == 0).tolist())
    assert m.num_present == int((counts > 0).sum())
    if case == "imbalanced":
        assert m.missing_classes == (6,)


def test_stats_match_float64_formulas():
    kw = CASES["imbalanced"]
    h, y, _, _ = clustered(**kw)
    s = nnk.nc_stats(h, y, kw["k"])
    ref = F.stats64(h.double().numpy(), y.numpy(), kw["k"])
    assert torch.equal(s.counts, torch.from_numpy(ref["counts"]))
    assert s.n == kw["n"] and s.missing_classes == (6,)
    for name in ("means", "global_mean", "sigma_w", "sigma_b"):
        np.testing.assert_allclose(getattr(s, name).numpy(), ref[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_metrics_without_weight_have_no_classifier_metrics():
    h, y, _, _ = clustered(200, 12, 5)
    m = nnk.nc_metrics(h, y)
    assert m.num_classes == 5
    assert (m.nc2, m.nc3, m.nc3_duality, m.nc4) == (None, None, None, None)
    ref = F.metrics64(h.double().numpy(), y.numpy(), 5)
    assert_metrics_close(m, ref, rtol=2e-5)


def test_metrics_of_a_perfect_simplex_etf_are_zero():
    k, d = 5, 8
    m_etf = torch.zeros(k, d, dtype=torch.float64)
    m_etf[:, :k] = torch.eye(k) - 1.0 / k
    y = torch.arange(k).repeat(4)
    m = nnk.nc_metrics(m_etf[y] + 3.0, y, m_etf)  # collapsed, ETF means, W = M~ (duality)
    for name in METRIC_NAMES:
        assert abs(getattr(m, name)) < 1e-12, name


# --- streaming and collapse ----------------------------------------------------


def stream(h, y, k, batch_size, tracker=None, **kw):
    t = tracker if tracker is not None else nnk.NCTracker(k, h.shape[-1], **kw)
    for i in range(0, h.shape[-2], batch_size):
        t.update(h[..., i:i + batch_size, :], y[i:i + batch_size])
    return t


def assert_stats_close(a: nnk.NCStats, b: nnk.NCStats, rtol: float, atol: float = 0.0):
    assert torch.equal(a.counts, b.counts) and a.n == b.n
    for name in ("means", "global_mean", "sigma_w", "sigma_b"):
        x, z = getattr(a, name), getattr(b, name)
        scale = z.abs().max()
        assert (x - z).abs().max() <= atol + rtol * scale, (name, float((x - z).abs().max()), float(scale))


def test_streaming_equals_two_pass():
    # Classes 5 and 6 appear only in the last batches; batches of uneven size.
    h, y, _, _ = clustered(500, 20, 7, probs=[0.3, 0.2, 0.2, 0.15, 0.15, 0.0, 0.0])
    y[-30:-10], y[-10:] = 5, 6
    two = nnk.nc_stats(h, y, 7)
    assert_stats_close(stream(h, y, 7, 37).compute(), two, rtol=1e-5)
    assert_metrics_close(
        stream(h, y, 7, 64).metrics(), nnk.nc_metrics_from_stats(two).as_dict(), rtol=1e-5
    )


def test_collapsed_streaming_matches_two_pass_and_raw_moments_do_not():
    """Within-class spread 1e-4 of the class-mean distance, float32 features:
    the shifted one-pass statistics keep their digits, the raw-moment formula
    ``(H^T H - sum n mu mu^T) / N`` in float32 (the kernels' accumulation
    dtype) has none left."""
    n, d, k = 2000, 32, 5
    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, k, (n,), generator=g)
    mu = torch.randn(k, d, generator=g, dtype=torch.float64)
    mean_dist = torch.pdist(mu).mean()
    h = (mu[y] + 1e-4 * mean_dist / d**0.5 * torch.randn(n, d, generator=g, dtype=torch.float64)).float()
    truth = torch.from_numpy(F.stats64(h.double().numpy(), y.numpy(), k)["sigma_w"])

    def rel_err(sw):
        return float((sw.double() - truth).abs().max() / truth.abs().max())

    two = nnk.nc_stats(h, y, k)
    one = stream(h, y, k, 64).compute()
    counts = torch.bincount(y, minlength=k).float()
    means = torch.zeros(k, d).index_add_(0, y, h) / counts[:, None]
    raw = (h.T @ h - (means.T * counts) @ means) / n
    assert rel_err(two.sigma_w) < 1e-4
    assert rel_err(one.sigma_w) < 1e-3
    assert rel_err(raw) > 1.0  # catastrophic cancellation: not one correct digit
    ref_nc1 = F.metrics64(h.double().numpy(), y.numpy(), k)["nc1"]
    for s in (two, one):
        assert abs(nnk.nc_metrics_from_stats(s).nc1 - ref_nc1) <= 2e-3 * ref_nc1


@pytest.mark.parametrize("impl", ["torch", "triton", "cuda"])
def test_collapsed_many_samples_per_class(device, impl):
    """8000 samples per class, class means of norm ~5, spread 1e-4 of the
    mean distance, float32 features: with float32 class sums (~n u |mu| off)
    the centering left Sigma_W wrong by 70% (n = 20000 in all); float64 sums
    keep it to float32 rounding of the Gram."""
    if impl == "cuda" and not nnk.ops.has_op("nc_class_sums", device.type):
        pytest.skip(f"nnk._C has no NC kernels for {device.type}")
    n, d, k = 40_000, 8, 5
    g = torch.Generator().manual_seed(4)
    y = torch.arange(n) % k
    mu = 5.0 + torch.randn(k, d, generator=g, dtype=torch.float64)
    spread = 1e-4 * torch.pdist(mu).mean() / d**0.5
    h = (mu[y] + spread * torch.randn(n, d, generator=g, dtype=torch.float64)).float()
    truth = torch.from_numpy(F.stats64(h.double().numpy(), y.numpy(), k)["sigma_w"])
    for sw in (nnk.nc_stats(h.to(device), y.to(device), k, impl=impl).sigma_w,
               stream(h.to(device), y.to(device), k, 8192, device=device, impl=impl).compute().sigma_w):
        assert float((sw.cpu() - truth).abs().max() / truth.abs().max()) < 1e-3


@pytest.mark.parametrize("rel", [1e-12, 1e-8])
def test_float64_scatter_far_below_the_means_rounding(rel):
    # float64 features with a scatter sigma = rel |mu|: mu - c taken from the
    # raw class sums kept their rounding (~u |mu|) in Sigma_W: 4.6e-4 relative
    # (tracker, batches of 8: first order) and 2.1e-6 (two passes: second) at 1e-12.
    # The truth: the same centering in long double.
    n, d, k = 4000, 6, 4
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % k
    h = torch.randn(k, d, generator=g, dtype=torch.float64)[y] + rel * torch.randn(n, d, generator=g,
                                                                                    dtype=torch.float64)
    hl, yl = h.numpy().astype(np.longdouble), y.numpy()
    z = hl - np.stack([hl[yl == c].mean(0) for c in range(k)])[yl]
    truth = z.T @ z / n
    tracker = nnk.NCTracker(k, d, impl="torch")
    for i in range(0, n, 8):
        tracker.update(h[i:i + 8], y[i:i + 8])
    for got in (tracker.compute().sigma_w, nnk.nc_stats(h, y, k, impl="torch").sigma_w):
        assert float(np.abs(got.numpy() - truth).max() / np.abs(truth).max()) < 1e-13


def test_recenter_gram_is_exact():
    h, y, _, _ = clustered(120, 9, 4, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    c_old = torch.randn(1, 4, 9, generator=g, dtype=torch.float64)
    c_new = torch.randn(1, 4, 9, generator=g, dtype=torch.float64)
    counts, sums = nc_class_sums_ref(h[None], y, 4)
    got = recenter_gram(nc_centered_gram_ref(h[None], y, c_old), sums - counts[:, None] * c_old, counts, c_old,
                        c_new)
    want = nc_centered_gram_ref(h[None], y, c_new)
    assert (got - want).abs().max() <= 1e-12 * want.abs().max()


# --- batched features -------------------------------------------------------------


def test_batched_equals_separate_calls():
    b, n, d, k = 3, 150, 10, 5
    h, y, w, bias = clustered(n, d, k)
    hb = torch.stack([h, 2.0 * h + 1.0, h.flip(1)])
    wb = torch.stack([w, -w, w.flip(1)])
    biasb = torch.stack([bias, bias, -bias])
    sb = nnk.nc_stats(hb, y, k)
    assert sb.batch_size == b
    mb = nnk.nc_metrics(hb, y, wb, biasb)
    tb = stream(hb, y, k, 40, batch=b)
    for i in range(b):
        single = nnk.nc_stats(hb[i], y, k)
        assert_stats_close(sb[i], single, rtol=1e-6)
        assert_stats_close(tb.compute()[i], single, rtol=1e-5)
        assert_metrics_close(mb[i], nnk.nc_metrics(hb[i], y, wb[i], biasb[i]).as_dict(), rtol=1e-6)
    shared = nnk.nc_metrics(hb, y, w)  # one (K, D) classifier for every feature set
    assert_metrics_close(shared[2], nnk.nc_metrics(hb[2], y, w).as_dict(), rtol=1e-6)
    # Without batch=: B is taken from the first non-empty (B, N, D) batch.
    inferred = stream(hb, y, k, 40)
    assert inferred.batch == b
    for i in range(b):
        assert_stats_close(inferred.compute()[i], tb.compute()[i], rtol=0)
    with pytest.raises(ValueError, match=r"\(3, N, D\)"):
        inferred.update(h, y)
    # B is fixed by a valid non-empty batch only: an empty one, or one whose
    # labels do not match, leaves the tracker open.
    open_ = nnk.NCTracker(k, d).update(hb[:, :0], y[:0])
    with pytest.raises(ValueError, match="labels must have shape"):
        open_.update(hb[:, :40], y[:80])
    assert open_.batch is None
    if nnk.ops.has_op("nc_class_sums", "cpu"):  # the extension's kernels (an install may leave them out)
        with pytest.raises(TypeError, match="float64"):  # refused by the backend, after the checks
            nnk.NCTracker(k, d, impl="cuda").update(hb[:, :40].double(), y[:40])
        refused = nnk.NCTracker(k, d, impl="cuda")
        with pytest.raises(TypeError):
            refused.update(hb[:, :40].double(), y[:40])
        assert refused.batch is None and refused.update(h[:40], y[:40]).n == 40
    assert_stats_close(stream(h, y, k, 40, tracker=open_).compute(), nnk.nc_stats(h, y, k), rtol=1e-5)


# --- Triton kernels against the reference --------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(97, 59, 7, None), (64, 130, 3, 2)], ids=["odd", "batched_3_tiles"])
def test_triton_kernels_match_reference(device, dtype, shape):
    from nnk.nc.triton_kernels import nc_centered_gram_triton, nc_class_sums_triton

    n, d, k, b = shape
    g = torch.Generator().manual_seed(0)
    lead = () if b is None else (b,)
    h64 = 3.0 + torch.randn(*lead, n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, k - 1, (n,), generator=g)  # class k - 1 stays empty
    h = h64.to(dtype).to(device)
    y_dev = y.to(device=device, dtype=torch.int32)
    shifts = (3.0 + torch.randn(*lead, k, d, generator=g)).to(device)
    exact = h.double().cpu()

    counts, sums = nc_class_sums_triton(h, y_dev, k)
    r_counts, r_sums = nc_class_sums_ref(h, y_dev, k)
    truth = nc_class_sums_ref(exact, y, k)[1]
    assert torch.equal(counts.cpu(), r_counts.cpu()) and counts[k - 1] == 0
    assert sums.dtype == torch.float64 and sums.shape == r_sums.shape
    ref_err = (r_sums.double().cpu() - truth).abs().max()
    assert (sums.double().cpu() - truth).abs().max() <= 2 * ref_err + 1e-5 * truth.abs().max()

    truth = nc_centered_gram_ref(exact, y, shifts.double().cpu())
    ref = nc_centered_gram_ref(h, y_dev, shifts)
    ref_err = (ref.double().cpu() - truth).abs().max()
    for splits in (None, 3):
        gram = nc_centered_gram_triton(h, y_dev, shifts, splits=splits)
        assert gram.dtype == torch.float32 and gram.shape == ref.shape
        err = (gram.double().cpu() - truth).abs().max()
        assert err <= 2 * ref_err + 1e-6 * truth.abs().max(), (splits, float(err), float(ref_err))


@pytest.mark.parametrize("gram", ["reference", "op", "triton"])
def test_gram_error_does_not_grow_with_n(gram, device):
    # One float32 product (or float32 running sum) over all N rows was off by
    # 6e-5 relative at N = 200k, D = 8 (reference and CPU op) and the Triton
    # kernel's sum over a row split by 1.0e-6 at N = 50k: now every path sums
    # float32 products of row chunks in float64 (measured 4.8e-8 for Triton
    # under the interpreter). Triton with one split: every row in one program.
    from nnk.nc.triton_kernels import nc_centered_gram_triton

    if gram == "op" and not nnk.ops.has_op("nc_centered_gram", device.type):
        pytest.skip(f"the extension nnk._C is not built with the NC ops for {device.type}")
    n = 50_000 if gram == "triton" and device.type == "cpu" else 200_000  # the interpreter: 3 s
    fn = {"reference": nc_centered_gram_ref, "op": nnk.ops.nc_centered_gram,
          "triton": functools.partial(nc_centered_gram_triton, splits=1)}[gram]
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(n, 8, generator=g, dtype=torch.float64) * 2 + 1).float()
    y = torch.randint(0, 10, (n,), generator=g)
    shifts = (nc_class_sums_ref(h, y, 10)[1] / torch.bincount(y, minlength=10)[:, None]).float()
    truth = nc_centered_gram_ref(h.double(), y, shifts.double())
    got = fn(h.to(device), y.to(device), shifts.to(device))
    assert got.dtype == torch.float32
    assert (got.double().cpu() - truth).abs().max().item() / truth.abs().max().item() < 3e-7


def test_triton_bf16_subnormal_features(device, bf16_triton):
    # bf16 features below 2^-126: their class sums are exact in float64, as the
    # reference's. (The bare interpreter widened bf16 subnormals to 0: means
    # 44% off and nc1 0.35 for 0.033; under bf16_triton it widens as a GPU.)
    pytest.importorskip("triton")
    h, y, w, _ = clustered(200, 8, 5)
    h = (h * 2.0**-132).bfloat16().to(device)
    y = y.to(device)
    assert bool((h.float().abs() < 2.0**-126).all())
    for name, v in nnk.nc_metrics(h, y, w.to(device), impl="torch").as_dict().items():
        got = getattr(nnk.nc_metrics(h, y, w.to(device), impl="triton"), name)
        assert got == pytest.approx(v, rel=1e-5, abs=1e-9), name
    tri, ref = nnk.nc_stats(h, y, 5, impl="triton"), nnk.nc_stats(h, y, 5, impl="torch")
    torch.testing.assert_close(tri.means, ref.means, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_gram_of_16_bit_features_is_as_exact_as_the_reference(device, dtype):
    # The kernel multiplied the centered values rounded back to 16 bits:
    # float16 Sigma_W 7e-5 relative off where the reference (fp32 centering and
    # products) is 4e-7 off; features near float16's subnormals 4e-4.
    from nnk.nc.triton_kernels import nc_centered_gram_triton

    g = torch.Generator().manual_seed(6)
    y = torch.arange(200) % 4
    for magnitude in (1.0, 1e-5):
        h = ((3 * torch.randn(4, 16, generator=g)[y] + torch.randn(200, 16, generator=g)) * magnitude).to(dtype)
        shifts = (nc_class_sums_ref(h, y, 4)[1] / 50).float()
        truth = nc_centered_gram_ref(h.double(), y, shifts.double())
        ref_err = (nc_centered_gram_ref(h, y, shifts).double() - truth).abs().max()
        gram = nc_centered_gram_triton(h.to(device), y.to(device), shifts.to(device)).double().cpu()
        assert (gram - truth).abs().max() <= 2 * ref_err + 1e-7 * truth.abs().max()


def test_triton_gram_float16_centered_values_beyond_65504(device):
    # |h - c| up to ~1e5: float16 features (|h| < 65504) centered on shifts of
    # the opposite sign, beyond float16's range: formed and multiplied in fp32.
    from nnk.nc.triton_kernels import nc_centered_gram_triton

    g = torch.Generator().manual_seed(4)
    n, d = 40, 24
    y = torch.arange(n) % 2
    sign = (1 - 2 * y).double()[:, None]
    h = (sign * (40000 + 5000 * torch.rand(n, d, generator=g, dtype=torch.float64))).half()
    shifts = torch.stack([torch.full((d,), -45000.0), torch.full((d,), 45000.0)])  # the other class's side
    truth = nc_centered_gram_ref(h.double(), y, shifts.double())
    gram = nc_centered_gram_triton(h.to(device), y.to(device), shifts.to(device)).double().cpu()
    assert torch.isfinite(gram).all()
    ref_err = (nc_centered_gram_ref(h, y, shifts).double() - truth).abs().max()
    assert (gram - truth).abs().max() <= 2 * ref_err + 1e-7 * truth.abs().max()


def test_triton_kernels_take_strided_features_and_shared_shifts(device):
    from nnk.nc.triton_kernels import nc_centered_gram_triton, nc_class_sums_triton

    g = torch.Generator().manual_seed(2)
    base = torch.randn(2, 50, 70, generator=g).to(device)
    h = base.transpose(1, 2)[:, ::2, :]  # (2, 35, 50), non-contiguous
    y = torch.randint(0, 4, (70,), generator=g).to(device)[::2]  # strided labels too
    shifts = torch.randn(4, 50, generator=g).to(device)  # (K, D) shared by the batch
    for got, want in ((nc_class_sums_triton(h, y, 4)[1], nc_class_sums_ref(h, y, 4)[1]),
                      (nc_centered_gram_triton(h, y, shifts), nc_centered_gram_ref(h, y, shifts))):
        assert got.shape == want.shape
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_triton_gram_takes_strided_shifts(device):
    # (K, D) shifts with a column stride: the kernel dropped stride_cd
    # unseen (a mutation run), every other test passing contiguous ones.
    from nnk.nc.triton_kernels import nc_centered_gram_triton

    g = torch.Generator().manual_seed(0)
    h = torch.randn(50, 12, generator=g)
    y = torch.randint(0, 4, (50,), generator=g)
    shifts = torch.randn(12, 4, generator=g).T
    assert not shifts.is_contiguous()
    got = nc_centered_gram_triton(h.to(device), y.to(device), shifts.to(device)).cpu()
    torch.testing.assert_close(got, nc_centered_gram_ref(h, y, shifts).float(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("impl", ["triton", "cuda"])
def test_kernel_impls_equal_torch_impl(device, impl):
    """Triton (the interpreter on CPU) and the extension's ops (its CPU kernels
    on CPU) through the whole API: stats, streaming, metrics."""
    if impl == "cuda" and not nnk.ops.has_op("nc_class_sums", device.type):
        pytest.skip(f"nnk._C has no NC kernels for {device.type}")
    h, y, w, b = clustered(160, 40, 6, probs=[0.3, 0.3, 0.2, 0.1, 0.1, 0.0])
    h, y, w, b = (t.to(device) for t in (h, y, w, b))
    assert_stats_close(nnk.nc_stats(h, y, 6, impl=impl), nnk.nc_stats(h, y, 6, impl="torch"), rtol=1e-5)
    assert_stats_close(
        stream(h, y, 6, 50, device=device, impl=impl).compute(),
        nnk.nc_stats(h, y, 6, impl="torch"), rtol=1e-5,
    )
    m_t, m_r = nnk.nc_metrics(h, y, w, b, impl=impl), nnk.nc_metrics(h, y, w, b, impl="torch")
    assert_metrics_close(m_t, m_r.as_dict(), rtol=1e-4)


# --- backends ---------------------------------------------------------------------------


def test_auto_impl_falls_back_without_the_extension_ops(device):
    from nnk.nc._backend import resolve

    cpu = torch.device("cpu")
    if os.environ.get("NNK_IMPL") is None:
        assert resolve("auto", cpu, torch.float32) == "torch"
    assert resolve("torch", cpu, torch.float64) == "torch"
    # On the test device: on CPU tensors triton needs the interpreter, which
    # --device cuda leaves off (a ValueError before the dtype is looked at).
    with pytest.raises(TypeError, match="features"):
        resolve("triton", device, torch.float64)
    with pytest.raises(ValueError, match="impl"):
        resolve("fast", cpu, torch.float32)
    if not nnk.ops.has_op("nc_class_sums", "cpu"):
        with pytest.raises(ValueError, match="impl='cuda'"):
            nnk.nc_stats(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), 2, impl="cuda")


def test_import_nnk_does_not_import_triton():
    code = "import sys, nnk; nnk.NCTracker(3, 4); assert 'triton' not in sys.modules, 'triton imported'"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


# --- bad input and degenerate cases ------------------------------------------------


def _bad_calls():
    h, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    nan = h.clone()
    nan[3, 2] = float("nan")
    inf = h.clone()
    inf[0, 0] = float("inf")
    return [
        ("labels out of range", lambda: nnk.nc_stats(h, torch.full((10,), 3), 3), ValueError, "labels must be in"),
        ("negative label", lambda: nnk.nc_stats(h, -torch.ones(10, dtype=torch.long), 3), ValueError, "labels"),
        ("labels shape", lambda: nnk.nc_stats(h, y[:9], 3), ValueError, "labels must have shape"),
        ("negative label, K from the labels", lambda: nnk.nc_metrics(h, -torch.ones(10, dtype=torch.long)), ValueError,
         r"labels must be >= 0 \(num_classes, neither given nor taken from a weight, is labels.max\(\) \+ 1\), "
         "got -1"),
        ("labels float", lambda: nnk.nc_stats(h, y.float(), 3), TypeError, "labels"),
        ("features 1-D", lambda: nnk.nc_stats(h[0], y, 3), ValueError, "features must be"),
        ("features int", lambda: nnk.nc_stats(y[:, None], y, 3), TypeError, "features"),
        ("features NaN", lambda: nnk.nc_stats(nan, y, 3), ValueError, "features contain NaN"),
        ("features inf", lambda: nnk.nc_metrics(inf, y), ValueError, "features contain NaN"),
        ("features empty", lambda: nnk.nc_stats(h[:0], y[:0], 3), ValueError, "at least one row"),
        ("features not tensor", lambda: nnk.nc_stats(h.numpy(), y, 3), TypeError, "features"),
        ("num_classes 0", lambda: nnk.nc_stats(h, y, 0), ValueError, "num_classes"),
        ("num_classes float", lambda: nnk.nc_stats(h, y, 3.0), TypeError, "num_classes"),
        ("weight shape", lambda: nnk.nc_metrics(h, y, torch.randn(3, 5)), ValueError, "weight must have shape"),
        ("weight vs K", lambda: nnk.nc_metrics(h, y, torch.randn(4, 4), num_classes=3), ValueError, "weight"),
        ("bias shape", lambda: nnk.nc_metrics(h, y, torch.randn(3, 4), torch.randn(4)), ValueError, "bias"),
        ("bias no weight", lambda: nnk.nc_metrics(h, y, None, torch.randn(3)), ValueError, "bias"),
        ("tracker dim", lambda: nnk.NCTracker(3, 5).update(h, y), ValueError, "D=5"),
        ("tracker batch", lambda: nnk.NCTracker(3, 4, batch=2).update(h, y), ValueError, r"\(2, N, D\)"),
        ("tracker empty", lambda: nnk.NCTracker(3, 4).compute(), ValueError, "no samples"),
        ("stats type", lambda: nnk.nc_metrics_from_stats({"counts": 1}), TypeError, "stats"),
        ("bias NaN", lambda: nnk.nc_metrics(h, y, torch.randn(3, 4), torch.tensor([0.0, float("nan"), 0.0])),
         ValueError, "bias contains NaN"),
        ("no feature sets", lambda: nnk.nc_stats(torch.randn(0, 10, 4), y, 3), ValueError, "B >= 1"),
        ("float64 overflow", lambda: nnk.nc_stats(h.double() * 1e160, y, 3, impl="torch"), ValueError, "overflowed"),
        ("features meta", lambda: nnk.nc_stats(h.to("meta"), y.to("meta"), 3), ValueError, "meta tensor"),
        ("tracker meta", lambda: nnk.NCTracker(3, 4, device="meta").update(h.to("meta"), y.to("meta")),
         ValueError, "meta tensor"),
    ]


@pytest.mark.parametrize("name,call,exc,match", _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_bad_input_raises_clear_errors(name, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("impl", ["torch", "triton", "cuda"])
def test_metrics_do_not_depend_on_the_features_magnitude(device, impl):
    # float32 squares leave float32's range for |h| below ~1e-19 (1e-25 gave
    # nc1 = -0.0, "perfect collapse") or above ~1e19 (a ValueError): the Gram
    # is taken of features scaled by a power of two. NC1-NC3 are scale-invariant.
    if impl == "cuda" and not nnk.ops.has_op("nc_centered_gram", device.type):
        pytest.skip(f"nnk._C has no NC kernels for {device.type}")
    h, y, w, b = (t.to(device) for t in clustered(120, 6, 5))
    want = nnk.nc_metrics(h.double(), y, w.double(), impl="torch").as_dict()
    for mag in (1e-25, 1e-35, 1e25, 3e37):
        got = nnk.nc_metrics(h.float() * mag, y, w, impl=impl)
        tracker = nnk.NCTracker(5, 6, device, impl=impl)
        tracker.update(h[:60].float() * mag, y[:60]).update(h[60:].float() * mag, y[60:])
        assert_metrics_close(got, want, rtol=1e-4)
        assert_metrics_close(tracker.metrics(w), {k: v for k, v in want.items() if k != "nc4"}, rtol=1e-4)


@pytest.mark.parametrize("impl", ["torch", "triton", "cuda"])
def test_batched_sets_of_different_magnitudes(device, impl):
    # One exponent for all sets scaled the small set of (1e20, 1e-8) into
    # float32's subnormals: its nc1 came out -4.7e-16 ("perfect collapse").
    if impl == "cuda" and not nnk.ops.has_op("nc_centered_gram", device.type):
        pytest.skip(f"nnk._C has no NC kernels for {device.type}")
    h, y, w, _ = (t.to(device) for t in clustered(120, 6, 5))
    want = nnk.nc_metrics(h.double(), y, w.double(), impl="torch").as_dict()
    for big, small in ((1e20, 1e-8), (1e15, 1e-5)):
        sets = torch.stack([h.float() * big, h.float() * small])
        for m in nnk.nc_metrics(sets, y, w, impl=impl):
            assert_metrics_close(m, want, rtol=1e-4)


@pytest.mark.parametrize("impl", ["torch", "triton", "cuda"])
def test_autocast_does_not_lower_the_statistics(device, impl):
    # NC metrics get computed inside training loops under autocast. There the
    # torch path's Gram ran in bf16 (Sigma_W 2.4e-3 relative off) and NC4's
    # logits on every impl: 1681 mismatches for 1428 on these near-tied logits.
    if impl == "cuda" and not nnk.ops.has_op("nc_centered_gram", device.type):
        pytest.skip(f"nnk._C has no NC kernels for {device.type}")
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 2, (2000,), generator=g)
    mu = torch.randn(2, 16, generator=g, dtype=torch.float64)
    h = (mu[y] + 0.3 * torch.randn(2000, 16, generator=g, dtype=torch.float64)).float()
    v, u = torch.randn(16, generator=g), torch.randn(16, generator=g)
    w = torch.stack([v, v + 0.01 * u])  # logits ~0.3% apart
    h, y, w = h.to(device), y.to(device), w.to(device)

    def run():
        tracker = nnk.NCTracker(2, 16, device, impl=impl).update(h[:1000], y[:1000]).update(h[1000:], y[1000:])
        tracker.begin_nc4(w).update_nc4(h)
        return (nnk.nc_stats(h, y, 2, impl=impl).sigma_w, nnk.nc_metrics(h, y, w, impl=impl),
                tracker.compute().sigma_w, tracker.metrics(w))

    want = run()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        got = run()
    for a, b in ((got[0], want[0]), (got[2], want[2])):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    for a, b in ((got[1], want[1]), (got[3], want[3])):
        assert_metrics_close(a, b.as_dict(), rtol=1e-12, atol=0)


def test_nc4_logits_of_huge_features():
    # h @ W^T overflowed float32 for features of 3e37 (every entry finite):
    # argmax among infs gave nc4 = 0.77 where float64 gives 0.99.
    h, y, w, b = clustered(200, 64, 10)
    want = nnk.nc_metrics(h.double() * 3e37, y, w.double(), b.double()).nc4
    assert nnk.nc_metrics(h.float() * 3e37, y, w, b).nc4 == want


def test_nc4_scales_each_row_on_its_own():
    # One exponent per block of rows underflowed the ordinary rows sharing a
    # block with rows of 1e38: their logits became 0 and argmax class 0.
    g = torch.Generator().manual_seed(0)
    h = torch.zeros(150, 4)
    h[:50, 0] = 1e38 * (1 + 0.01 * torch.rand(50, generator=g))
    h[50:100, 0] = -1e38 * (1 + 0.01 * torch.rand(50, generator=g))
    h[100:, 1:] = 1e-10 * (1 + 0.1 * torch.rand(50, 3, generator=g))
    y = torch.arange(3).repeat_interleave(50)
    w = torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0], [0, 1.0, 1, 1]])
    assert nnk.nc_metrics(h.double(), y, w.double()).nc4 == 0.0
    assert nnk.nc_metrics(h, y, w).nc4 == 0.0


def test_nc4_of_a_float32_weight_of_huge_magnitude():
    # Only the features' rows were rescaled: h @ W^T overflowed float32 for
    # |W| ~ 1e30 against |h| ~ 1e8 (nc4 0.75 where float64 gives 0).
    h, y, w, b = clustered(300, 64, 10)
    for hs, ws in ((1e8, 1e30), (1e2, 1e36)):
        want = nnk.nc_metrics(h.double() * hs, y, w.double() * ws, b.double() * ws).nc4
        assert nnk.nc_metrics(h * hs, y, w * ws, b * ws).nc4 == want, (hs, ws)


def test_nc4_bias_beside_features_and_weight_near_float32s_limit():
    # Features and W both near 2^127 scale the bias by 2^-(eh + ew), below
    # float32's normal range: its bits were -inf, the logits NaN (nc4 0.67 for 0).
    h, y, w, b = clustered(300, 4, 3)
    hs, ws = 2.0**127 / float(h.abs().max()), 2.0**127 / float(w.abs().max())
    want = nnk.nc_metrics(h.double() * hs, y, w.double() * ws, b.double()).nc4
    assert nnk.nc_metrics(h * hs, y, w * ws, b).nc4 == want


def test_tracker_nc4_counts_given_predictions():
    h, y, w, _ = clustered(40, 4, 3)
    predicted = torch.arange(40) % 3
    t = stream(h, y, 3, 16).begin_nc4(w)
    with pytest.raises(ValueError, match=r"predicted must have shape \(40,\)"):
        t.update_nc4(h, predicted[:39])
    with pytest.raises(ValueError, match=r"predicted must be in \[0, 3\)"):
        t.update_nc4(h, predicted + 1)
    with pytest.raises(TypeError, match="predicted must be an integer tensor"):
        t.update_nc4(h, predicted.float())
    t.update_nc4(h[:25], predicted[:25]).update_nc4(h[25:], predicted[25:])
    stats = nnk.nc_stats(h, y, 3)
    nearest = torch.cdist(h.double(), stats.means).argmin(1)
    assert t.metrics().nc4 == (nearest != predicted).double().mean().item()


def test_nc4_of_float32_features_at_a_large_offset():
    # Features at 1e4 spread over a few ulps (2^-10): the global mean rounded
    # to float32 before h - g shifted every row alike and flipped rows near a
    # boundary between two class means (nc4 off in 63-75 of 100 such sets).
    g = torch.Generator().manual_seed(0)
    wrong = 0
    for _ in range(20):
        y = torch.randint(0, 2, (200,), generator=g)
        centers = torch.randint(0, 30, (2, 2), generator=g).double()
        h = (1e4 + 2.0**-10 * (centers[y] + torch.randint(-15, 16, (200, 2), generator=g))).float()
        w, b = torch.full((2, 2), 1e-3), torch.tensor([1e3, 0.0])  # predicts class 0 everywhere
        hd = h.double()
        means = torch.stack([hd[y == k].mean(0) for k in range(2)])
        d2 = ((hd[:, None] - means[None]) ** 2).sum(-1)
        if bool((d2[:, 0] == d2[:, 1]).any()):
            continue  # a tie: either mean is nearest
        wrong += nnk.nc_metrics(h, y, w, b).nc4 != float((d2[:, 1] < d2[:, 0]).double().mean())
    assert wrong == 0


def test_tiny_float64_features_are_a_clear_error():
    # Their squares fall into float64's subnormals and then to 0: nc1 was 0
    # ("perfect collapse") and equinorm NaN from 2^-545 on, silently.
    h, y, w, b = clustered(60, 5, 3, dtype=torch.float64)
    for call in (lambda t: nnk.nc_metrics(t, y), lambda t: nnk.nc_metrics(t, y, w, b),
                 lambda t: nnk.nc_stats(t, y, 3), lambda t: nnk.NCTracker(3, 5).update(t, y)):
        call(h * 2.0**-470)
        with pytest.raises(ValueError, match="underflows float64; rescale them"):
            call(h * 2.0**-545)


def test_float64_metrics_are_shift_and_scale_invariant():
    """Each metric depends on neither a common offset of the features nor
    their scale, nor the weight's scale. In float64: a rounded global mean
    left a false eigenvalue of Sigma_B behind at an offset of 1e6 (nc1 1.6e5
    against 2.3e-7); nc1's fourth powers under/overflowed for features of
    1e-100 / 1e80 with fewer classes than dimensions (NaN); W W^T overflowed
    for a weight of 1e160 (NaN) and a weight of 1e-170 was "all zero"; nc4
    rounded a float64 weight of 1e-50 to float32 zeros."""
    g = torch.Generator().manual_seed(2)
    n, d, k = 97, 59, 13
    y = torch.randint(0, k, (n,), generator=g)
    y[:k] = torch.arange(k)
    m = 1e-3 * torch.randn(k, d, generator=g, dtype=torch.float64)
    h = 1e6 + m[y] + 1e-6 * torch.randn(n, d, generator=g, dtype=torch.float64)
    hs = h - h[0]  # exact (Sterbenz): the same features without the offset
    assert nnk.nc_metrics(h, y, num_classes=k).nc1 == pytest.approx(nnk.nc_metrics(hs, y, num_classes=k).nc1,
                                                                    rel=1e-6)
    h, y, w, b = clustered(200, 6, 4, spread=0.5, dtype=torch.float64)
    want = nnk.nc_metrics(h, y, w, b).as_dict()
    for mag in (1e-100, 1e80):
        assert_metrics_close(nnk.nc_metrics(h * mag, y, w, b * mag), want, rtol=1e-12)
    for mag in (1e-170, 1e-50, 1e50, 1e160):
        assert_metrics_close(nnk.nc_metrics(h, y, w * mag, b * mag), want, rtol=1e-12)
        assert nnk.nc_metrics(h.float(), y, w * mag, b * mag).nc4 == nnk.nc_metrics(h.float(), y, w, b).nc4


def test_nc1_pinv_cut_is_that_of_the_d_by_d_sigma_b():
    """Sigma_B's second eigenvalue at 100 eps x the first: below pinv's
    default cut for the D x D matrix (D eps, D = 2048), above a K' eps one.
    A cut of K' eps kept it and gave nc1 = 2.3e7 where the formula gives 0."""
    d, eps = 2048, torch.finfo(torch.float64).eps
    a = (100 * eps / 3) ** 0.5
    means = torch.zeros(3, d, dtype=torch.float64)
    means[:, :2] = torch.tensor([[1.0, a], [-1.0, a], [0.0, -2 * a]], dtype=torch.float64)
    delta = torch.zeros(d, dtype=torch.float64)
    delta[1:3] = 1e-3
    h = torch.cat([means + delta, means - delta])  # two samples per class: exact means
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    want = F.metrics64(h.numpy(), y.numpy(), 3)["nc1"]
    assert abs(nnk.nc_metrics(h, y).nc1 - want) <= 1e-12


def test_float64_class_means_equal_up_to_rounding_are_a_clear_error():
    # Bitwise-equal means sat 1 ulp from their separately rounded global mean:
    # no error, and nc1 = 1.4e29.
    h = torch.tensor([[0.6450241201227648], [0.7911478921803037]] * 3, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match="all class means are equal"):
        nnk.nc_metrics(h, y, num_classes=3)
    # Rounding is per coordinate: a large constant feature does not hide a
    # separation that another coordinate resolves (a threshold taken from
    # the largest |mu| raised here).
    h = torch.tensor([[1e6, 0.0], [1e6, 1e-10], [1e6, 0.3e-10], [1e6, 1.3e-10]], dtype=torch.float64)
    h = h + torch.tensor([[0.0, 1e-11], [0.0, -1e-11]], dtype=torch.float64).repeat(2, 1)
    y = torch.tensor([0, 1, 0, 1])
    want = F.metrics64(h.numpy(), y.numpy(), 2)["nc1"]
    assert nnk.nc_metrics(h, y).nc1 == pytest.approx(want, rel=1e-6)
    # Equal means whose float64 sums round apart through cancelling samples
    # (1 + 2^-60 - 1 in two orders): their difference, 2.9e-19, is noise of
    # the samples' magnitude, not of the means' (it gave nc1 = 1.6e37).
    t = 2.0**-60
    h = torch.tensor([[1e6, 1.0], [1e6, t], [1e6, -1.0], [1e6, 1.0], [1e6, -1.0], [1e6, t]])
    with pytest.raises(ValueError, match="all class means are equal"):
        nnk.nc_metrics(h, torch.tensor([0, 0, 0, 1, 1, 1]), num_classes=2)


def test_float64_means_come_from_the_shifted_sums():
    # The same 10,000 rows of 1e6 + 1e-3 randn, in a different order per
    # class: equal means. From the raw float64 sums they differed by ~1e-6
    # (nc1 = 1.6e11, no error); each class's mean is now its shift plus the
    # mean of h - shift, and the global mean the weighted mean of those.
    g = torch.Generator().manual_seed(0)
    k, d, n = 4, 6, 10_000
    base = 1e6 + 1e-3 * torch.randn(n, d, generator=g, dtype=torch.float64)
    h = torch.cat([base[torch.randperm(n, generator=g)] for _ in range(k)])
    y = torch.arange(k).repeat_interleave(n)
    with pytest.raises(ValueError, match="all class means are equal"):
        nnk.nc_metrics(h, y, num_classes=k)
    tracker = nnk.NCTracker(k, d, impl="torch")
    for i in range(0, k * n, 512):
        tracker.update(h[i:i + 512], y[i:i + 512])
    with pytest.raises(ValueError, match="all class means are equal"):
        nnk.nc_metrics_from_stats(tracker.compute())
    # Means separated by 1e-6 at an offset of 1e6: equinorm was 8.5e-3
    # relative off (two passes; now 3.2e-5) against long double.
    n = 4000
    y = torch.arange(n) % k
    offset = 1e6 * torch.linspace(0.5, 1.5, d, dtype=torch.float64)
    h = offset + 1e-6 * torch.randn(k, d, generator=g, dtype=torch.float64)[y] \
        + 1e-8 * torch.randn(n, d, generator=g, dtype=torch.float64)
    hl, yl = h.numpy().astype(np.longdouble), y.numpy()
    mu = np.stack([hl[yl == c].sum(0) / (yl == c).sum() for c in range(k)])
    norms = np.sqrt(((mu - hl.mean(0)) ** 2).sum(1))
    want = float(norms.std() / norms.mean())
    assert nnk.nc_metrics(h, y).nc2_equinorm == pytest.approx(want, rel=1e-3)


def test_one_class_is_a_clear_error_and_one_sample_per_class_is_zero_nc1():
    h = torch.randn(6, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="at least 2 classes"):
        nnk.nc_metrics(h, torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 2 classes"):  # K = 3, one present
        nnk.nc_metrics(h, torch.ones(6, dtype=torch.long), num_classes=3)
    with pytest.raises(ValueError, match="class means are equal"):
        nnk.nc_metrics(torch.ones(6, 4), torch.tensor([0, 1, 0, 1, 0, 1]))
    # One sample per class: Sigma_W = 0, so nc1 = 0 exactly; the rest is defined.
    y = torch.arange(6)
    w = torch.randn(6, 4, dtype=torch.float64)
    m = nnk.nc_metrics(h, y, w)
    assert m.nc1 == 0.0
    assert_metrics_close(m, F.metrics64(h.numpy(), y.numpy(), 6, w.numpy()), rtol=1e-9)
    assert all(np.isfinite(v) for v in m.as_dict().values() if isinstance(v, float))


def test_tracker_keeps_float64_shifts_for_float64_features():
    # Collapsed float64 features (sigma / |mu| = 1e-11): shifts rounded to
    # float32 sat ~1e-8 |mu| from the means and lost every digit of Sigma_W
    # (relative error 0.12, and a negative nc1 at 1e-13).
    g = torch.Generator().manual_seed(0)
    k, d, n = 4, 8, 4000
    y = torch.arange(n) % k
    mu = torch.randn(k, d, generator=g, dtype=torch.float64)
    h = mu[y] + 1e-11 * torch.randn(n, d, generator=g, dtype=torch.float64)
    c = h - torch.stack([h[y == j].mean(0) for j in range(k)])[y]
    truth = c.T @ c / n
    t = stream(h, y, k, 500)
    assert float((t.compute().sigma_w - truth).norm() / truth.norm()) < 1e-4
    # float32 batches: their Gram around the float32-rounded shifts is moved
    # onto the float64 shifts exactly.
    h32 = (mu[y] + 1e-2 * torch.randn(n, d, generator=g, dtype=torch.float64)).float()
    ref = nnk.nc_stats(h32, y, k)
    assert_stats_close(stream(h32, y, k, 500).compute(), ref, rtol=1e-5)


def test_gram_reference_rejects_batched_shifts_of_unbatched_features():
    # It returned the Gram around the first shift set, where the op raises.
    with pytest.raises(ValueError, match=r"must be \(K, D\)"):
        nc_centered_gram_ref(torch.randn(5, 3), torch.zeros(5, dtype=torch.long), torch.randn(2, 1, 3))
    # Nor shifts of another B (it broadcast (1, K, D), where the op and Triton raise).
    with pytest.raises(ValueError, match=r"with the B of 3-D features"):
        nc_centered_gram_ref(torch.randn(3, 5, 3), torch.zeros(5, dtype=torch.long), torch.randn(1, 1, 3))


def test_features_that_require_grad_give_plain_tensors():
    h = torch.randn(30, 4, requires_grad=True)
    y = torch.arange(30) % 3
    s = nnk.nc_stats(h * 2, y, 3)
    assert not s.sigma_w.requires_grad and not s.means.requires_grad


def test_tracker_state_machine():
    h, y, w, _ = clustered(40, 4, 3)
    t = stream(h, y, 3, 16)
    with pytest.raises(RuntimeError, match="before begin_nc4"):
        t.update_nc4(h)
    t.begin_nc4(w)
    with pytest.raises(RuntimeError, match="reset"):
        t.update(h, y)
    t.update_nc4(h[:25])
    with pytest.raises(ValueError, match="NC4 pass saw 25 samples, the statistics 40"):
        t.metrics()  # was nc4 of 25 of the 40 samples, without a word
    t.update_nc4(h[25:])
    assert t.metrics().nc4 == pytest.approx(nnk.nc_metrics(h, y, w).nc4, abs=0)
    assert t.metrics(w.clone()).nc4 == t.metrics().nc4
    with pytest.raises(ValueError, match="NC4 pass ran with another weight"):
        t.metrics(w + 1)  # was nc2, nc3 of w + 1 beside the nc4 of w
    with pytest.raises(RuntimeError, match="process group"):
        t.all_reduce()
    t.reset()
    assert t.n == 0
    t.update(h, y)
    assert t.n == 40


# --- CLI ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["pt", "npy"])
def test_cli_on_saved_tensors(tmp_path, capsys, fmt):
    h, y, w, b = clustered(120, 6, 4)
    paths = {}
    for name, t in (("features", h), ("labels", y), ("weight", w), ("bias", b)):
        paths[name] = str(tmp_path / f"{name}.{fmt}")
        torch.save(t, paths[name]) if fmt == "pt" else np.save(paths[name], t.numpy())
    argv = [paths["features"], paths["labels"], "--weight", paths["weight"], "--bias", paths["bias"], "--json"]
    assert cli_main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert_metrics_close(nnk.NCMetrics(**{**out, "missing_classes": tuple(out["missing_classes"])}),
                         nnk.nc_metrics(h, y, w, b).as_dict(), rtol=1e-12)
    assert out["num_classes"] == 4 and out["n"] == 120
    from nnk.__main__ import main as nnk_main

    assert nnk_main(["nc", paths["features"], paths["labels"]]) == 0
    table = capsys.readouterr().out
    assert "nc1" in table and "n/a (needs --weight)" in table


def test_cli_errors(tmp_path, capsys):
    h, y, _, _ = clustered(20, 3, 2)
    torch.save(h, tmp_path / "h.pt")
    torch.save(y + 5, tmp_path / "bad.pt")
    torch.save({"h": h}, tmp_path / "dict.pt")
    assert cli_main([str(tmp_path / "h.pt"), str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err
    assert cli_main([str(tmp_path / "h.pt"), str(tmp_path / "bad.pt"), "--num-classes", "3"]) == 2
    assert "labels must be in" in capsys.readouterr().err
    assert cli_main([str(tmp_path / "dict.pt"), str(tmp_path / "h.pt")]) == 2
    assert "one tensor" in capsys.readouterr().err
    (tmp_path / "garbage.pt").write_bytes(b"e" * 64)  # not a torch file: a clean error, exit code 2
    assert cli_main([str(tmp_path / "garbage.pt"), str(tmp_path / "h.pt")]) == 2
    assert "garbage.pt" in capsys.readouterr().err
    torch.save(h.numpy(), tmp_path / "numpy.pt")  # refused by weights_only loading
    assert cli_main([str(tmp_path / "numpy.pt"), str(tmp_path / "h.pt")]) == 2
    assert "numpy.pt" in capsys.readouterr().err
    assert cli_main(["--help"]) == 0


# --- DataLoader helper ----------------------------------------------------------------------


def test_collect_nc_metrics_on_a_tiny_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    x = torch.randn(150, 6)
    y = torch.randint(0, 4, (150,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    model.train()
    m = collect_nc_metrics(model, loader, 4, progress=False)
    assert model.training and not model[2]._forward_hooks
    with torch.no_grad():
        feats = model[1](model[0](x))
    ref = nnk.nc_metrics(feats, y, model[2].weight.detach(), model[2].bias.detach())
    assert_metrics_close(m, ref.as_dict(), rtol=1e-5)
    assert m.nc4 is not None and m.nc4 == ref.nc4
    no4 = collect_nc_metrics(model, loader, 4, nc4=False, head=model[2], progress=True)
    assert no4.nc4 is None and no4.nc1 == pytest.approx(m.nc1, rel=1e-12)


@pytest.mark.parametrize("impl", ["torch", "triton", "cuda"])
def test_empty_batches_add_nothing(device, impl):
    # A loader can yield an empty batch (token features filtered by a padding
    # mask): the tracker and collect_nc_metrics skip it, in both passes. On
    # the test device (the kernels' empty launches; triton on CPU tensors
    # needs the interpreter, which --device cuda leaves off).
    if impl == "cuda" and not nnk.ops.has_op("nc_class_sums", device.type):
        pytest.skip(f"nnk._C has no NC kernels for {device.type}")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).to(device)
    x, y = torch.randn(70, 6).to(device), torch.randint(0, 4, (70,)).to(device)
    batches = [(x[:30], y[:30]), (x[:0], y[:0]), (x[30:], y[30:])]
    got = collect_nc_metrics(model, batches, 4, impl=impl, progress=False)
    want = collect_nc_metrics(model, [batches[0], batches[2]], 4, impl=impl, progress=False)
    assert got.as_dict() == want.as_dict() and got.nc4 is not None
    tracker = nnk.NCTracker(4, 6, device, impl=impl)
    tracker.update(x[:0], y[:0])
    assert tracker.counts.sum() == 0
    with pytest.raises(ValueError, match="labels must have shape"):
        tracker.update(x[:0], y[:1])
    with pytest.raises(ValueError, match="features must"):
        tracker.update(torch.zeros(0, 5, device=device), y[:0])
    tracker.update(torch.zeros(2, 0, 6, device=device), y[:0])  # an empty (B, N, D) batch: B not fixed yet
    assert tracker.counts.sum() == 0 and tracker.batch is None


def test_collect_nc_metrics_on_a_cosine_head_uses_its_class_directions():
    # A CosineLinear head predicts with normalize(W): rows of other lengths
    # must not change NC2-NC4 (the raw W gave nc4 = 0.98 where the head's own
    # disagreement was 0.87).
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), nnk.CosineLinear(8, 5, scale=10.0))
    with torch.no_grad():
        model[2].weight.mul_(torch.rand(5, 1) * 10)
    x, y = torch.randn(60, 4), torch.randint(0, 5, (60,))
    m = collect_nc_metrics(model, [(x[:32], y[:32]), (x[32:], y[32:])], 5, progress=False)
    with torch.no_grad():
        feats = model[1](model[0](x))
        pred = model(x).argmax(1)
    ref = nnk.nc_metrics(feats, y, torch.nn.functional.normalize(model[2].weight.detach(), dim=1), num_classes=5)
    assert_metrics_close(m, ref.as_dict(), rtol=1e-5)
    stats = nnk.nc_stats(feats, y, num_classes=5)
    nearest = torch.cdist(feats.double(), stats.means.double()).argmin(1)
    assert m.nc4 == pytest.approx((nearest != pred).double().mean().item(), abs=1e-12)


@pytest.mark.parametrize("kwargs", [{"bias": True}, {"per_class_scale": True}], ids=["bias", "per_class_scale"])
def test_collect_nc_metrics_nc4_is_the_cosine_heads_own_prediction(kwargs):
    # A CosineLinear predicts with s_k cos(h, w_k) + b_k. argmax normalize(W) h + b
    # weighed the bias against |h| instead of s (nc4 0.69 for the head's 0.75
    # with features x10) and left out per-class scales (0.61 for 0.64).
    g = torch.Generator().manual_seed(0)
    k, d, n = 4, 6, 2000
    y = torch.arange(n) % k
    h = 10 * (2 * torch.randn(k, d, generator=g)[y] + 0.8 * torch.randn(n, d, generator=g))
    head = nnk.CosineLinear(d, k, **kwargs)
    with torch.no_grad():
        head.weight.copy_(torch.randn(k, d, generator=g))
        if head.bias is not None:
            head.bias.copy_(torch.tensor([3.0, -3.0, 0.5, 0.0]))
        else:
            head.log_scale.copy_(torch.tensor([0.0, 3.0, 1.0, 2.0]))
    model = torch.nn.Sequential(torch.nn.Identity(), head)
    loader = [(h[i:i + 500].reshape(-1, 5, d), y[i:i + 500].reshape(-1, 5)) for i in range(0, n, 500)]
    loader.insert(1, (h[:0].reshape(0, 5, d), y[:0].reshape(0, 5)))  # (its (0, C) logits: a reshape error)
    m = collect_nc_metrics(model, loader, k, progress=False)
    with torch.no_grad():
        pred = head(h).argmax(1)
    nearest = torch.cdist(h.double(), nnk.nc_stats(h, y, k).means).argmin(1)
    assert m.nc4 == (nearest != pred).double().mean().item()
    assert collect_nc_metrics(model, loader, k, progress=False, nc4=False).nc4 is None


def test_collect_nc_metrics_takes_the_last_dimension_as_features():
    # A head on (B, T, D) inputs sees B T samples of D features (flatten(1)
    # made them B samples of T D features and refused the (B, T) labels).
    torch.manual_seed(0)
    body, head = torch.nn.Linear(3, 6), torch.nn.Linear(6, 4)
    model = torch.nn.Sequential(body, head)
    x, y = torch.randn(12, 5, 3), torch.randint(0, 4, (12, 5))
    m = collect_nc_metrics(model, [(x, y)], 4, progress=False)
    with torch.no_grad():
        ref = nnk.nc_metrics(body(x).reshape(-1, 6), y.reshape(-1), head.weight, head.bias, num_classes=4)
    assert_metrics_close(m, ref.as_dict(), rtol=1e-5)
    assert m.nc4 == ref.nc4


def test_collect_nc_metrics_drops_ignored_labels():
    # LM batches mark padding with -100 (F.cross_entropy's ignore_index); the
    # hook sees every position, so the helper must drop them itself (it used
    # to refuse the labels, leaving no way to mask the captured features).
    torch.manual_seed(0)
    body, head = torch.nn.Linear(3, 6), torch.nn.Linear(6, 4)
    model = torch.nn.Sequential(body, torch.nn.Tanh(), head)
    x, y = torch.randn(12, 5, 3), torch.randint(0, 4, (12, 5))
    y[:, 3:] = -100
    y[0, 0] = -100
    batches = [(x[:7], y[:7]), (x[7:], y[7:])]
    keep = y.reshape(-1) != -100
    m = collect_nc_metrics(model, batches, 4, progress=False)
    with torch.no_grad():
        feats = torch.tanh(body(x)).reshape(-1, 6)[keep]
    ref = nnk.nc_metrics(feats, y.reshape(-1)[keep], head.weight, head.bias, num_classes=4)
    assert_metrics_close(m, ref.as_dict(), rtol=1e-5)
    assert m.nc4 == ref.nc4
    y7 = y.masked_fill(y == -100, 7)
    assert collect_nc_metrics(model, [(x, y7)], 4, ignore_index=7, progress=False).as_dict() == \
        collect_nc_metrics(model, [(x, y)], 4, progress=False).as_dict()
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\)"):
        collect_nc_metrics(model, batches, 4, ignore_index=None, progress=False)


class _TiedLM(torch.nn.Module):
    """A weight-tied LM whose embedding is registered after its head."""

    def __init__(self, vocab=7, dim=4):
        super().__init__()
        self.head = nnk.CosineLinear(dim, vocab, scale=5.0)
        self.emb = torch.nn.Embedding(vocab, dim)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


def test_collect_nc_metrics_default_head_is_not_an_embedding():
    # The last module with a 2-D weight was the embedding: its input, token
    # ids, were taken for features ("features must be float..., got int64").
    torch.manual_seed(0)
    model = _TiedLM()
    ids, labels = torch.randint(0, 7, (20, 5)), torch.randint(0, 7, (20, 5))
    got = collect_nc_metrics(model, [(ids, labels)], 7, progress=False)
    want = collect_nc_metrics(model, [(ids, labels)], 7, head=model.head, progress=False)
    assert got.as_dict() == want.as_dict()
    with pytest.raises(TypeError, match="hooked module is a Embedding; pass head="):
        collect_nc_metrics(model, [(ids, labels)], 7, head=model.emb, progress=False)


def test_collect_nc_metrics_runs_without_tqdm(monkeypatch):
    # tqdm is not a dependency of nnk: without it there is no progress bar.
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    x, y = torch.randn(40, 6), torch.randint(0, 4, (40,))
    for progress in (True, False):
        m = collect_nc_metrics(model, [(x[:20], y[:20]), (x[20:], y[20:])], 4, progress=progress)
        assert m.nc4 is not None


# --- the paper-style baseline of bench/ ------------------------------------------------------


def test_paper_baseline_agrees_with_nnk():
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), os.pardir, "bench", "nc_baseline.py")
    spec = importlib.util.spec_from_file_location("nc_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    h, y, w, _ = clustered(300, 16, 5)
    base = mod.nc_paper_baseline(h, y, 5, w, batch_size=64)
    m = nnk.nc_metrics(h, y, w)
    for name in ("nc1", "nc2", "nc3"):
        assert base[name] == pytest.approx(getattr(m, name), rel=1e-5), name


@pytest.mark.parametrize("impl", ["torch", "triton", "cuda"])
def test_small_integer_labels(device, impl):
    """uint8 / int16 labels, which the API accepts, work on every backend
    (the compiled ops take int64 / int32: the backend converts)."""
    if impl == "cuda" and not nnk.ops.has_op("nc_class_sums", device.type):
        pytest.skip(f"nnk._C has no NC kernels for {device.type}")
    h, y, w, b = (t.to(device) for t in clustered(60, 7, 4))
    want = nnk.nc_metrics(h, y, w, b, impl=impl).as_dict()
    for dtype in (torch.uint8, torch.int16):
        assert_metrics_close(nnk.nc_metrics(h, y.to(dtype), w, b, impl=impl), want, rtol=0.0)


def test_collect_nc_metrics_needs_a_reiterable_loader_for_nc4():
    # A generator is exhausted after the first pass: NC4 used to come back
    # None without a word.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    x, y = torch.randn(64, 6), torch.randint(0, 4, (64,))
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    with pytest.raises(ValueError, match="second pass over loader \\(NC4\\) saw 0 samples, the first 64"):
        collect_nc_metrics(model, iter(batches), 4, progress=False)
    assert collect_nc_metrics(model, iter(batches), 4, nc4=False, progress=False).nc4 is None
    assert collect_nc_metrics(model, batches, 4, progress=False).nc4 is not None
    with pytest.raises(ValueError, match="loader yielded no batches"):
        collect_nc_metrics(model, [], 4, progress=False)
