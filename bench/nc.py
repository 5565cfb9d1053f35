"""The providers of the neural-collapse statistics suite (op ``nc_stats``).

- ``nnk-nc_stats-<impl>``: ``nnk.nc_stats(H, y, K, impl=...)`` (exact two-pass
  statistics: class counts, means, Sigma_W, Sigma_B), each impl that runs here;
- ``nnk-nc_metrics``: ``nnk.nc_metrics_from_stats(nnk.nc_stats(H, y, K))``,
  statistics and NC1 / NC2 equinorm / equiangularity: the output of
  ``paper-loop`` and more, with nnk's default impl;
- ``paper-loop``: ``bench.nc_baseline.nc_paper_baseline``, the
  neural-collapse paper's way: two passes of mini-batches with a Python loop
  over the classes, then NC1 with scipy's pinv of the D x D Sigma_B on the CPU;
  slow: one untimed call, then ``--min-rounds`` (3) samples;
- ``bound-gemm``: one ``H.T @ H`` in the input dtype (cuBLAS on GPUs), the
  GEMM that the statistics cannot beat.

Each is one forward step (mode ``fwd``); a missing one is reported, not an error.
"""
from __future__ import annotations

import importlib.util

import torch

from .providers import OK, Check, Provider, Run, impl_check
from .shapes import NC_OP, Case
from .timing import Step


class NCInputs:
    """Features H (N, D) in ``dtype``: class centers of norm about 3 sqrt(D)
    plus unit noise (separated classes, as the statistics are meant for), and
    balanced labels in [0, K)."""

    def __init__(self, case: Case, device: torch.device, dtype: torch.dtype, seed: int = 0):
        gen = torch.Generator(device=device).manual_seed(seed)
        self.y = torch.arange(case.N, device=device) % case.C
        centers = 3.0 * torch.randn(case.C, case.D, device=device, generator=gen)
        noise = torch.randn(case.N, case.D, device=device, generator=gen)
        self.h = (centers[self.y] + noise).to(dtype)


class NncStats(Provider):
    kind, op = "nnk", NC_OP

    def __init__(self, impl: str):
        self.impl, self.name = impl, f"nnk-nc_stats-{impl}"

    def check(self, case, device, dtype):
        return impl_check(self.impl, device, dtype, "nc_class_sums")

    def build(self, case, inputs):
        import nnk

        return Run({"fwd": Step(lambda: nnk.nc_stats(inputs.h, inputs.y, case.C, impl=self.impl))})


class NncMetrics(Provider):
    name, kind, op = "nnk-nc_metrics", "nnk", NC_OP

    def build(self, case, inputs):
        import nnk

        return Run({"fwd": Step(lambda: nnk.nc_metrics_from_stats(nnk.nc_stats(inputs.h, inputs.y, case.C)))})

    def notes(self, case):
        return "nc_stats (impl auto) + nc_metrics_from_stats, no classifier"


class PaperLoop(Provider):
    name, kind, op = "paper-loop", "peer", NC_OP
    slow = True

    def check(self, case, device, dtype):
        if importlib.util.find_spec("bench.nc_baseline") is None:
            return Check("unavailable", "bench/nc_baseline.py (the paper's per-class loop) is not in this checkout")
        return OK

    def build(self, case, inputs):
        from .nc_baseline import nc_paper_baseline

        return Run({"fwd": Step(lambda: nc_paper_baseline(inputs.h, inputs.y, case.C))})

    def notes(self, case):
        return ("bench.nc_baseline.nc_paper_baseline (NC1, no classifier): per-class loops on the device, "
                "scipy pinv; slow: one untimed call, then --min-rounds samples")


class GramBound(Provider):
    name, kind, op = "bound-gemm", "bound", NC_OP

    def build(self, case, inputs):
        h = inputs.h
        return Run({"fwd": Step(lambda: torch.mm(h.t(), h))})

    def notes(self, case):
        return "one H.T@H in the input dtype"


def nc_providers() -> list[Provider]:
    # The bound first, as ce_providers: a case out of time keeps its ratio.
    return [GramBound(), NncStats("torch"), NncStats("triton"), NncStats("cuda"), NncMetrics(), PaperLoop()]
