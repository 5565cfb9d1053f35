"""The providers of the neural-collapse statistics suite (op ``nc_stats``).

- ``nnk-nc_stats``: ``nnk.nc_stats(H, y, K)`` (exact two-pass statistics),
  when this nnk has it;
- ``bound-gemm``: one ``H.T @ H`` in the input dtype (cuBLAS on GPUs), the
  GEMM that the statistics cannot beat;
- ``paper-loop``: the per-class Python loop + CPU pseudo-inverse of the
  neural-collapse paper's code, from ``bench/nc_baseline.py`` when present.

Each is one forward step (mode ``fwd``); a missing one is reported, not an error.
"""
from __future__ import annotations

import importlib.util

import torch

from .providers import OK, Check, Provider, Run
from .shapes import NC_OP, Case
from .timing import Step


class NCInputs:
    """Features H (N, D) standard normal in ``dtype`` and uniform labels in [0, K)."""

    def __init__(self, case: Case, device: torch.device, dtype: torch.dtype, seed: int = 0):
        gen = torch.Generator(device=device).manual_seed(seed)
        self.h = torch.randn(case.N, case.D, device=device, dtype=dtype, generator=gen)
        self.y = torch.randint(0, case.C, (case.N,), device=device, generator=gen)


class NncStats(Provider):
    name, kind, op = "nnk-nc_stats", "nnk", NC_OP

    def check(self, case, device, dtype):
        import nnk

        if not hasattr(nnk, "nc_stats"):
            return Check("unavailable", "nnk.nc_stats not available in this nnk (issue 5)")
        return OK

    def build(self, case, inputs):
        import nnk

        return Run({"fwd": Step(lambda: nnk.nc_stats(inputs.h, inputs.y, case.C))})


class GramBound(Provider):
    name, kind, op = "bound-gemm", "bound", NC_OP

    def build(self, case, inputs):
        h = inputs.h
        return Run({"fwd": Step(lambda: torch.mm(h.t(), h))})

    def notes(self, case):
        return "one H.T@H in the input dtype"


class PaperLoop(Provider):
    name, kind, op = "paper-loop", "peer", NC_OP
    entry = "paper_nc_stats"

    def check(self, case, device, dtype):
        if importlib.util.find_spec("bench.nc_baseline") is None:
            return Check("unavailable", "bench/nc_baseline.py (the paper's per-class loop) is not in this checkout")
        from . import nc_baseline

        if not hasattr(nc_baseline, self.entry):
            return Check("unavailable", f"bench.nc_baseline has no {self.entry}(features, labels, num_classes)")
        return OK

    def build(self, case, inputs):
        from . import nc_baseline

        fn = getattr(nc_baseline, self.entry)
        return Run({"fwd": Step(lambda: fn(inputs.h, inputs.y, case.C))})


def nc_providers() -> list[Provider]:
    return [NncStats(), GramBound(), PaperLoop()]
