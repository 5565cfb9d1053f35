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
def _truncate_kernel(A_ptr, R_ptr, K: tl.constexpr):
    k = tl.arange(0, K)
    tl.store(R_ptr + k, tl.load(A_ptr + k).to(tl.bfloat16, fp_downcast_rounding="rtz"))


@triton.jit
def _not_emulated_kernel(B_ptr, OUT_ptr, WHAT: tl.constexpr, K: tl.constexpr):
    k = tl.arange(0, K)
    b = tl.load(B_ptr + k)
    if WHAT == "add":
        tl.store(B_ptr + k, b + b)
    elif WHAT == "sum":
        tl.store(OUT_ptr, tl.sum(b, axis=0).to(tl.float32))
    else:  # a float64 -> bfloat16 cast
        tl.store(B_ptr + k, (b.to(tl.float32).to(tl.float64) * 2.0).to(tl.bfloat16))


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
    r16 = torch.empty(16, device=device, dtype=torch.bfloat16)
    _truncate_kernel[(1,)](a[0, :16].contiguous(), r16, K=16)
    bits = a[0, :16].cpu().view(torch.int32) >> 16
    assert torch.equal(r16.cpu().view(torch.int16).int() & 0xFFFF, bits & 0xFFFF)


@pytest.mark.parametrize("what", ["add", "sum", "float64"])
def test_what_is_not_emulated_raises(what, device, bf16_triton):
    # The interpreter would compute these on the bits (tl.sum of [-1, -2, 0.5, 0.25]
    # gave -1.06e37): a kernel that starts doing one must fail its tests.
    if device.type != "cpu":
        pytest.skip("a GPU computes these in bfloat16: nothing to refuse")
    b = torch.tensor([-1.0, -2.0, 0.5, 0.25] * 4, dtype=torch.bfloat16)
    with pytest.raises(Exception, match="bfloat16 .* in a kernel"):  # triton wraps it in InterpreterError
        _not_emulated_kernel[(1,)](b, torch.empty(1), WHAT=what, K=16)
