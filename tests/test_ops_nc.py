"""nnk::nc_class_sums and nnk::nc_centered_gram against the reference
(nnk.reference.nc_class_sums_ref / nc_centered_gram_ref) and an fp64 truth,
batched and not; registration (opcheck, fake kernels under torch.compile)."""
import pytest
import torch

import nnk
from nnk.ops import has_op
from nnk.reference import nc_centered_gram_ref, nc_class_sums_ref

pytestmark = pytest.mark.skipif(not has_op("nc_class_sums", "cpu"),
                                reason="nnk._C not built (or built without the NC ops)")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _data(batch, n, d, k, dtype, device, seed=0, used=None):
    """Features (n, d) or (batch, n, d) and labels using `used` (default: all)
    of k classes, so that some classes can be empty."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, d) if batch is None else (batch, n, d)
    h = (torch.randn(*shape, generator=g, dtype=torch.float64) * 2 + 1).to(device=device, dtype=dtype)
    y = torch.randint(0, used or k, (n,), generator=g).to(device)
    return h, y


def _err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [None, 3])
def test_class_sums_match_reference(dtype, batch, device):
    # D = 130 crosses the 128-column tiles of the CUDA kernel; classes 11, 12 are empty.
    h, y = _data(batch, 97, 130, 13, dtype, device, used=11)
    counts, sums = nnk.ops.nc_class_sums(h, y, 13)
    counts_ref, sums_ref = nc_class_sums_ref(h, y, 13)
    truth = nc_class_sums_ref(h.double(), y, 13)[1]
    assert torch.equal(counts, counts_ref) and counts.dtype == torch.int64
    assert sums.shape == sums_ref.shape and sums.dtype == sums_ref.dtype
    assert _err(sums, truth) <= 2 * _err(sums_ref, truth) + 1e-12 * truth.abs().max().item() + 1e-5
    assert torch.equal(sums[..., 11:, :], torch.zeros_like(sums[..., 11:, :]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,shifts_batched", [(None, False), (3, False), (3, True)])
def test_centered_gram_matches_reference(dtype, batch, shifts_batched, device):
    # D = 130: three 64-wide tiles, the last one partial, off-diagonal tiles mirrored.
    h, y = _data(batch, 301, 130, 7, dtype, device)
    g = torch.Generator().manual_seed(5)
    shape = (batch, 7, 130) if shifts_batched else (7, 130)
    shifts = torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    got = nnk.ops.nc_centered_gram(h, y, shifts)
    ref = nc_centered_gram_ref(h, y, shifts)
    truth = nc_centered_gram_ref(h.double(), y, shifts.double())
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert _err(got, truth) <= 2 * _err(ref, truth) + 1e-12 * truth.abs().max().item()
    if device.type == "cuda":  # the kernel computes the upper tiles and mirrors them
        assert torch.equal(got, got.mT)


def test_centered_gram_on_collapsed_features(device):
    """Features equal to their class mean plus 1e-3 noise, mean norm ~100: the
    one-pass H^T H - sum n mu mu^T cancels ~8 digits here; centering on the
    class means in the load keeps the fp32 result at fp32 accuracy."""
    g = torch.Generator().manual_seed(0)
    k, n, d = 5, 400, 48
    means = torch.randn(k, d, generator=g, dtype=torch.float64) * 15
    y = torch.randint(0, k, (n,), generator=g)
    h64 = means[y] + 1e-3 * torch.randn(n, d, generator=g, dtype=torch.float64)
    h = h64.float().to(device)
    truth = nc_centered_gram_ref(h.double(), y.to(device), means.to(device))
    got = nnk.ops.nc_centered_gram(h, y.to(device), means.float().to(device))
    rel = _err(got, truth) / truth.abs().max().item()
    assert rel < 1e-3, rel


def test_mixed_precision_shifts_give_float64(device):
    h, y = _data(None, 50, 9, 4, torch.float32, device)
    shifts = torch.randn(4, 9, dtype=torch.float64, device=device)
    got = nnk.ops.nc_centered_gram(h, y, shifts)
    assert got.dtype == torch.float64
    assert _err(got, nc_centered_gram_ref(h, y, shifts)) < 1e-9


def test_int32_labels_and_empty_inputs(device):
    h, y = _data(2, 40, 5, 6, torch.float32, device)
    c1, s1 = nnk.ops.nc_class_sums(h, y.int(), 6)
    c2, s2 = nc_class_sums_ref(h, y, 6)
    assert torch.equal(c1, c2) and _err(s1, s2) < 1e-5
    counts, sums = nnk.ops.nc_class_sums(h[:, :0], y[:0], 6)
    assert torch.equal(counts, torch.zeros(6, dtype=torch.int64, device=device))
    assert torch.equal(sums, torch.zeros(2, 6, 5, device=device))
    gram = nnk.ops.nc_centered_gram(h[:, :0], y[:0], torch.zeros(6, 5, device=device))
    assert torch.equal(gram, torch.zeros(2, 5, 5, device=device))
    # No columns (D = 0) or no classes, over many feature sets: nothing to
    # launch, so no row splits (CUDA asked for 64 and refused B >= 1024 as
    # "too many batches", with gridDim.z = B x splits).
    many, labels = torch.zeros(1100, 300, 0, device=device), torch.zeros(300, dtype=torch.int64, device=device)
    counts, sums = nnk.ops.nc_class_sums(many, labels, 1)
    assert counts.tolist() == [300] and sums.shape == (1100, 1, 0)
    gram = nnk.ops.nc_centered_gram(many, labels, torch.zeros(1, 0, device=device))
    assert gram.shape == (1100, 0, 0)
    counts, sums = nnk.ops.nc_class_sums(torch.zeros(1100, 0, 4, device=device), labels[:0], 0)
    assert counts.shape == (0,) and sums.shape == (1100, 0, 4)


def test_bad_arguments_are_rejected():
    h, y = _data(None, 10, 4, 3, torch.float32, "cpu")
    bad = y.clone()
    bad[7] = 3
    with pytest.raises(RuntimeError, match=r"labels must be in \[0, 3\), got 3 at row 7"):
        torch.ops.nnk.nc_class_sums(h, bad, 3)
    with pytest.raises(RuntimeError, match=r"labels must be in \[0, 3\), got 3 at row 7"):
        torch.ops.nnk.nc_centered_gram(h, bad, torch.zeros(3, 4))
    # Below the range too: without the check the kernels wrote counts[-1] (heap corruption).
    bad[7] = -1
    for op, extra in ((torch.ops.nnk.nc_class_sums, (3,)), (torch.ops.nnk.nc_centered_gram, (torch.zeros(3, 4),))):
        with pytest.raises(RuntimeError, match=r"labels must be in \[0, 3\), got -1 at row 7"):
            op(h, bad, *extra)
    with pytest.raises(RuntimeError, match="labels must have shape"):
        torch.ops.nnk.nc_class_sums(h, y[:5], 3)
    with pytest.raises(RuntimeError, match="features must be"):
        torch.ops.nnk.nc_class_sums(h[0], y, 3)
    with pytest.raises(RuntimeError, match="shifts must have D=4"):
        torch.ops.nnk.nc_centered_gram(h, y, torch.zeros(3, 5))
    with pytest.raises(RuntimeError, match="shifts must be"):
        torch.ops.nnk.nc_centered_gram(h, y, torch.zeros(2, 3, 4))  # 3-D shifts for 2-D features
    with pytest.raises(RuntimeError, match="labels must be int64 or int32"):
        torch.ops.nnk.nc_class_sums(h, y.float(), 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [None, 2])
def test_opcheck(dtype, batch, device):
    h, y = _data(batch, 33, 70, 5, dtype, device)
    torch.library.opcheck(torch.ops.nnk.nc_class_sums.default, (h, y, 5))
    torch.library.opcheck(torch.ops.nnk.nc_centered_gram.default, (h, y, torch.randn(5, 70, device=device)))
    # Features that require grad: statistics, not differentiable (run below
    # autograd; their outputs do not require grad).
    hg = h.clone().requires_grad_()
    torch.library.opcheck(torch.ops.nnk.nc_class_sums.default, (hg, y, 5))
    torch.library.opcheck(torch.ops.nnk.nc_centered_gram.default, (hg, y, torch.randn(5, 70, device=device)))
    assert not torch.ops.nnk.nc_centered_gram(hg, y, torch.zeros(5, 70, device=device)).requires_grad
    with pytest.raises(RuntimeError, match="tensors on cpu and meta"):
        torch.ops.nnk.nc_centered_gram(h.cpu(), y.cpu(), torch.zeros(5, 70, device="meta"))


def test_torch_compile_fullgraph_cpu():
    h, y = _data(2, 64, 16, 4, torch.float32, "cpu")
    shifts = torch.randn(4, 16)

    def f(h_, y_, c_):
        counts, sums = nnk.ops.nc_class_sums(h_, y_, 4)
        return counts, sums, nnk.ops.nc_centered_gram(h_, y_, c_)

    counts, sums, gram = torch.compile(f, fullgraph=True)(h, y, shifts)
    c_ref, s_ref = nc_class_sums_ref(h, y, 4)
    assert torch.equal(counts, c_ref) and _err(sums, s_ref) < 1e-5
    assert _err(gram, nc_centered_gram_ref(h, y, shifts)) < 1e-3


@pytest.mark.gpu
def test_cuda_results_are_bitwise_reproducible():
    h, y = _data(2, 5000, 300, 10, torch.float32, "cuda")
    shifts = torch.randn(10, 300, device="cuda")
    a = nnk.ops.nc_class_sums(h, y, 10)[1], nnk.ops.nc_centered_gram(h, y, shifts)
    b = nnk.ops.nc_class_sums(h, y, 10)[1], nnk.ops.nc_centered_gram(h, y, shifts)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
