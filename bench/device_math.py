"""How far a device's float32 exp, expm1 and log1p are from correctly rounded.

    python -m bench.device_math --device cuda

The CPU emulation of the CUDA kernels (tests/cuda_emulation/cuda_emulation.h)
moves each of glibc's results by CUDA's documented bound (expf 2 ulp,
expm1f and log1pf 1 ulp), up or down by a hash of the argument: it assumes
the errors do not lean one way. Moved all the same way, the float32 sum-reduced
loss errs 4-6x the float32 reference's (README, "Tests"). This measures it
on the device: per function, the largest |error| and the mean signed error
in ulps against float64, over the arguments the kernels give it (exp: z - max
and z - lse <= 0; expm1: a target's z - lse near 0; log1p: a row's sum of
exps, 0 to the class count). torch's CUDA kernels of these ops call CUDA's
expf, expm1f and log1pf (ATen builds without fast math).
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch

# name: (float32 function, float64 function, argument sampler (n, generator) -> float64)
FUNCTIONS: dict[str, tuple[Callable, Callable, Callable]] = {
    "exp": (torch.exp, torch.exp, lambda n, g: -30.0 * torch.rand(n, generator=g, dtype=torch.float64)),
    "expm1": (torch.expm1, torch.expm1, lambda n, g: -torch.rand(n, generator=g, dtype=torch.float64)),
    "log1p": (torch.log1p, torch.log1p,
              lambda n, g: 10.0 ** (14.0 * torch.rand(n, generator=g, dtype=torch.float64) - 8.0)),
}


def ulp_errors(f32: Callable, f64: Callable, args: torch.Tensor) -> torch.Tensor:
    """(f32(float32 args) - f64(the same args)) in ulps of the float64 value,
    float64, for args whose results are normal float32 numbers."""
    a = args.to(torch.float32)
    exact = f64(a.to(torch.float64))
    got = f32(a).to(torch.float64)
    _, e = torch.frexp(exact)  # exact = m 2^e, m in [0.5, 1): an ulp is 2^(e - 24)
    err = (got - exact) / torch.ldexp(torch.ones_like(exact), e - 24)
    normal = exact.abs() >= torch.finfo(torch.float32).tiny
    return err[normal & exact.isfinite()]


def measure(device: str, n: int, seed: int = 0) -> dict[str, dict[str, float]]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (f32, f64, sample) in FUNCTIONS.items():
        err = ulp_errors(f32, f64, sample(n, g).to(device)).cpu()
        out[name] = {"max_abs_ulp": err.abs().max().item(), "mean_ulp": err.mean().item(),
                     "share_above": (err > 0).double().mean().item(), "n": err.numel()}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n", type=int, default=1 << 24, help="arguments per function")
    args = p.parse_args(argv)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device {name}, torch {torch.__version__}, {args.n} arguments per function")
    print(f"{'function':8} {'max |err| ulp':>14} {'mean err ulp':>13} {'share above':>12}")
    for fn, r in measure(args.device, args.n).items():
        print(f"{fn:8} {r['max_abs_ulp']:14.3f} {r['mean_ulp']:13.4f} {r['share_above']:12.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
