"""Block sizes, autotuning candidates and work-splitting heuristics of the
Triton cosine cross-entropy.

Under ``TRITON_INTERPRET=1`` (CPU) every kernel gets exactly one config: the
interpreter cannot autotune over several, and its cost is mostly per op and
per device-function call, not per element, so 64 x 256 tiles (few of them)
run fastest there. On GPUs ``@triton.autotune`` picks among the candidates
below per GPU model (launch.PerDeviceAutotune) and per key: N and C rounded
up to powers of two (launch.shape_buckets), D, the kernel's constexpr flags
(options, loop order, gradients asked for) and the tensors' dtypes. In
deterministic mode the first candidate is used without autotuning, so that
a fresh process cannot pick other block sizes (and hence another summation
order) than the last one.
"""
from __future__ import annotations

import math
import os

import torch
import triton

from ..._options import env_flag

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def split_grad() -> bool:
    """16-bit inputs: the d-logit operand of the backward contractions as hi +
    lo halves (two tensor-core dots each, about float32-accurate gradients,
    within 2x of the float32-accumulating reference; float32 operands below
    D = 16, see backward.SPLIT_OPERANDS_MIN_D) unless
    NNK_TRITON_FAST_GRAD=1 (one rounding to the input dtype: 2 of 5 backward
    dots fewer, about 2x the reference's error on bf16 gradients). See
    tile._grad_operand. Read at each backward (NNK_TRITON_GRAD_FILTER and
    NNK_TRITON_GEMM_BACKWARD are read when the forward runs)."""
    return not env_flag("NNK_TRITON_FAST_GRAD")


def gemm_backward() -> bool:
    """NNK_TRITON_GEMM_BACKWARD=1: the backward of the Triton forward by the
    extension's chunked-GEMM op (nnk::cosine_cross_entropy_bwd: per block of
    rows x classes a cuBLAS GEMM recomputes the logits, one fused epilogue turns them into
    d cos, two GEMMs give d x and d W) instead of the Triton backward kernel.
    That kernel read-modify-writes a BLOCK_N x D float32 d x slice per
    (row block, class tile): at D = 4096 about 80 flop per byte of it, and
    the resident programs' slices outgrow L2, so it may be memory-bound
    there (an estimate: untimed). A switch for the first GPU session to time
    both, not an exact mode: the GEMM's logits differ in their last bits from
    the Triton forward's, whose lse the backward takes, which cost float32
    gradients 2.7x the reference's error (median of 10 seeds, 5.7x at worst;
    s = 64, ArcFace; README). Read when the forward runs."""
    return env_flag("NNK_TRITON_GEMM_BACKWARD")


def no_autotune() -> bool:
    """NNK_TRITON_NO_AUTOTUNE=1: launch the first candidate (FIXED_FWD /
    FIXED_BWD, the deterministic mode's block sizes) instead of autotuning.
    Autotuning compiles and times every candidate once per key (options,
    dtypes, D, size buckets): a run of many small problems, each seen once
    (a test suite: about 100 keys, 550 compiles of 1-4 s), spends its time
    compiling. Read at each launch."""
    return env_flag("NNK_TRITON_NO_AUTOTUNE")


# Opt-in sparse backward (NNK_TRITON_GRAD_FILTER): tiles of d logits whose
# every entry is negligible skip their d x and d W contractions (two of the
# backward's three dots and their float32 read-modify-writes), as
# cut-cross-entropy skips tiles of small softmax values, but with a threshold
# that bounds the error: an entry is negligible below tolerance / C times
# the batch's largest ||d cos_i||_1, so that no gradient row loses more than
# the tolerance times that (backward.cce_backward, step 0). "1" means 2^-12,
# another value in (0, 1) is the tolerance itself, "0" or unset: exact.
DEFAULT_GRAD_FILTER = 2.0**-12


def grad_filter() -> float:
    """The tolerance NNK_TRITON_GRAD_FILTER asks for (0: off), read at each
    call as NNK_GRAD_IN_FORWARD is."""
    value = os.environ.get("NNK_TRITON_GRAD_FILTER", "0")
    try:
        tol = DEFAULT_GRAD_FILTER if value == "1" else float(value)
    except ValueError:
        tol = -1.0
    if not 0.0 <= tol < 1.0:
        raise ValueError(f"NNK_TRITON_GRAD_FILTER={value!r}: expected 0 (off), 1 (on, tolerance 2^-12) "
                         "or a tolerance in (0, 1)")
    return tol


# Bytes of float32 scratch the backward aims at per gradient accumulator: the
# d xn partials of the class splits (at least one (N, D) buffer) and the d wn
# partials of one class chunk (with the deterministic mode's d s, d b ones).
# Above it the classes are processed in chunks, so peak memory does not grow
# with C * D: it must stay below 5% of the N x C float32 logits (215 MB at
# N = 8192, C = 131072).
SCRATCH_BYTES = 64 << 20

# Block sizes the split heuristics assume (the autotuned ones vary around them).
NOMINAL_BLOCK_N = 64
NOMINAL_BLOCK_C = 128


def _cfg(bn: int, bc: int, bd: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_N": bn, "BLOCK_C": bc, "BLOCK_D": bd}, num_warps=warps, num_stages=stages)


if INTERPRET:
    FWD_CONFIGS = [_cfg(64, 256, 64, 4, 1)]
    BWD_CONFIGS = [_cfg(64, 256, 64, 4, 1)]
else:
    # Candidates for Hopper (H100/H200) and Ampere (A100). Register pressure,
    # not shared memory, is the limit: ptxas (triton's, -v) reports 255
    # registers for nearly all of these, and BLOCK_D = 32 keeps the spills
    # smallest. Backward, row-major, measured for sm_80/86/90: 16-bit configs
    # 0-1.7 KB of spill stores; float32 0.4-1.8 KB, but 31-39 KB for 64x128x64
    # (which ptxas then compiles at 32 registers), and on sm_80 12 KB for
    # 64x64x32; the float16 upcast variant (rows below eps) 0.6-3 KB, 46-53 KB
    # for 64x128x64 and, on sm_80 only, 11 KB for 128x64x32 = FIXED_BWD (the
    # deterministic mode's config). The autotuner discards slow candidates
    # (prune_backward drops the float32-operand 64x128x64 before timing);
    # the deterministic mode cannot. Shared memory peaks at 131,072 B (forward
    # 128x128x64, float32 on sm_80), within an A100's 163 KB
    # (test_kernels_compile_for_gpus checks every config; sm_86/89's 99 KB
    # make the autotuner skip the largest). Untimed so far: the first GPU
    # session tunes this list.
    FWD_CONFIGS = [
        _cfg(128, 128, 32, 8, 3),
        _cfg(64, 128, 32, 4, 4),
        _cfg(128, 128, 64, 8, 3),
        _cfg(128, 256, 32, 8, 3),
        _cfg(64, 64, 64, 4, 3),
    ]
    # Backward: the logit tile, its gradient (hi and lo halves) and one
    # BLOCK_N x BLOCK_D (or BLOCK_C x BLOCK_D) update live at once.
    BWD_CONFIGS = [
        _cfg(128, 64, 32, 8, 3),
        _cfg(64, 64, 32, 4, 3),
        _cfg(64, 128, 32, 4, 3),
        _cfg(128, 128, 32, 8, 3),
        _cfg(64, 128, 64, 4, 3),
    ]

FIXED_FWD = FWD_CONFIGS[0]
FIXED_BWD = BWD_CONFIGS[0]


def prune_backward(candidates: list, named_args: dict, **kwargs) -> list:
    """The backward's autotune candidates for one call (triton.autotune's
    early_config_prune): with float32 dot operands (DOT_PRECISION "ieee":
    float32 inputs, or 16-bit tiles upcast) the dots run on FMA units, and
    the BLOCK_D = 64 candidate leaves ptxas 32 registers and 10-12 KB of
    stack per thread on sm_90 (31-53 KB on sm_80; compiled for those targets
    without a GPU, untimed): it could only lose, after costing a compile and
    slow timed runs. Kept where nothing else is left (the interpreter's one
    config)."""
    precision = kwargs.get("DOT_PRECISION", named_args.get("DOT_PRECISION"))
    if precision != "ieee":
        return candidates
    return [c for c in candidates if c.kwargs["BLOCK_D"] < 64] or candidates


def rowwise_blocks(d: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_D) of the row-wise kernels (norms, normalization
    backward): memory-bound, so wide enough rows for coalesced loads and about
    4K elements in flight per program."""
    block_d = min(triton.next_power_of_2(max(d, 1)), 128 if INTERPRET else 512)
    block_r = max(1, min(64, 4096 // block_d))
    return block_r, block_d


def num_splits(major: int, minor: int, minor_block: int, device: torch.device,
               bytes_per_split: int = 0) -> int:
    """How many programs share one major block (rows or classes) by splitting
    the minor axis: enough to put about two programs on every SM when the
    major axis alone is short (e.g. N = 1024 rows against a million classes),
    at most one per minor tile, and at most SCRATCH_BYTES of per-split
    partial buffers. One on the CPU, where the interpreter runs programs one
    after another anyway."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = math.ceil(2 * sms / max(major, 1))
    cap = SCRATCH_BYTES // bytes_per_split if bytes_per_split else want
    return max(1, min(want, triton.cdiv(minor, minor_block), cap))


def class_major_split(n: int, c: int, d: int, device: torch.device, with_dw: bool) -> tuple[int, int]:
    """(parts, chunk) of the deterministic mode's class-major pass: row splits
    per class block, and classes per launch, such that the float32 partials
    live at once, (parts, chunk, D) d wn (``with_dw``) and two (parts, chunk)
    d s, d b, stay within SCRATCH_BYTES. The splits are counted for the
    chunk of one part and then capped so that a chunk of 256 classes fits
    (7 parts at D = 8192): uncapped, 17 parts on an H100 took the 256-class
    floor of the chunk past the budget (136 MiB at D = 8192)."""
    per_class = 4 * ((d if with_dw else 0) + 2)
    one_part = min(c, max(256, SCRATCH_BYTES // per_class // 256 * 256))
    parts = num_splits(triton.cdiv(one_part, NOMINAL_BLOCK_C), n, NOMINAL_BLOCK_N, device)
    parts = max(1, min(parts, SCRATCH_BYTES // (per_class * 256)))
    chunk = min(c, max(256, SCRATCH_BYTES // (per_class * parts) // 256 * 256))
    # The chunk came out smaller than the splits were counted for (rounded to
    # 256 classes): count them again for it, within what the budget leaves
    # (at D = 4096 on an H100: 15 parts instead of 9).
    parts = num_splits(triton.cdiv(chunk, NOMINAL_BLOCK_C), n, NOMINAL_BLOCK_N, device)
    return max(1, min(parts, SCRATCH_BYTES // (per_class * chunk))), chunk


def class_chunk(c: int, d: int) -> int:
    """Classes per launch of the row-major backward pass so that its float32
    (chunk, D) d wn buffer stays within SCRATCH_BYTES (a multiple of 256
    classes; 2048 at D = 8192)."""
    return min(c, max(256, SCRATCH_BYTES // (4 * d) // 256 * 256))
