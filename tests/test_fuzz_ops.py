"""Bounded fuzzing of the compiled ops' entry points: no crash, only exceptions."""
import os
import subprocess
import sys

import pytest

from nnk.ops import has_extension

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.skipif(not has_extension(), reason="nnk._C not built")
def test_fuzz_compiled_ops_never_crash(device):
    seconds = os.environ.get("NNK_FUZZ_SECONDS", "20")
    out = subprocess.run([sys.executable, os.path.join(HERE, "fuzz_ops.py"), seconds, device.type],
                         capture_output=True, text=True, timeout=float(seconds) + 300)
    assert out.returncode == 0, f"fuzzer died (rc={out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    print(out.stdout.strip())
    assert "calls returned" in out.stdout
