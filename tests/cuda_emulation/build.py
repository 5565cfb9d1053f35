"""Builds the extension's CUDA sources for the CPU under cuda_emulation.h, as
a copy of the nnk package whose ``nnk._C`` registers the CUDA implementations
(csrc/cuda/*_cuda.cpp and the kernels of csrc/cuda/*.cu, emulated) for the
CPU dispatch key, in place of csrc/cpu/. Tests then run the extension's tests
against it in a subprocess (tests/test_cuda_emulation.py): the CUDA kernels'
indexing, reductions, barriers and the host code around them run in CI,
which has no GPU.

The GEMMs are ATen's CPU ones. CUDA's 16-bit GEMMs with float32 output
(aten::mm.dtype_out, baddbmm.dtype_out) have no CPU kernel: register_gemms
gives them one (float32 products of the 16-bit operands, as cuBLAS's
float32-accumulating tensor-core GEMMs compute them up to summation order).

    python tests/cuda_emulation/build.py OUT   # the package copy: OUT/nnk
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"


def _split_top_level(text: str) -> list[str]:
    """Splits a launch configuration at the commas outside brackets."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "(<[{":
            depth += 1
        elif ch in ")>]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    parts.append(cur.strip())
    return parts


# nnk.ops.build_info()["cuda_archs"] of the emulated build.
EMULATED_ARCHS = "emulated"

_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^;{}]*?>)?)\s*<<<(.*?)>>>\s*\((.*?)\);", re.S)


def rewrite_launches(source: str) -> str:
    """``k<<<grid, block, smem, stream>>>(args);`` -> an emulated launch."""
    def launch(m: re.Match) -> str:
        kernel, config, args = m.group(1), _split_top_level(m.group(2)), m.group(3)
        grid, block = config[0], config[1]
        if len(config) > 2 and config[2] != "0":
            raise RuntimeError(f"{kernel}: dynamic shared memory ({config[2]}) is not emulated")
        return f"::nnk_cuda_emulation::launch(dim3({grid}), dim3({block}), [&]() {{ {kernel}({args}); }});"

    out = _LAUNCH.sub(launch, source)
    if "<<<" in out:
        raise RuntimeError("a kernel launch was not rewritten")
    return out


def emulated_sources(build: Path) -> list[str]:
    """The emulated build's sources, written under build/src."""
    src = build / "src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    out = []
    for path in sorted((CSRC / "cuda").glob("*.cu")):
        text = rewrite_launches(path.read_text())
        (src / (path.stem + "_cu.cpp")).write_text(f'#line 1 "{path}"\n' + text)
        out.append(src / (path.stem + "_cu.cpp"))
    for path in sorted((CSRC / "cuda").glob("*_cuda.cpp")):
        text = path.read_text()
        if text.count("TORCH_LIBRARY_IMPL(nnk, CUDA, m)") != 1:
            raise RuntimeError(f"{path.name}: expected one TORCH_LIBRARY_IMPL(nnk, CUDA, m)")
        text = text.replace("TORCH_LIBRARY_IMPL(nnk, CUDA, m)", "TORCH_LIBRARY_IMPL(nnk, CPU, m)")
        (src / path.name).write_text(f'#line 1 "{path}"\n' + text)
        out.append(src / path.name)
    out += [CSRC / "schema.cpp", CSRC / "bindings.cpp"]
    return [str(p) for p in out]


def _host_has_fma() -> bool:
    try:
        return any(line.startswith("flags") and " fma " in line + " "
                   for line in Path("/proc/cpuinfo").read_text().splitlines())
    except OSError:
        return False


def _compile(name: str, sources: list[str], build_dir: Path, verbose: bool):
    """Compiles sources (the CUDA ones already rewritten) under cuda_emulation.h
    into the Python extension module `name`."""
    from torch.utils.cpp_extension import load

    cuda_home = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    if not (cuda_home / "include" / "cuda_runtime.h").exists():
        raise FileNotFoundError(f"no CUDA headers under {cuda_home} (set CUDA_HOME)")
    flags = ["-O2", "-Wno-attributes", "-include", str(HERE / "cuda_emulation.h"),
             "-DNNK_WITH_CUDA", f'-DNNK_CUDA_ARCHS=\\"{EMULATED_ARCHS}\\"']
    if _host_has_fma():
        # nvcc contracts a * b + c into one FMA by default; so does this build
        # (the CUDA Gram's sequential row sums are ~2x less exact without).
        flags += ["-mfma", "-ffp-contract=fast"]
    return load(
        name=name,
        sources=sources + [str(HERE / "runtime.cpp")],
        extra_include_paths=[str(HERE), str(CSRC / "include"), str(CSRC / "cuda"), str(cuda_home / "include")],
        extra_cflags=flags,
        build_directory=str(build_dir),
        is_python_module=True,
        with_cuda=False,
        verbose=verbose,
    )


def build(out: Path, verbose: bool = False) -> Path:
    """Builds OUT/nnk, a copy of the package with the emulated nnk._C; returns OUT."""
    out = Path(out)
    build_dir = out / "build"
    build_dir.mkdir(parents=True, exist_ok=True)
    module = _compile("_C", emulated_sources(build_dir), build_dir, verbose)
    pkg = out / "nnk"
    shutil.rmtree(pkg, ignore_errors=True)
    shutil.copytree(ROOT / "nnk", pkg, ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    shutil.copy2(module.__file__, pkg / Path(module.__file__).name)
    return out


def build_selftest(out: Path, verbose: bool = False):
    """The module of selftest.cu's kernels (``run(which, x, out)``), built under OUT."""
    build_dir = Path(out) / "selftest"
    build_dir.mkdir(parents=True, exist_ok=True)
    source = build_dir / "selftest_cu.cpp"
    source.write_text(f'#line 1 "{HERE / "selftest.cu"}"\n' + rewrite_launches((HERE / "selftest.cu").read_text()))
    return _compile("nnk_cuda_emulation_selftest", [str(source)], build_dir, verbose)


def register_gemms():
    """CPU kernels of aten::mm.dtype_out and aten::baddbmm.dtype_out (CUDA
    only in ATen): float32 products of float16 / bfloat16 operands. Returns
    the torch.library.Library that holds them."""
    import torch

    lib = torch.library.Library("aten", "IMPL")

    def mm_out(a, b, out_dtype, *, out):
        return out.copy_(torch.mm(a.to(out_dtype), b.to(out_dtype)))

    def baddbmm_out(c, a, b, out_dtype, *, beta=1, alpha=1, out):
        return out.copy_(torch.baddbmm(c.to(out_dtype), a.to(out_dtype), b.to(out_dtype), beta=beta, alpha=alpha))

    lib.impl("mm.dtype_out", mm_out, "CPU")
    lib.impl("baddbmm.dtype_out", baddbmm_out, "CPU")
    return lib


if __name__ == "__main__":
    print(build(Path(sys.argv[1]), verbose=True))
