"""tests/bf16_emulation.py against torch's bfloat16: the rounding bitwise,
and a Triton kernel's casts, stores and dots under the patched interpreter."""
import numpy as np
import pytest
import torch

from bf16_emulation import bfloat16_bits_to_float32, float32_to_bfloat16_bits

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402


def test_rounding_is_torchs_bitwise():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200_000, generator=gen) * torch.logspace(-44, 38, 200_000).float()
    # Halfway and near-halfway cases, the largest finite values, subnormals, signed zeros and infinities.
    halves = (torch.arange(1, 4000, dtype=torch.int32) << 15 | 0x3F800000).view(torch.float32)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3.3895e38, -3.3895e38, 3.4028e38,
                            1e-40, -1e-40, 1.4e-45, 9.2e-41])
    x = torch.cat([x, halves, halves.nextafter(torch.tensor(0.0)), special])
    got = float32_to_bfloat16_bits(x.numpy())
    want = x.bfloat16().view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(got, want)
    assert np.array_equal(bfloat16_bits_to_float32(want), x.bfloat16().float().numpy())
    nan = float32_to_bfloat16_bits(np.array([np.nan, -np.nan], dtype=np.float32))
    assert np.isnan(bfloat16_bits_to_float32(nan)).all()


@triton.jit
def _round_and_dot_kernel(A_ptr, B_ptr, R_ptr, P_ptr, M: tl.constexpr, K: tl.constexpr, L: tl.constexpr):
    m, k, l_ = tl.arange(0, M), tl.arange(0, K), tl.arange(0, L)
    a = tl.load(A_ptr + m[:, None] * K + k[None, :])                 # float32
    tl.store(R_ptr + m[:, None] * K + k[None, :], a)                 # rounded by the store
    b = tl.load(B_ptr + k[:, None] * L + l_[None, :])                # bfloat16
    tl.store(P_ptr + m[:, None] * L + l_[None, :], tl.dot(a.to(tl.bfloat16), b))


@triton.jit
def _bf16_add_kernel(B_ptr, K: tl.constexpr):
    k = tl.arange(0, K)
    b = tl.load(B_ptr + k)
    tl.store(B_ptr + k, b + b)


def test_a_kernel_under_emulation_rounds_and_multiplies_as_a_gpu(device, bf16_triton):
    gen = torch.Generator().manual_seed(1)
    a = (torch.randn(16, 32, generator=gen) * 3).to(device)
    b = torch.randn(32, 16, generator=gen).to(device, torch.bfloat16)
    r = torch.empty(16, 32, device=device, dtype=torch.bfloat16)
    p = torch.empty(16, 16, device=device, dtype=torch.float32)
    _round_and_dot_kernel[(1,)](a, b, r, p, M=16, K=32, L=16)
    assert torch.equal(r, a.bfloat16())
    want = a.bfloat16().double() @ b.double()
    assert (p.double() - want).abs().max() <= 1e-5 * want.abs().max()
    if device.type == "cpu":
        with pytest.raises(Exception, match="bfloat16 arithmetic"):  # triton wraps it in InterpreterError
            _bf16_add_kernel[(1,)](b[0].clone(), K=16)
