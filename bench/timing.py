"""Timing: CUDA events on GPUs, the wall clock on CPUs, after a warm-up, in
interleaved rounds.

A *step* is one iteration of one benchmarked thing: an untimed ``setup`` (drop
the previous gradients; for the backward mode, run the forward) and the timed
``body``. A *sample* is the mean time of ``iters`` consecutive steps, with
``iters`` chosen in the warm-up so that a sample lasts at least
``min_sample_ms`` (so that launch-bound cases are not timer noise). The
samples of all providers are taken round-robin, one per provider per round,
the order rotated each round, so that drift (clock boost, thermal state,
other processes on a shared CPU) hits every provider alike. We report the
median and the 20th / 80th percentiles of the samples.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch


# A sample's wall time (setups included) stays under this many min_sample_ms.
MAX_SAMPLE_WALL = 5


def _nothing() -> None:
    return None


@dataclass
class Step:
    body: Callable[[], object]
    setup: Callable[[], None] = _nothing      # untimed, before each body
    teardown: Callable[[], None] = _nothing   # untimed, after a sample (or a failure)


class Clock:
    """Milliseconds per step on ``device``: CUDA events around each body (the
    GPU time between them, launch gaps included), or ``time.perf_counter``."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.method = "CUDA events around each timed body" if self.cuda else "wall clock (time.perf_counter)"

    def time(self, step: Step, iters: int) -> float:
        if self.cuda:
            events = []
            for _ in range(iters):
                step.setup()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step.body()
                end.record()
                events.append((start, end))
            torch.cuda.synchronize()
            step.teardown()
            return sum(s.elapsed_time(e) for s, e in events) / iters
        total = 0.0
        for _ in range(iters):
            step.setup()
            t0 = time.perf_counter()
            step.body()
            total += time.perf_counter() - t0
        step.teardown()
        return 1e3 * total / iters


@dataclass
class Warmup:
    first_ms: float          # the first call: compilation and autotuning land here
    iters: int               # steps per sample
    warnings: list[str] = field(default_factory=list)


def warm_up(step: Step, clock: Clock, *, warmup: int, min_sample_ms: float, max_iters: int) -> Warmup:
    """Run ``step`` 1 + ``warmup`` times and pick the steps per sample:
    enough for ``min_sample_ms`` of timed bodies, at most ``max_iters``, and
    few enough that setups do not stretch a sample past ``MAX_SAMPLE_WALL``
    times that.
    Warnings raised by the first call (e.g. a peer falling back to a slow
    path) are returned so that the report can show them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = clock.time(step, 1)
    t0 = time.perf_counter()
    times = [clock.time(step, 1) for _ in range(warmup)]
    wall_ms = 1e3 * (time.perf_counter() - t0) / max(warmup, 1)   # setup included
    per_step = min(times) if times else first
    iters = max(1, min(max_iters, math.ceil(min_sample_ms / max(per_step, 1e-6)),
                       # an expensive setup (the backward mode's forward) must not stretch a sample
                       int(MAX_SAMPLE_WALL * min_sample_ms / max(wall_ms, 1e-6))))
    msgs = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
    return Warmup(first_ms=first, iters=iters, warnings=msgs)


def interleaved(steps: dict[str, Step], iters: dict[str, int], clock: Clock, *, rounds: int,
                min_rounds: int, deadline: float | None, on_error: Callable[[str, BaseException], None],
                max_rounds: dict[str, int] | None = None):
    """Samples (ms per step) of every step, ``rounds`` round-robin rounds, fewer
    (but at least ``min_rounds``) when ``time.monotonic()`` passes ``deadline``;
    at most ``max_rounds[name]`` samples of a step named there (a slow baseline).
    A step that raises is reported through ``on_error`` and dropped.
    Returns ``(samples, interrupted)``: a KeyboardInterrupt (an outer time
    limit's SIGINT) ends the sampling with the samples taken so far."""
    live = list(steps)
    cap = max_rounds or {}
    samples: dict[str, list[float]] = {name: [] for name in steps}
    try:
        for r in range(rounds):
            if r >= min_rounds and deadline is not None and time.monotonic() > deadline:
                break
            k = r % max(len(live), 1)
            for name in live[k:] + live[:k]:
                if len(samples[name]) >= cap.get(name, rounds):
                    continue
                try:
                    samples[name].append(clock.time(steps[name], iters[name]))
                except Exception as e:  # noqa: BLE001  (reported, the others go on)
                    on_error(name, e)
                    live.remove(name)
    except KeyboardInterrupt:
        return samples, True
    return samples, False


def summarize(samples: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80) of the samples in ms; NaN when there are none."""
    if not samples:
        return math.nan, math.nan, math.nan
    p20, med, p80 = np.percentile(np.asarray(samples, dtype=np.float64), [20, 50, 80])
    return float(med), float(p20), float(p80)
