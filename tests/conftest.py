"""Test configuration.

``pytest --device cuda`` runs the device-parametrized tests on a GPU; the
default is the CPU, where Triton kernels run under TRITON_INTERPRET=1. The
interpreter flag must be set before any @triton.jit function is defined, so
this file sets it at configure time and imports nothing from nnk at module
level. No CUDA query happens at import or collection time on the CPU.

``--gpu-only`` keeps the tests that run on the GPU under ``--device cuda``
(those taking the ``device`` fixture or marked ``gpu``) and those whose
outcome depends on the GPU machine (marked ``gpu_machine``): about a third of the
suite. The rest runs the same on any machine and is left to the CPU runs,
so that a short GPU session spends its time on the kernels.
"""
import os

import pytest

try:
    from hypothesis import settings
except ImportError:
    settings = None
if settings is not None:
    # The property tests draw the same examples on every run: a CI run must
    # not fail on a draw that no one can replay. NNK_HYPOTHESIS=explore draws
    # new ones (hypothesis prints how to reproduce a failing one).
    settings.register_profile("nnk", derandomize=True)
    settings.register_profile("explore", derandomize=False)
    settings.load_profile("explore" if os.environ.get("NNK_HYPOTHESIS") == "explore" else "nnk")


def pytest_addoption(parser):
    parser.addoption(
        "--device", default=os.environ.get("NNK_TEST_DEVICE", "cpu"), choices=("cpu", "cuda"),
        help="device of the kernel tests (cpu: Triton under TRITON_INTERPRET=1)",
    )
    parser.addoption(
        "--gpu-only", action="store_true",
        help="deselect the tests that take neither the device fixture nor the gpu marker "
             "(with --device cuda: only what runs on the GPU)",
    )


def pytest_configure(config):
    if os.environ.get("NNK_TEST_CUDA_EMULATION") == "1":
        _use_cuda_emulation(config)
    if config.getoption("--device") == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
        # Every Triton kernel of a CPU run computes a float32 tl.exp as a GPU
        # does (tests/gpu_exp_emulation.py), not to numpy's half an ulp.
        from gpu_exp_emulation import emulate

        config._nnk_gpu_exp_patch = pytest.MonkeyPatch()
        config._nnk_gpu_exp_missing = emulate(config._nnk_gpu_exp_patch)
        # The interpreter runs tl.dot through numpy; a multithreaded OpenBLAS
        # on a loaded 2-core machine makes each small matmul ~100x slower
        # (measured 47 ms vs 0.3 ms). torch's own BLAS (MKL) is not affected.
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # slower, not wrong
            return
        config._nnk_blas_limit = threadpool_limits(1, user_api="blas")  # numpy if already loaded


def _use_cuda_emulation(config):
    """Run by tests/test_cuda_emulation.py in a subprocess whose ``nnk`` is the
    copy with the emulated CUDA build (tests/cuda_emulation/build.py): its
    ``impl="cuda"`` on CPU tensors runs the CUDA sources. Refuses to run the
    tests against anything else."""
    import sys

    import nnk

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "cuda_emulation"))
    from build import EMULATED_ARCHS, register_gemms

    if nnk.ops.build_info().get("cuda_archs") != EMULATED_ARCHS:
        raise pytest.UsageError(f"NNK_TEST_CUDA_EMULATION=1 but nnk ({nnk.__file__}) is not the emulated build")
    config._nnk_emulated_gemms = register_gemms()


def pytest_collection_modifyitems(config, items):
    if config.getoption("--gpu-only"):
        keep, drop = [], []
        for item in items:
            on_gpu = "device" in item.fixturenames or any(
                item.get_closest_marker(m) is not None for m in ("gpu", "gpu_machine"))
            (keep if on_gpu else drop).append(item)
        if drop:
            config.hook.pytest_deselected(items=drop)
            items[:] = keep
    if config.getoption("--device") == "cuda":
        import torch  # asked for CUDA: the query is the user's

        if torch.cuda.is_available():
            return
        # As the device fixture does, for the gpu tests that do not take it.
        skip = pytest.mark.skip(reason="--device cuda given but no CUDA device is available")
    else:
        skip = pytest.mark.skip(reason="needs a CUDA GPU: run with --device cuda on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device(pytestconfig):
    """The torch device kernel tests run on ("cpu" or "cuda")."""
    import torch

    dev = pytestconfig.getoption("--device")
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda given but no CUDA device is available")
    return torch.device(dev)


@pytest.fixture
def gpu_exp(device, request):
    """For a test that needs Triton's float32 exp as a GPU computes it
    (ex2.approx): the GPU as is; on the CPU, the interpreter with the model
    of its error that pytest_configure installs (tests/gpu_exp_emulation.py),
    skipped where this triton cannot take it. Nothing to model for a test
    parametrized with another impl (which runs without triton installed)."""
    impl = getattr(request.node, "callspec", None) and request.node.callspec.params.get("impl")
    missing = getattr(request.config, "_nnk_gpu_exp_missing", None)
    if device.type == "cpu" and impl in (None, "triton") and missing:
        pytest.skip(missing)


@pytest.fixture
def bf16_triton(device, monkeypatch):
    """bfloat16 through the Triton kernels as a GPU computes it: the GPU as is;
    on the CPU, the interpreter with a GPU's bfloat16 rounding and dots and
    nnk's tensor-core path (tests/bf16_emulation.py)."""
    if device.type == "cpu":
        from bf16_emulation import emulate

        emulate(monkeypatch)


def pytest_unconfigure(config):
    patch = getattr(config, "_nnk_gpu_exp_patch", None)
    if patch is not None:
        patch.undo()
