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
exact products, as on a tensor core (in another summation order).

Arithmetic on bfloat16 values in a kernel (other than casts, loads, stores,
selects and dots) is not emulated: it raises, so a kernel that starts doing
it fails its tests instead of computing on integer bits.
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
        from triton.runtime import interpreter as ti

        from nnk.impl.triton import launch

        builder = ti.InterpreterBuilder
        hooks = (ti._convert_float, ti.TensorHandle, builder.create_dot, builder.binary_op, builder.unary_op,
                 builder.create_fma, builder.create_rsqrt)
    except (ImportError, AttributeError) as e:
        pytest.skip(f"this triton's interpreter cannot be given bfloat16 rounding: {e}")
    convert, dot, binary_op, unary_op, fma, rsqrt = (hooks[0],) + hooks[2:]
    bf16 = tl.bfloat16

    def convert_float(data, src, dst, rounding_mode):
        if src == tl.float32 and dst == bf16:
            return float32_to_bfloat16_bits(data.view(np.float32)).reshape(data.shape)
        if src == bf16 and dst == tl.float32:
            return bfloat16_bits_to_float32(data).view(np.uint32).reshape(data.shape)
        return convert(data, src, dst, rounding_mode)

    def widen(h):
        return bfloat16_bits_to_float32(h.data).reshape(h.data.shape) if h.dtype.scalar == bf16 else h.data

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if bf16 not in (a.dtype.scalar, b.dtype.scalar):
            return dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        return ti.TensorHandle(np.matmul(widen(a), widen(b), dtype=d.data.dtype) + d.data, d.dtype.scalar)

    def refuse(original):
        def op(self, *args):
            if any(getattr(a, "dtype", None) is not None and getattr(a.dtype, "scalar", None) == bf16
                   for a in args):
                raise AssertionError(f"bfloat16 arithmetic in a kernel ({original.__name__}): the "
                                     "interpreter computes it on integer bits and tests/bf16_emulation.py "
                                     "does not emulate it")
            return original(self, *args)
        return op

    monkeypatch.setattr(ti, "_convert_float", convert_float)
    monkeypatch.setattr(builder, "create_dot", create_dot)
    for name, original in (("binary_op", binary_op), ("unary_op", unary_op), ("create_fma", fma),
                           ("create_rsqrt", rsqrt)):
        monkeypatch.setattr(builder, name, refuse(original))
    monkeypatch.setattr(launch, "INTERPRETER_UPCASTS_BF16", False)
