"""The compiled extension: it loads, registers its ops, and was built with its
CUDA sources whenever a CUDA toolkit and a CUDA build of torch were present."""
import hashlib
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import torch

import nnk
from nnk.ops import build_info, has_extension, has_op

SKIPPED_BUILD = os.environ.get("NNK_NO_EXT") == "1"
OPS = ["row_normalize", "row_normalize_backward", "cosine_cross_entropy_fwd", "cosine_cross_entropy_bwd",
       "cosine_cross_entropy_fwd_bwd",
       "nc_class_sums", "nc_centered_gram"]


def _cuda_toolkit_present():
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return os.path.exists(os.path.join(home, "bin", "nvcc")) or shutil.which("nvcc") is not None


@pytest.mark.skipif(SKIPPED_BUILD, reason="NNK_NO_EXT=1: pure-Python install, no extension")
def test_extension_loads_and_registers_ops():
    assert has_extension(), f"nnk._C failed to load: {nnk.ops.extension_error()!r}"
    info = build_info()
    assert info["version"] == nnk.__version__
    assert info["ops_abi"] == nnk.ops._extension.OPS_ABI
    for op in OPS:
        assert has_op(op, "cpu"), op


def test_a_stale_extension_is_left_unused():
    # An nnk._C of other op schemas (sources updated without a rebuild) would
    # be called with other arguments: it is refused, and impl="cuda" says why.
    code = (
        "import sys, types, torch\n"
        "fake = types.ModuleType('nnk._C')\n"
        "fake.build_info = lambda: {'ops_abi': 1, 'version': 'old'}\n"
        "sys.modules['nnk._C'] = fake\n"
        "import nnk\n"
        "assert not nnk.ops.has_extension() and not nnk.ops.has_op('cosine_cross_entropy_fwd')\n"
        "print(nnk.ops.build_info()['error'])\n"
        "try:\n"
        "    nnk.cosine_cross_entropy(torch.randn(2, 3), torch.randn(4, 3), torch.tensor([0, 1]), impl='cuda')\n"
        "except ValueError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "ops ABI 1" in out and "rebuild" in out and "impl='cuda' needs the compiled extension" in out


def _source_schemas():
    """The m.def strings of csrc/schema.cpp, whitespace collapsed."""
    text = (pathlib.Path(__file__).parents[1] / "csrc" / "schema.cpp").read_text()
    defs = re.findall(r'm\.def\(\s*((?:"[^"]*"\s*)+)\)', text)
    return [" ".join("".join(re.findall(r'"([^"]*)"', d)).split()) for d in defs]


# The sha256 (first 16 hex digits) of the schemas of each ops ABI. A schema
# change must bump OPS_ABI and kOpsAbi (so that a stale build is refused) and
# add its hash here.
SCHEMA_HASHES = {2: "e5852db97da6a272", 3: "2d39d19852f6ebf8", 4: "c2230a116d88fa44"}


def test_a_schema_change_bumps_the_ops_abi():
    schemas = _source_schemas()
    assert [s.split("(")[0] for s in schemas] == OPS
    digest = hashlib.sha256("\n".join(schemas).encode()).hexdigest()[:16]
    assert SCHEMA_HASHES.get(nnk.ops._extension.OPS_ABI) == digest, (
        f"csrc/schema.cpp changed (hash {digest}): bump OPS_ABI (nnk/ops/_extension.py) and kOpsAbi "
        "(csrc/bindings.cpp), and record the new hash in SCHEMA_HASHES")


@pytest.mark.skipif(SKIPPED_BUILD, reason="NNK_NO_EXT=1: pure-Python install, no extension")
def test_the_built_ops_have_the_sources_schemas():
    # Parsed by the same torch formatter on both sides, so spacing cannot differ.
    for schema in _source_schemas():
        name = schema.split("(")[0]
        expected = str(torch._C.parse_schema(f"nnk::{schema}"))
        assert str(getattr(torch.ops.nnk, name).default._schema) == expected, name


@pytest.mark.gpu_machine
@pytest.mark.skipif(SKIPPED_BUILD or os.environ.get("NNK_NO_CUDA") == "1",
                    reason="extension or its CUDA sources skipped on purpose (NNK_NO_EXT / NNK_NO_CUDA)")
def test_cuda_sources_built_when_toolkit_present():
    if not (_cuda_toolkit_present() and torch.version.cuda):
        pytest.skip("no CUDA toolkit or a CPU build of torch: the CUDA sources are legitimately skipped")
    info = build_info()
    assert info["cuda"], f"nvcc and CUDA torch {torch.version.cuda} present but the CUDA sources were skipped: {info}"
    for op in OPS:
        assert has_op(op, "cuda"), op


def test_sdist_holds_every_source_of_the_extension(tmp_path):
    """An sdist made anywhere builds nnk._C: setuptools put in the listed
    sources but no header, and the CUDA sources only where a toolkit was
    found (`pip install nnk-0.1.0.tar.gz` failed: nnk/cce_driver.h: No such
    file). MANIFEST.in grafts csrc/."""
    repo = pathlib.Path(__file__).resolve().parent.parent
    if not (repo / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are unknown")
    files = subprocess.run(["git", "-C", str(repo), "ls-files", "-co", "--exclude-standard"], capture_output=True,
                           text=True, check=True).stdout.split()
    src = tmp_path / "src"
    for f in files:
        if (repo / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / f, src / f)
    # With no extension sources listed at all (NNK_NO_EXT=1), less than a
    # machine without CUDA lists: the sdist must not depend on what is listed.
    env = {k: v for k, v in os.environ.items() if k != "NNK_REQUIRE_CUDA"}  # (make test sets it)
    env["NNK_NO_EXT"] = "1"
    proc = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=src,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import tarfile

    (sdist,) = (tmp_path / "dist").glob("nnk-*.tar.gz")
    with tarfile.open(sdist) as tar:
        held = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    needed = {f for f in files if f.startswith("csrc/") or f in ("CMakeLists.txt", "setup.py", "pyproject.toml")}
    assert not needed - held, sorted(needed - held)


@pytest.mark.gpu_machine  # (where CUDA could be initialized at all)
def test_import_does_not_initialize_cuda():
    code = "import torch, nnk; assert not torch.cuda.is_initialized(); print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.skipif(not has_extension(), reason="nnk._C not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck_row_normalize(dtype, device):
    x = torch.randn(9, 13, dtype=dtype, device=device)
    x[3] = 0
    torch.library.opcheck(torch.ops.nnk.row_normalize.default, (x, 1e-12))
    torch.library.opcheck(torch.ops.nnk.row_normalize.default, (x.clone().requires_grad_(dtype != torch.bfloat16), 1e-12))
    y, n = torch.ops.nnk.row_normalize(x, 1e-12)
    g = torch.randn_like(x)
    torch.library.opcheck(torch.ops.nnk.row_normalize_backward.default, (g, y, n, 1e-12))
    torch.library.opcheck(torch.ops.nnk.row_normalize_backward.default, (g.requires_grad_(), y, n, 1e-12))


@pytest.mark.skipif(not has_extension(), reason="nnk._C not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_row_normalize_op_matches_reference(dtype, device):
    from nnk.reference import row_normalize_backward_ref, row_normalize_ref

    x = torch.randn(37, 301, dtype=dtype, device=device) * 3
    if dtype != torch.float16:  # g / eps overflows float16 on zero rows, as in F.normalize
        x[5] = 0
        x[6] *= 1e-20 if dtype == torch.float64 else 0
    y, n = torch.ops.nnk.row_normalize(x, 1e-12)
    yr, nr = row_normalize_ref(x, 1e-12)
    tol = {torch.float32: 1e-6, torch.float64: 1e-14, torch.float16: 1e-3}[dtype]
    assert (y.double() - yr.double()).abs().max() <= tol and (n - nr).abs().max() <= tol * 30
    g = torch.randn_like(x)
    dx = torch.ops.nnk.row_normalize_backward(g, y, n, 1e-12)
    dxr = row_normalize_backward_ref(g, y, n, 1e-12)
    assert ((dx.double() - dxr.double()).abs() / (dxr.double().abs() + 1)).max() <= 4 * tol


def test_row_normalize_op_rejects_bad_input():
    if not has_extension():
        pytest.skip("nnk._C not built")
    with pytest.raises(RuntimeError, match="2-D"):
        torch.ops.nnk.row_normalize(torch.randn(3), 1e-12)
    with pytest.raises(RuntimeError, match="eps"):
        torch.ops.nnk.row_normalize(torch.randn(3, 2), 0.0)
    with pytest.raises(RuntimeError, match="norm must have shape"):
        torch.ops.nnk.row_normalize_backward(torch.randn(3, 2), torch.randn(3, 2), torch.randn(4), 1e-12)
