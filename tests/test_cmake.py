"""CMakeLists.txt builds the same sources into a loadable nnk._C.

CI builds the CPU sources only (-DNNK_WITH_CUDA=OFF): setup.py already
compiles every .cu file there, and a second CUDA build would add ~3 minutes
on 2 cores. ``NNK_TEST_CMAKE_CUDA=1`` builds the CUDA sources too."""
import os
import shutil
import site
import subprocess
import sys

import pytest
import torch

CUDA_HOME = os.environ.get("CUDA_HOME", "/usr/local/cuda")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("ninja") is None and
                    not os.path.exists(os.path.join(os.path.dirname(sys.executable), "ninja")),
                    reason="cmake or ninja not installed")
def test_cmake_build_loads_and_registers_ops(tmp_path):
    toolkit = os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    if torch.version.cuda is not None and not toolkit:
        pytest.skip("a CUDA build of torch needs the CUDA toolkit for its CMake config")
    with_cuda = toolkit and torch.version.cuda is not None and os.environ.get("NNK_TEST_CMAKE_CUDA") == "1"
    cfg = ["cmake", "-S", ROOT, "-B", str(tmp_path), "-G", "Ninja", f"-DPython_EXECUTABLE={sys.executable}",
           f"-DNNK_WITH_CUDA={'ON' if with_cuda else 'OFF'}"]
    if toolkit and torch.version.cuda is not None:  # torch's CMake config needs these even without CUDA sources
        sp = site.getsitepackages()[0]
        cfg += [f"-DCMAKE_CUDA_COMPILER={CUDA_HOME}/bin/nvcc", f"-DCUDAToolkit_ROOT={CUDA_HOME}",
                f"-DCUDA_TOOLKIT_ROOT_DIR={CUDA_HOME}", f"-DCUDA_nvrtc_LIBRARY={sp}/nvidia/cu13/lib/libnvrtc.so.13"]
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
           "TORCH_CUDA_ARCH_LIST": "8.0;9.0a"}
    for cmd in (cfg, ["cmake", "--build", str(tmp_path)]):
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (so,) = [p for p in os.listdir(tmp_path) if p.startswith("_C") and p.endswith(".so")]
    code = (
        "import torch, importlib.util as u, sys\n"
        f"s = u.spec_from_file_location('_C', {str(tmp_path / so)!r}); m = u.module_from_spec(s); s.loader.exec_module(m)\n"
        "info = m.build_info(); print(info)\n"
        "assert torch._C._dispatch_has_kernel_for_dispatch_key('nnk::row_normalize', 'CPU')\n"
        f"assert info['cuda'] == {with_cuda}\n"
        "y, n = torch.ops.nnk.row_normalize(torch.ones(2, 4), 1e-12); assert torch.allclose(y, torch.full((2, 4), 0.5))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
