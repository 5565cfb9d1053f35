"""Gradient error of ArcFace on rows close to their class, per impl, against
the float32 reference: the measurement behind README's ArcFace paragraph.

Rows 0.015-0.045 rad from their class's weight row (norms 1-4), float32,
s = 8, m = 0.5, ``reduction="mean"``; error = max |d x - truth| / max |truth|,
truth the float64 reference on the same float32 inputs.

    python -m bench.arcface_near_rows --seeds 20 [--impls torch,triton,cuda]

prints one JSON line per (margin_grad, impl): the median error, the float32
reference's median, the largest per-seed ratio to the reference's and the
seeds past 2x; and the versions. Triton on a CPU needs TRITON_INTERPRET=1.
"""
from __future__ import annotations

import argparse
import json
import platform

import torch

import nnk
from nnk.reference import cosine_cross_entropy_ref


def near_rows(seed: int, n: int = 32, d: int = 3, c: int = 16, theta: float = 0.03):
    """(x, w, t) float32: x_i = r_i (w_t / |w_t| + delta_i), delta_i orthogonal
    to w_t with |delta_i| in [theta / 2, 3 theta / 2], r_i in [1, 4]."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c, d, generator=g, dtype=torch.float64)
    t = torch.randint(0, c, (n,), generator=g)
    wn = w / w.norm(dim=1, keepdim=True)
    delta = torch.randn(n, d, generator=g, dtype=torch.float64)
    delta -= (delta * wn[t]).sum(1, keepdim=True) * wn[t]
    delta *= theta * (0.5 + torch.rand(n, 1, generator=g, dtype=torch.float64)) / delta.norm(dim=1, keepdim=True)
    x = (wn[t] + delta) * (1 + 3 * torch.rand(n, 1, generator=g, dtype=torch.float64))
    return x.float(), w.float(), t


def dx(fn, x, w, t, **kw):
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    fn(x, w, t, **kw).backward()
    return x.grad.double()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--impls", default="torch,triton,cuda")
    args = parser.parse_args(argv)
    for margin_grad in ("exact", "detached"):
        kw = dict(scale=8.0, angular_margin=0.5, margin_grad=margin_grad)
        errs = {"reference": []}
        for seed in range(args.seeds):
            x, w, t = near_rows(seed)
            truth = dx(cosine_cross_entropy_ref, x.double(), w.double(), t, **kw)

            def err(g):
                return float((g - truth).abs().max() / truth.abs().max())

            errs["reference"].append(err(dx(cosine_cross_entropy_ref, x, w, t, **kw)))
            for impl in args.impls.split(","):
                errs.setdefault(impl, []).append(
                    err(dx(lambda *a, **k: nnk.cosine_cross_entropy(*a, impl=impl, **k), x, w, t, **kw)))
        ref = torch.tensor(errs.pop("reference"))
        for impl, e in errs.items():
            e = torch.tensor(e)
            print(json.dumps({
                "margin_grad": margin_grad, "impl": impl, "seeds": args.seeds,
                "median_dx_error": float(e.median()), "reference_median": float(ref.median()),
                "max_ratio": float((e / ref).max()), "seeds_past_2x": int((e > 2 * ref).sum()),
                "nnk": nnk.__version__, "torch": torch.__version__, "python": platform.python_version(),
            }))


if __name__ == "__main__":
    main()
