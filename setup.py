"""Build of nnk and its extension nnk._C.

The extension always gets the CPU sources in csrc/ (schema, CPU kernels,
pybind11 build information). The CUDA sources are added whenever a CUDA
toolkit is found (CUDA_HOME) and the installed torch is a CUDA build, even
with no GPU present: the arch list is explicit, so torch never probes a GPU.

Environment:
  NNK_NO_EXT=1         pure-Python install, no extension (nnk runs on its
                       Python/Triton paths).
  NNK_NO_CUDA=1        build the CPU extension only.
  NNK_REQUIRE_CUDA=1   fail instead of building without the CUDA sources.
  NNK_CUDA_ARCHS       ';'-separated compute capabilities (default "80;90a");
                       PTX of the last entry is embedded for newer GPUs.
  MAX_JOBS             parallel compile jobs (default: min(4, cores)).
"""
import glob
import os
import re

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def read_version():
    with open(os.path.join(ROOT, "nnk", "_version.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


def gencode_flags(archs):
    flags = []
    for a in archs:
        flags.append(f"-gencode=arch=compute_{a},code=sm_{a}")
    last = archs[-1].rstrip("a")  # PTX of an arch-specific target ("90a") cannot JIT forward
    flags.append(f"-gencode=arch=compute_{last},code=compute_{last}")
    return flags


def extensions(version):
    if os.environ.get("NNK_NO_EXT") == "1":
        return [], {}
    import pybind11
    import torch
    from torch.utils import cpp_extension as ce

    os.environ.setdefault("MAX_JOBS", str(max(1, min(4, os.cpu_count() or 1))))
    cuda_home = ce.CUDA_HOME
    with_cuda = (
        os.environ.get("NNK_NO_CUDA") != "1"
        and cuda_home is not None
        and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))
        and torch.version.cuda is not None
    )
    if os.environ.get("NNK_REQUIRE_CUDA") == "1" and not with_cuda:
        raise RuntimeError(
            "NNK_REQUIRE_CUDA=1 but the CUDA sources would be skipped: "
            f"CUDA_HOME={cuda_home!r}, torch.version.cuda={torch.version.cuda!r}, "
            f"NNK_NO_CUDA={os.environ.get('NNK_NO_CUDA')!r}"
        )
    archs = [a for a in os.environ.get("NNK_CUDA_ARCHS", "80;90a").split(";") if a]
    define = [
        ("NNK_VERSION", f'"{version}"'),
        ("NNK_TORCH_VERSION", f'"{torch.__version__}"'),
    ]
    include_dirs = [pybind11.get_include(), os.path.join(ROOT, "csrc", "include")]
    sources = ["csrc/schema.cpp", "csrc/bindings.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3"]
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
        define += [("NNK_WITH_CUDA", None), ("NNK_CUDA_ARCHS", '"' + ";".join(archs) + '"')]
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"] + gencode_flags(archs)
        ext = ce.CUDAExtension(
            "nnk._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        )
    else:
        ext = ce.CppExtension(
            "nnk._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define,
            extra_compile_args={"cxx": cxx},
        )
    return [ext], {"build_ext": ce.BuildExtension.with_options(use_ninja=True)}


VERSION = read_version()
ext_modules, cmdclass = extensions(VERSION)

setup(
    name="nnk",
    version=VERSION,
    packages=find_packages(include=["nnk", "nnk.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
