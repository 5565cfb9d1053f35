"""Peak memory of one step above what was allocated before its body.

GPU: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``
minus ``memory_allocated()`` just before the body: the inputs (and, for the
backward mode, the forward's saved tensors) are excluded; the gradients the
body creates are included. It counts tensor memory held by PyTorch's caching
allocator, not the allocator's reserve.

CPU: the peak resident set size (``VmHWM`` in /proc/self/status) during the
body, after resetting it to the current RSS (writing 5 to
/proc/self/clear_refs), minus the RSS at that moment. ``malloc_trim(0)`` runs
first so that memory freed earlier but still held by glibc (which would be
reused without raising the RSS, hiding the step's allocations) goes back to
the OS. It counts pages touched, so it is an upper bound on live tensor bytes
(allocator slack included) and it depends on the OS: Linux only, NaN elsewhere.
"""
from __future__ import annotations

import ctypes
import gc
import math

import torch

from .timing import Step

MB = 2.0 ** 20


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


class PeakMemory:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._trim = None
        if self.cuda:
            self.method = "torch.cuda.max_memory_allocated minus memory_allocated before the body"
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            _hwm_bytes()
            self.method = "peak RSS (VmHWM after clear_refs=5, malloc_trim first) minus RSS before the body"
        except OSError as e:
            self.method = f"unavailable ({e}); peak_mb is NaN"
            return
        try:
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
        except OSError:
            self.method += " (no malloc_trim: may under-count)"

    @property
    def available(self) -> bool:
        return self.cuda or not self.method.startswith("unavailable")

    def measure(self, step: Step) -> float:
        """MiB of one run of ``step.body`` above the memory in use before it."""
        if not self.available:
            return math.nan
        step.setup()
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step.body()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            if self._trim is not None:
                self._trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            base = _hwm_bytes()
            step.body()
            peak = _hwm_bytes() - base
        step.teardown()
        return peak / MB
