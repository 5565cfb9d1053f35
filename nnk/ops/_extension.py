"""Loading of the compiled extension nnk._C and queries on what it registered.

Loading it registers the ``torch.ops.nnk`` operators (TORCH_LIBRARY). A
missing or broken extension is not an error: nnk then runs on its Python and
Triton paths, and :func:`extension_error` says why it is absent. Nothing here
initializes CUDA.
"""
from __future__ import annotations

import torch

# The schema version these sources call (csrc/bindings.cpp kOpsAbi); bumped
# with any change of csrc/schema.cpp, which tests/test_build.py enforces.
OPS_ABI = 4

try:  # torch must be imported first: _C links against libtorch
    from nnk import _C as _ext
    _error: Exception | None = None
except ImportError as e:  # pure-Python install (NNK_NO_EXT=1) or a failed build
    _ext = None
    _error = e
if _ext is not None and _ext.build_info().get("ops_abi") != OPS_ABI:
    # A stale build (sources updated, extension not rebuilt): its ops take
    # other arguments. Left unused; impl="cuda" then says why.
    _error = ImportError(
        f"nnk._C was built from other sources (ops ABI {_ext.build_info().get('ops_abi')}, these "
        f"sources call ABI {OPS_ABI}): rebuild it (pip install --no-build-isolation -e .)")
    _ext = None


def has_extension() -> bool:
    """Whether the compiled extension ``nnk._C`` was imported (its ops registered)."""
    return _ext is not None


def extension_error() -> Exception | None:
    """The ImportError of ``nnk._C`` (not built: ``NNK_NO_EXT=1``, or a failed
    build), or None when it was imported."""
    return _error


def build_info() -> dict:
    """How nnk._C was built (version, torch, CUDA arch list, compiler), or
    ``{"extension": False, "error": ...}`` when it is not loaded."""
    if _ext is None:
        return {"extension": False, "error": repr(_error)}
    return {"extension": True, **_ext.build_info()}


def cce_block_shape(n: int, c: int, d: int, dtype: torch.dtype, device_type: str,
                    chunk_bytes: int = 0) -> tuple[int, int]:
    """``(rows, classes)`` of the blocks of logits that
    ``nnk::cosine_cross_entropy_*`` computes at a time for N rows, C classes
    of dimension D in ``dtype`` on a ``device_type`` ("cpu" / "cuda") device
    with a budget of ``chunk_bytes`` (0: the default, 256 MiB; what
    ``NNK_CHUNK_MB`` sets) for its buffers (csrc/include/nnk/cce_driver.h
    ``tiling``): ``classes < C`` means class chunks. Needs the extension."""
    if _ext is None:
        raise RuntimeError(f"nnk._C is not loaded: {_error!r}")
    name = str(dtype).removeprefix("torch.")
    return tuple(_ext.cce_block_shape(int(n), int(c), int(d), name, device_type == "cuda", int(chunk_bytes)))


# (op name, dispatch key) -> whether nnk._C registered a kernel. Filled when
# the extension loads and on first query of an op registered later: callers
# then only read a dict, which torch.compile(fullgraph=True) can trace (it
# cannot trace the dispatcher query, which returns a bool).
_KERNELS: dict[tuple[str, str], bool] = {}


def _has_kernel(name: str, key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"nnk::{name}", key)
    except RuntimeError:  # no such operator (e.g. a kernel this build does not have)
        return False


if _ext is not None:
    for _op in torch._C._dispatch_get_all_op_names():
        if _op.startswith("nnk::"):
            for _key in ("CPU", "CUDA"):
                _KERNELS[(_op[5:], _key)] = _has_kernel(_op[5:], _key)


def has_op(name: str, device_type: str = "cpu") -> bool:
    """Whether ``torch.ops.nnk.<name>`` has a kernel for ``device_type`` (False
    when the extension does not define the operator at all)."""
    if _ext is None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    if (name, key) not in _KERNELS:
        _KERNELS[(name, key)] = _has_kernel(name, key)
    return _KERNELS[(name, key)]

