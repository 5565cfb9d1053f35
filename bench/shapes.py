"""The benchmark cases and the suites that group them.

A case is one problem size of one op: for the cosine cross-entropy (N, D, C)
with a scale and a margin variant; for the NC statistics (N, D, K), K stored
in ``C``. Suites list cases in the order they run, the most important first,
so that a run cut short by its time budget still has the headline figures.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

CE_OP = "cosine_cross_entropy"
NC_OP = "nc_stats"

# s = 20 is temperature 0.05 (pytorch-metric-learning's NormalizedSoftmaxLoss
# default); face recognition runs s = 64 with CosFace m = 0.35 or ArcFace m = 0.5.
PLAIN = {"variant": "plain", "scale": 20.0}
COSFACE = {"variant": "cosface", "scale": 64.0, "additive_margin": 0.35}
ARCFACE = {"variant": "arcface", "scale": 64.0, "angular_margin": 0.5}


@dataclass(frozen=True)
class Case:
    op: str
    family: str
    N: int
    D: int
    C: int
    variant: str = "-"
    scale: float = 1.0
    additive_margin: float = 0.0
    angular_margin: float = 0.0

    @property
    def id(self) -> str:
        if self.op == NC_OP:
            return f"{self.family}-N{self.N}-D{self.D}-K{self.C}"
        return f"{self.family}-{self.variant}-N{self.N}-D{self.D}-C{self.C}"

    def loss_kwargs(self) -> dict:
        """The keyword arguments of ``nnk.cosine_cross_entropy`` for this case."""
        return {"scale": self.scale, "additive_margin": self.additive_margin,
                "angular_margin": self.angular_margin}


def _ce(family: str, n: int, d: int, classes, *variants) -> list[Case]:
    return [Case(CE_OP, family, n, d, c, **v) for c in classes for v in variants]


def _nc(n: int, d: int, k: int) -> list[Case]:
    return [Case(NC_OP, "nc", n, d, k)]


SUITES: dict[str, list[Case]] = {
    # CPU-sized (CI smoke test, < 2 min on 2 cores): every provider and code path once.
    "quick": (
        _ce("vision", 256, 512, (10, 100, 1000), PLAIN)
        + _ce("face", 256, 128, (4096,), COSFACE, ARCFACE)
        + _nc(4096, 64, 16)
    ),
    # The families of "full" at sizes a 2-core CPU runs in a few minutes.
    "medium": (
        _ce("vision", 256, 512, (10, 100, 1000), PLAIN)
        + _ce("llm", 512, 256, (4096, 16384), PLAIN)
        + _ce("face", 256, 128, (8192, 32768), COSFACE, ARCFACE)
        + _nc(20000, 256, 100)
    ),
    # The shapes, for GPUs; headline shapes first.
    "full": (
        _ce("llm", 8192, 4096, (131072,), PLAIN)
        + _ce("face", 1024, 512, (1_000_000,), COSFACE, ARCFACE)
        + _ce("llm", 8192, 4096, (32000, 262144), PLAIN)
        + _ce("face", 1024, 512, (100_000,), COSFACE, ARCFACE)
        + _ce("vision", 256, 512, (10, 100, 1000), PLAIN)
        + _nc(100_000, 2048, 1000)
    ),
}


def select(cases: list[Case], patterns: list[str] | None) -> list[Case]:
    """The cases whose id matches one of the shell-style ``patterns`` (a bare
    family name such as ``face`` matches the whole family); all when None."""
    if not patterns:
        return list(cases)
    keep = [c for c in cases if any(p in (c.family, c.op) or fnmatch.fnmatch(c.id, p) for p in patterns)]
    if not keep:
        raise ValueError(f"--shapes {patterns} matches none of {[c.id for c in cases]}")
    return keep
