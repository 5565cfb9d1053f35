"""Loading of the compiled extension nnk._C and queries on what it registered.

Loading it registers the ``torch.ops.nnk`` operators (TORCH_LIBRARY). A
missing or broken extension is not an error: nnk then runs on its Python and
Triton paths, and :func:`extension_error` says why it is absent. Nothing here
initializes CUDA.
"""
from __future__ import annotations

import torch

try:  # torch must be imported first: _C links against libtorch
    from nnk import _C as _ext
    _error: Exception | None = None
except ImportError as e:  # pure-Python install (NNK_NO_EXT=1) or a failed build
    _ext = None
    _error = e


def has_extension() -> bool:
    return _ext is not None


def extension_error() -> Exception | None:
    return _error


def build_info() -> dict:
    """How nnk._C was built (version, torch, CUDA arch list, compiler), or
    ``{"extension": False, "error": ...}`` when it is not loaded."""
    if _ext is None:
        return {"extension": False, "error": repr(_error)}
    return {"extension": True, **_ext.build_info()}


# Constant for the life of the process once nnk._C is loaded; declaring it so
# lets torch.compile(fullgraph=True) trace the callers (the query returns a
# bool, which Dynamo cannot put in a graph).
@torch.compiler.assume_constant_result
def has_op(name: str, device_type: str = "cpu") -> bool:
    """Whether ``torch.ops.nnk.<name>`` has a kernel for ``device_type``."""
    if _ext is None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"nnk::{name}", key)
