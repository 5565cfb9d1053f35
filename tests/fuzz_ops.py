"""Fuzzer of the compiled operators (torch.ops.nnk.*): every registered op is
called with arguments drawn by hypothesis from its schema, mostly malformed
(wrong ranks, dtypes, sizes, zero sizes, strides, NaN/negative scalars). The
process must survive: only Python exceptions are allowed. Run as a script (by
tests/test_fuzz_ops.py) so that a crash shows as a dead child process.

usage: python fuzz_ops.py SECONDS DEVICE
"""
import sys
import time

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nnk  # noqa: F401  (registers the ops)

SECONDS, DEVICE = float(sys.argv[1]), sys.argv[2]
OPS = sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("nnk::"))
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.bool]


@st.composite
def tensors(draw):
    dims = draw(st.lists(st.integers(0, 9), min_size=0, max_size=3))
    dtype = draw(st.sampled_from(DTYPES))
    t = (torch.randn(dims) * 10).to(dtype) if dtype.is_floating_point else torch.randint(-3, 12, dims).to(dtype)
    if t.numel() and dtype.is_floating_point and draw(st.booleans()):
        t.view(-1)[0] = draw(st.sampled_from([float("nan"), float("inf"), 0.0]))
    if t.dim() >= 2 and draw(st.booleans()):
        t = t.transpose(0, 1)  # non-contiguous
    return t.to(DEVICE)


def arg_strategy(arg):
    ty = str(arg.type)
    if ty == "Tensor":
        return tensors()
    if ty == "Tensor?":
        return st.none() | tensors()
    if ty == "float":
        return st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, -1.0, 1e-12])
    if ty == "int":
        return st.integers(-5, 2**40) | st.integers(-3, 12)
    if ty == "bool":
        return st.booleans()
    if ty == "SymInt[]" or ty == "int[]":
        return st.lists(st.integers(-2, 10), max_size=3)
    raise AssertionError(f"fuzzer does not know schema type {ty} ({arg.name})")


calls = {"ok": 0, "raised": 0}


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def fuzz(data):
    name = data.draw(st.sampled_from(OPS))
    op = getattr(torch.ops.nnk, name).default
    args = [data.draw(arg_strategy(a), label=a.name) for a in op._schema.arguments]
    try:
        op(*args)
        calls["ok"] += 1
    except (RuntimeError, TypeError, ValueError, IndexError, NotImplementedError):
        calls["raised"] += 1
    if DEVICE == "cuda":
        torch.cuda.synchronize()  # surface asynchronous device faults here


if __name__ == "__main__":
    assert OPS, "no nnk ops registered"
    deadline = time.monotonic() + SECONDS
    while time.monotonic() < deadline:  # batches of 100 examples until the time is up
        fuzz()
    print(f"fuzzed {len(OPS)} ops: {calls['ok']} calls returned, {calls['raised']} raised")
