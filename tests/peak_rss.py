"""Peak extra RSS of one cosine cross-entropy loss, measured in a fresh
process (the tests of the CPU kernels' memory)."""
import json
import os
import subprocess
import sys
import textwrap

# Peak extra RSS of one loss (N, C, D from argv) on NNK_IMPL: of forward and
# backward, or with "bwd" in argv of the backward alone.
MEMORY_SCRIPT = textwrap.dedent("""
    import json, os, sys, torch, nnk
    def hwm_kb():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    def reset_peak():  # to the current RSS
        open("/proc/self/clear_refs", "w").write("5")
        return hwm_kb()
    torch.manual_seed(0)
    N, C, D = map(int, sys.argv[1:4])
    x = torch.randn(N, D, requires_grad=True)
    w = torch.randn(C, D, requires_grad=True)
    t = torch.randint(0, C, (N,))
    torch.set_num_threads(2)
    base = reset_peak()
    loss = nnk.cosine_cross_entropy(x, w, t, scale=30.0, additive_margin=0.2, impl=os.environ["NNK_IMPL"])
    if "bwd" in sys.argv:
        base = reset_peak()
    loss.backward()
    print(json.dumps({"peak_extra_mb": (hwm_kb() - base) / 1024, "logits_mb": N * C * 4 / 2**20,
                      "x_mb": N * D * 4 / 2**20, "loss": loss.item()}))
""")


# glibc raises its mmap threshold after large blocks are freed, so later
# tile-sized blocks come from the heap and stay resident after free: the peak
# RSS then counts allocator retention, not live tensors (measured in CI 195 to
# 329 MiB for the same code). A fixed threshold keeps every tile mmap'd and
# returned on free (195 MiB in 6 of 6 runs).
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def peak_memory(impl: str, n: int, c: int, d: int, *, backward_only: bool = False, env=None) -> dict:
    """``{"peak_extra_mb", "logits_mb", "x_mb", "loss"}`` of float32 (N, D)
    features on a (C, D) head with ``impl``, in a subprocess with
    FIXED_MMAP_THRESHOLD and ``env``."""
    args = [str(n), str(c), str(d)] + (["bwd"] if backward_only else [])
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, *args], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "NNK_IMPL": impl, **FIXED_MMAP_THRESHOLD, **(env or {})})
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(res)
    return res
