"""Launch helpers shared by the forward and backward launchers."""
from __future__ import annotations

import contextlib
import math

import torch
import triton

from ..._options import CCEOptions, check_operands
from . import configs

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_vector(op: str, name: str, t, lengths: int | tuple[int, ...], dtype: torch.dtype | None,
                 device: torch.device, *, contiguous: bool = True) -> None:
    """``t`` is a 1-D tensor of one of ``lengths`` entries, of ``dtype`` (None:
    any floating dtype), on ``device`` and, unless ``contiguous=False``,
    contiguous: the kernels index such vectors as ``ptr + i``, so a strided
    view would be read as if it were dense."""
    lengths = tuple(dict.fromkeys((lengths,) if isinstance(lengths, int) else lengths))
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1 or t.shape[0] not in lengths:
        shapes = " or ".join(f"({k},)" for k in lengths)
        raise ValueError(f"{op}: {name} must have shape {shapes}, got {tuple(t.shape)}")
    if dtype is None and not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be floating point, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{op}: {name} must be {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but x is on {device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous, got stride {t.stride()}")


def check_inputs(op: str, x, weight, target, scale, bias) -> None:
    """The tensors that ``cce_forward`` / ``cce_backward`` (``op``) give the
    kernels, as the kernels read them: x (N, D) and weight (C, D), C >= 1, of
    one dtype among KERNEL_DTYPES, any strides; target (N,) int64, scale (1,)
    or (C,) float32, bias (C,) float32 or None, each contiguous; all on x's
    device, a CUDA one unless TRITON_INTERPRET=1. A TypeError for a type or
    dtype, else a ValueError, before anything is allocated or launched (the
    kernels would read a wrong layout out of bounds or misread it, not refuse
    it). Metadata only, no host sync: the values (targets in [0, C) or
    ignore_index, a finite positive scale) are checked by
    ``nnk._options.check_tensors``, which syncs once for them."""
    n, _, c = check_operands(x, weight, KERNEL_DTYPES, op)
    dev = x.device
    if dev.type != "cuda" and not configs.INTERPRET:
        raise ValueError(f"{op}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got {dev}")
    if weight.device != dev:
        raise ValueError(f"{op}: weight is on {weight.device} but x is on {dev}")
    check_vector(op, "target", target, n, torch.int64, dev)
    # The kernels tell one scale for all classes from per-class ones by its size.
    check_vector(op, "scale", scale, (1, c), torch.float32, dev)
    if bias is not None:
        check_vector(op, "bias", bias, c, torch.float32, dev)


def margin_args(opts: CCEOptions) -> dict:
    """Kernel arguments of the margins: the constants of math.h's ArcMargin
    (computed in float64, rounded to float32 at launch) and the HAS_ARC flag.
    The branch threshold -cos m is the target sines' (norms.target_sines)."""
    m = opts.angular_margin
    return dict(
        cos_m=math.cos(m), sin_m=math.sin(m), arc_fallback=m * math.sin(m), additive=opts.additive_margin,
        HAS_ARC=m != 0.0,
    )


def shape_buckets(n: int, c: int) -> dict:
    """N_BUCKET / C_BUCKET, the autotune keys of the problem size: N and C
    rounded up to powers of two. Keyed on the exact sizes, autotuning would
    rerun (several configs, several timed launches each) for every new batch
    size and, with Partial-FC sampling, for every new class count: every step."""
    return dict(N_BUCKET=triton.next_power_of_2(max(n, 1)), C_BUCKET=triton.next_power_of_2(max(c, 1)))


class PerDeviceAutotune:
    """``triton.autotune(**options)(fn)``, with one autotuner per GPU model.
    An autotuner caches its choice under its key, which holds no device: in a
    process with two GPU models the config timed on one would be reused on
    the other, slow there or over its shared memory (a config tuned on an
    sm_90 with 227 KB fails to launch on an sm_86 with 99 KB)."""

    def __init__(self, fn, **options):
        self.fn, self.keys, self._options, self._tuners = fn, options["key"], options, {}

    def on(self, device: torch.device):
        model = device_model(device)
        tuner = self._tuners.get(model)
        if tuner is None:
            tuner = self._tuners[model] = triton.autotune(**self._options)(self.fn)
        return tuner


def device_model(device: torch.device):
    """What an autotuned choice depends on: the GPU's name and capability
    (None for the interpreter's CPU tensors)."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return props.name, props.major, props.minor


def launch(kernel: PerDeviceAutotune, grid, deterministic: bool, fixed: triton.Config, *args, **kwargs):
    """Launch the kernel autotuned for the device of ``args[0]``, or in
    deterministic mode the plain kernel with the fixed config: the same block
    sizes, hence the same summation order, in every process (autotuning could
    pick other ones); also with NNK_TRITON_NO_AUTOTUNE=1 (configs.no_autotune)."""
    if deterministic or configs.no_autotune():
        kernel.fn[grid](*args, **kwargs, **fixed.all_kwargs())
    else:
        kernel.on(args[0].device)[grid](*args, **kwargs)


# The interpreter truncates float32 to bfloat16 (a GPU rounds to nearest
# even) and multiplies bfloat16 dot operands as integer bits, so under it
# bfloat16 tiles go to float32 after loading. tests/bf16_emulation.py gives
# the interpreter a GPU's bfloat16 rounding and dots and turns this off, so
# that the CPU tests run the GPU's bfloat16 tensor-core path.
INTERPRETER_UPCASTS_BF16 = configs.INTERPRET


def dtype_args(dtype: torch.dtype, upcast: bool = False) -> dict:
    """UPCAST: 16-bit tiles go to float32 right after loading: bfloat16 under
    the interpreter (see INTERPRETER_UPCASTS_BF16), or when the caller asks
    (``upcast``); otherwise 16-bit tiles stay tensor-core operands.
    DOT_PRECISION: "ieee" for float32 operands (Triton's default is TF32 on the
    GPU); operands of 16 bits ignore it."""
    upcast = upcast or (INTERPRETER_UPCASTS_BF16 and dtype == torch.bfloat16)
    return dict(UPCAST=upcast, DOT_PRECISION="ieee" if upcast or dtype == torch.float32 else "tf32")


def on_device(t: torch.Tensor):
    """Context in which ``t``'s CUDA device is the current one: Triton launches
    on the current device and its current stream, not on the tensors' device
    (x on cuda:1 with cuda:0 current would run on the wrong GPU). A no-op on
    the CPU (interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
