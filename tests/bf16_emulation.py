"""A GPU's bfloat16 for the Triton interpreter, so that the CPU tests run the
kernels' bfloat16 tensor-core path (the one a GPU runs) instead of the
float32 upcast that nnk falls back to under the interpreter.

The interpreter stores bfloat16 as uint16 bits and gets two things wrong
(triton 3.x ``triton/runtime/interpreter.py``): a float32 -> bfloat16 cast
truncates the mantissa (a GPU's ``cvt.rn.bf16.f32`` rounds to nearest
even), and ``tl.dot`` multiplies the uint16 bits as integers. Here casts
round to nearest even (bitwise what ``torch.Tensor.bfloat16`` gives) and
dots widen bfloat16 operands to float32 first: the products of bfloat16
values are exact in float32, so the dot is a float32-accumulated sum of
exact products. A tensor core sums them in another order and, by published
measurements, aligns the addends by truncation where numpy rounds each add:
what is left to a GPU run.

Emulated: loads, stores, selects, transposes, float32 <-> bfloat16 casts
(round to nearest even, or toward zero where a kernel asks for it) and dots.
Everything else on bfloat16 values that the interpreter would compute on the
bits raises instead: element-wise arithmetic and comparisons, erf, clamp,
reductions and scans (tl.sum keeps bfloat16), and casts between bfloat16 and
any type but float32. A kernel that starts doing one of these then fails its
tests rather than passing on integer bits. (nnk's kernels only load, cast,
transpose and dot bfloat16 tiles.)
"""
from __future__ import annotations

import numpy as np
import pytest


def float32_to_bfloat16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round to nearest even; overflow
    gives inf, NaN stays a (quiet) NaN."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    u = a.view(np.uint32).astype(np.uint64)
    # Adding 0x7FFF plus the lowest kept bit and dropping 16 bits rounds half
    # to even; a carry out of the mantissa moves the exponent up, to inf at the top.
    out = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(a)
    out[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return out


def bfloat16_bits_to_float32(b: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32, exact."""
    return (np.ascontiguousarray(b, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def emulate(monkeypatch) -> None:
    """Patch the interpreter (for the test's duration, through pytest's
    ``monkeypatch``) and turn off nnk's bfloat16 upcast under it. Skips the
    test when this triton's interpreter lacks the hooks patched here."""
    try:
        import triton.language as tl
        from triton._C.libtriton import ir
        from triton.runtime import interpreter as ti

        from nnk.impl.triton import launch

        builder = ti.InterpreterBuilder
        rtz = ir.ROUNDING_MODE.RTZ
        refused = {name: getattr(builder, name) for name in (
            "binary_op", "unary_op", "ternary_op", "create_fma", "create_rsqrt", "create_erf")}
        convert, dot, cast, check_tensor = (ti._convert_float, builder.create_dot, builder.cast_impl,
                                            ti.ReduceScanOpInterface.check_tensor)
    except (ImportError, AttributeError) as e:
        pytest.skip(f"this triton's interpreter cannot be given bfloat16 rounding: {e}")
    bf16 = tl.bfloat16

    def not_emulated(what):
        return AssertionError(f"bfloat16 {what} in a kernel: the interpreter computes it on integer bits "
                              "and tests/bf16_emulation.py does not emulate it")

    def convert_float(data, src, dst, rounding_mode):
        if src == tl.float32 and dst == bf16:
            if rounding_mode == rtz:
                bits = data.view(np.uint32)
                out = (bits >> 16).astype(np.uint16)
                nan = np.isnan(data.view(np.float32))
                out[nan] |= 0x40
                return out.reshape(data.shape)
            return float32_to_bfloat16_bits(data.view(np.float32)).reshape(data.shape)
        if src == bf16 and dst == tl.float32:
            return bfloat16_bits_to_float32(data).view(np.uint32).reshape(data.shape)
        if bf16 in (src, dst):
            raise not_emulated(f"conversion {src} -> {dst}")
        return convert(data, src, dst, rounding_mode)

    def cast_impl(self, src, dst_type):
        pair = (src.dtype.scalar, dst_type.scalar)
        if bf16 in pair and tl.float32 not in pair and pair[0] != pair[1]:
            raise not_emulated(f"cast {pair[0]} -> {pair[1]}")
        return cast(self, src, dst_type)

    def reduce_check(self, input):
        if any(arg.dtype.scalar == bf16 for arg in input):
            raise not_emulated("reduction or scan")
        return check_tensor(self, input)

    def widen(h):
        return bfloat16_bits_to_float32(h.data).reshape(h.data.shape) if h.dtype.scalar == bf16 else h.data

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if bf16 not in (a.dtype.scalar, b.dtype.scalar):
            return dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        return ti.TensorHandle(np.matmul(widen(a), widen(b), dtype=d.data.dtype) + d.data, d.dtype.scalar)

    def refuse(name, original):
        def op(self, *args):
            selects = name == "ternary_op" and args[-1] is np.where   # picks bits: emulated
            if not selects and any(getattr(getattr(a, "dtype", None), "scalar", None) == bf16 for a in args):
                raise not_emulated(f"arithmetic ({name})")
            return original(self, *args)
        return op

    monkeypatch.setattr(ti, "_convert_float", convert_float)
    monkeypatch.setattr(builder, "create_dot", create_dot)
    monkeypatch.setattr(builder, "cast_impl", cast_impl)
    monkeypatch.setattr(ti.ReduceScanOpInterface, "check_tensor", reduce_check)
    for name, original in refused.items():
        monkeypatch.setattr(builder, name, refuse(name, original))
    monkeypatch.setattr(launch, "INTERPRETER_UPCASTS_BF16", False)
