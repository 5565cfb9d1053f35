"""Launch helpers shared by the forward and backward launchers."""
from __future__ import annotations

import contextlib
import math

import torch
import triton

from ..._options import CCEOptions
from . import configs


def margin_args(opts: CCEOptions) -> dict:
    """Kernel arguments of the margins: the constants of math.h's ArcMargin
    (computed in float64, rounded to float32 at launch) and the HAS_ARC flag."""
    m = opts.angular_margin
    return dict(
        cos_m=math.cos(m), sin_m=math.sin(m), arc_threshold=-math.cos(m),
        arc_fallback=m * math.sin(m), additive=opts.additive_margin, HAS_ARC=m != 0.0,
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
    pick other ones)."""
    if deterministic:
        kernel.fn[grid](*args, **kwargs, **fixed.all_kwargs())
    else:
        kernel.on(args[0].device)[grid](*args, **kwargs)


def dtype_args(dtype: torch.dtype, upcast: bool = False) -> dict:
    """UPCAST: 16-bit tiles go to float32 right after loading: bfloat16 under
    the interpreter (which computes on bfloat16 bits as integers), or when the
    caller asks (``upcast``); otherwise 16-bit tiles stay tensor-core operands.
    DOT_PRECISION: "ieee" for float32 operands (Triton's default is TF32 on the
    GPU); operands of 16 bits ignore it."""
    upcast = upcast or (configs.INTERPRET and dtype == torch.bfloat16)
    return dict(UPCAST=upcast, DOT_PRECISION="ieee" if upcast or dtype == torch.float32 else "tf32")


def on_device(t: torch.Tensor):
    """Context in which ``t``'s CUDA device is the current one: Triton launches
    on the current device and its current stream, not on the tensors' device
    (x on cuda:1 with cuda:0 current would run on the wrong GPU). A no-op on
    the CPU (interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
