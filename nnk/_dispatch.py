"""Which backend runs nnk's cross-entropy (the ``impl=`` switch and
``NNK_IMPL``), and how the entry points take torch.autocast."""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

from ._options import IMPLS, CCEOptions, _choice
from .ops import has_op


def _triton_usable(device: torch.device) -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _gpu_kernels_target(device: torch.device) -> bool:
    """Whether "auto" may pick nnk's GPU kernels on this CUDA device: they
    target sm_80 and newer (bfloat16 tensor-core dots; the extension ships
    sm_80 / sm_90a code and compute_90 PTX, which cannot JIT to older GPUs).
    Asked once per device index, outside torch.compile's tracing (which
    reads the cache: a model compiled before any eager call on that device is
    assumed to run on sm_80+)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABILITY and not torch.compiler.is_compiling():
        _CAPABILITY[index] = torch.cuda.get_device_capability(index)
    return _CAPABILITY.get(index, (8, 0)) >= (8, 0)


_CAPABILITY: dict[int, tuple[int, int]] = {}


def cublas_accumulates_in_fp16(op: str, device: torch.device, dtype: torch.dtype | None) -> bool | None:
    """Whether the extension's cosine cross-entropy GEMMs (float16 operands,
    float32 output) would get cuBLAS's float16 compute type: ATen asks for it
    on every float16 GEMM under ``allow_fp16_accumulation``, and cuBLAS has no
    float16 compute with a float32 output. A global (not thread-local)
    setting, so nnk cannot turn it off around its own GEMMs as it does TF32.
    Unknown (None) while torch.compile traces: reading it breaks the graph
    (and torch.compiler.assume_constant_result would import torch._dynamo,
    with triton, at ``import nnk``)."""
    if not (op == "cosine_cross_entropy_fwd" and device.type == "cuda" and dtype == torch.float16):
        return False
    if torch.compiler.is_compiling():
        return None
    return torch.backends.cuda.matmul.allow_fp16_accumulation


def resolve_impl(
    impl: str,
    device: torch.device,
    dtype: torch.dtype | None = None,
    *,
    op: str = "cosine_cross_entropy_fwd",
    arg: str = "x",
) -> str:
    """The backend that ``impl`` means for tensors on ``device``.

    ``"auto"`` takes ``NNK_IMPL`` when set and not empty (float64 excepted:
    always the PyTorch path), else: on CUDA devices of compute
    capability 8.0 or newer the Triton kernels when triton is installed (the
    compiled extension instead while torch.compile traces, when it is built,
    for bfloat16 and float32), else the compiled extension (not for float16
    under ``allow_fp16_accumulation``, nor while tracing float16), else the
    blockwise PyTorch path; on older GPUs and other devices the blockwise
    PyTorch path.
    float64 runs on the torch path only. An explicit impl that cannot run on
    ``device`` is a ValueError, one that cannot take ``dtype`` a TypeError.
    ``op`` is the extension operator whose presence means "cuda" is
    available, ``arg`` the argument named in the dtype error."""
    _choice("impl", impl, IMPLS)
    # The errors below name where an impl that cannot run came from.
    given = f"impl={impl!r}"
    if impl == "auto":
        # Unset or empty: "auto", as the on/off switches read unset or empty as 0.
        impl = _choice("NNK_IMPL", os.environ.get("NNK_IMPL") or "auto", IMPLS)
        given = f"impl={impl!r} (from the environment variable NNK_IMPL, what impl='auto' means for the process)"
        # Only the torch path takes float64, whatever the process default says
        # (a float64 gradcheck must not fail on NNK_IMPL=cuda).
        if dtype == torch.float64:
            return "torch"
    if impl == "auto":
        if device.type == "cuda" and _gpu_kernels_target(device):
            # Not for float16 GEMMs under the fp16-accumulation setting, nor
            # while torch.compile traces (None: the setting cannot be read).
            cuda = has_op(op, "cuda") and cublas_accumulates_in_fp16(op, device, dtype) is False
            # While torch.compile traces, the extension's ops (fake kernels:
            # opaque nodes of a full graph) rather than the Triton launchers,
            # which Dynamo would trace into.
            if _triton_usable(device) and not (cuda and torch.compiler.is_compiling()):
                return "triton"
            if cuda:
                return "cuda"
        return "torch"
    if impl == "triton" and not _triton_usable(device):
        raise ValueError(
            f"{given} needs triton and CUDA tensors (or TRITON_INTERPRET=1 on CPU); got tensors on {device}"
        )
    if impl == "cuda" and not has_op(op, device.type):
        raise ValueError(
            f"{given} needs the compiled extension nnk._C with kernels for {device.type} "
            "(see nnk.ops.build_info())"
        )
    if impl == "cuda" and cublas_accumulates_in_fp16(op, device, dtype) is True:
        raise ValueError(
            f"{given} multiplies float16 operands into float32 with cuBLAS, which "
            "torch.backends.cuda.matmul.allow_fp16_accumulation = True switches to float16 "
            "accumulation (not supported with a float32 output); use impl='triton' or 'torch', "
            "or turn the setting off"
        )
    if impl != "torch" and dtype == torch.float64:
        raise TypeError(f"impl={impl!r} takes float16, bfloat16 or float32 {arg}; float64 runs on impl='torch'")
    return impl


def backend(impl: str):
    if impl == "torch":
        from .impl.torch_blockwise import cosine_cross_entropy_torch

        return cosine_cross_entropy_torch
    if impl == "triton":
        from .impl.triton import cosine_cross_entropy_triton

        return cosine_cross_entropy_triton
    from .impl.extension import cosine_cross_entropy_extension

    return cosine_cross_entropy_extension


def saveable(*tensors):
    """``tensors`` with copies of those made under ``torch.inference_mode``,
    when autograd records this call: autograd refuses to save them, and the
    Triton and CUDA Functions save their inputs (features of a frozen
    backbone run under inference_mode trained a probe on the torch path, which
    saves normalized copies, and raised on the others). Not while Dynamo
    traces, which cannot trace ``is_inference``: a compiled graph saves the
    inference tensors it is given and autograd raises, as for ``nn.Linear``."""
    if (torch.compiler.is_compiling() or not torch.is_grad_enabled()
            or not any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)):
        return tensors
    return tuple(t.clone() if isinstance(t, torch.Tensor) and t.is_inference() else t for t in tensors)


def run_backend(impl: str, x, weight, target, scale, bias, opts: CCEOptions):
    """``(row_loss, lse)`` from the backend ``impl`` resolves to, on arguments
    already checked by ``check_tensors`` (no second round of checks or syncs)."""
    x, weight, target, scale, bias = saveable(x, weight, target, scale, bias)
    return backend(resolve_impl(impl, x.device, x.dtype))(x, weight, target, scale, bias, opts)


def autocast_dtype(device: torch.device) -> str | None:
    """The dtype torch.autocast casts matmul operands to on ``device``'s type,
    as a string (None when autocast is off there)."""
    dev = device.type
    return str(torch.get_autocast_dtype(dev)) if torch.is_autocast_enabled(dev) else None


def autocast_operands(fn):
    """Under ``torch.autocast`` x and weight are cast to the autocast dtype
    (as autocast casts the operands of ``nn.Linear``'s matmul: floating, not
    float64), then ``fn`` runs with autocast off, so that its own float32
    epilogue math is not cast again."""

    @functools.wraps(fn)
    def wrapper(x, weight, *args, **kwargs):
        dev = x.device.type if isinstance(x, torch.Tensor) else None
        # (meta tensors have no autocast state: check_inputs refuses them.)
        if dev is None or dev == "meta" or not torch.is_autocast_enabled(dev):
            return fn(x, weight, *args, **kwargs)
        dtype = torch.get_autocast_dtype(dev)
        f64 = [isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in (x, weight)]
        if f64[0] != f64[1] and all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in (x, weight)):
            # Cast, the other operand would be named with a dtype the caller never had.
            cast = "weight" if f64[0] else "x"
            raise TypeError(f"x is {x.dtype} and weight is {weight.dtype}: torch.autocast({dtype}) would cast "
                            f"{cast} and leaves float64 alone, so they cannot match; pass both as float64 "
                            "outside autocast, or cast the float64 one to the other's dtype")
        x, weight = (
            t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
            else t
            for t in (x, weight))
        with torch.autocast(dev, enabled=False):
            return fn(x, weight, *args, **kwargs)

    return wrapper
