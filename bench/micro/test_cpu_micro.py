"""pytest-benchmark micro-benchmarks of the CPU paths: the reference
(specification), nnk's blockwise torch path and the extension's CPU kernels
(``impl="cuda"`` on CPU tensors, when nnk._C is built), forward + backward, at
small sizes; the row-normalization op; the NC statistics (torch and extension).
Not under tests/ so CI never times them.

    pytest bench/micro --benchmark-autosave              # save a run (.benchmarks/)
    pytest bench/micro --benchmark-compare                # compare with the last saved run
    pytest bench/micro --benchmark-compare=0001 --benchmark-compare-fail=median:10%

Each benchmark checks that its result is finite, nothing about its speed.
"""
import math

import pytest
import torch

import nnk
from nnk.reference import cosine_cross_entropy_ref

CASES = {  # name: (N, D, C, keyword arguments)
    "vision-N256-D512-C1000": (256, 512, 1000, {"scale": 20.0}),
    "face-arcface-N256-D128-C8192": (256, 128, 8192, {"scale": 64.0, "angular_margin": 0.5}),
}
LOSSES = {
    "ref": cosine_cross_entropy_ref,
    "nnk-torch": lambda x, w, y, **kw: nnk.cosine_cross_entropy(x, w, y, impl="torch", **kw),
}
if nnk.ops.has_op("cosine_cross_entropy_fwd", "cpu"):
    LOSSES["nnk-cuda-cpu-kernels"] = lambda x, w, y, **kw: nnk.cosine_cross_entropy(x, w, y, impl="cuda", **kw)
NC_IMPLS = ["torch"] + (["cuda"] if nnk.ops.has_op("nc_class_sums", "cpu") else [])


@pytest.fixture(autouse=True)
def one_thread():
    # One thread: stable figures on a shared machine, comparable run to run.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _inputs(n, d, c, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, requires_grad=True)
    w = torch.randn(c, d, generator=g, requires_grad=True)
    return x, w, torch.randint(0, c, (n,), generator=g)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl", list(LOSSES))
def test_forward_backward(benchmark, impl, case):
    n, d, c, kw = CASES[case]
    x, w, y = _inputs(n, d, c)
    fn = LOSSES[impl]

    def step():
        x.grad = w.grad = None
        loss = fn(x, w, y, **kw)
        loss.backward()
        return loss

    loss = benchmark(step)
    assert math.isfinite(loss.item()) and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("impl", list(LOSSES))
def test_forward(benchmark, impl):
    n, d, c, kw = CASES["vision-N256-D512-C1000"]
    x, w, y = _inputs(n, d, c)
    fn = LOSSES[impl]
    with torch.no_grad():
        loss = benchmark(fn, x, w, y, **kw)
    assert math.isfinite(loss.item())


def test_row_normalize(benchmark):
    x = torch.randn(8192, 512)
    y, norm = benchmark(nnk.ops.row_normalize, x, 1e-12)
    assert torch.isfinite(y).all() and norm.shape == (8192,)


@pytest.mark.parametrize("impl", NC_IMPLS)
def test_nc_stats(benchmark, impl):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 100, (20000,), generator=g)
    h = torch.randn(100, 256, generator=g)[y] + 0.5 * torch.randn(20000, 256, generator=g)
    stats = benchmark(nnk.nc_stats, h, y, 100, impl=impl)
    assert torch.isfinite(stats.sigma_w).all() and stats.n == 20000

