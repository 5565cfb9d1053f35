"""Peak memory and time of ``impl="cuda"`` fwd+bwd at several block budgets
(``NNK_CHUNK_MB``), each in a fresh process (the allocator's cache of one
budget must not count for the next).

    python -m bench.chunk_budget                       # CPU: N=4096, C=200000, D=64, float32
    python -m bench.chunk_budget --device cuda --dtype bfloat16 -n 8192 -c 131072 -d 4096

Memory: ``bench.memory.PeakMemory`` (CPU: peak RSS over the step; CUDA:
max_memory_allocated), the smallest and largest of ``--reps`` runs; time: the
median of ``--reps`` steps (one thread on the CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _one(args) -> dict:
    import torch

    import nnk
    from bench.memory import PeakMemory
    from bench.timing import Step

    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if dev.type == "cpu":
        torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.n, args.d, generator=g).to(dev, dtype).requires_grad_(True)
    w = torch.randn(args.c, args.d, generator=g).to(dev, dtype).requires_grad_(True)
    t = torch.randint(0, args.c, (args.n,), generator=g).to(dev)

    def setup():
        x.grad = w.grad = None

    def body():
        setup()
        nnk.cosine_cross_entropy(x, w, t, scale=30.0, additive_margin=0.2, impl="cuda").backward()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    body()
    pm = PeakMemory(dev)
    peaks = [pm.measure(Step(body=body, setup=setup)) for _ in range(args.reps)]
    times = []
    for _ in range(args.reps):
        setup()
        sync()
        t0 = time.perf_counter()
        body()
        sync()
        times.append(time.perf_counter() - t0)
    budget = int(os.environ.get("NNK_CHUNK_MB") or 0) << 20
    return {"blocks": nnk.ops.cce_block_shape(args.n, args.c, args.d, dtype, dev.type, budget),
            "peak_mb": [min(peaks), max(peaks)], "step_s": statistics.median(times), "memory": pm.method}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.chunk_budget", description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=4096)
    ap.add_argument("-c", type=int, default=200_000)
    ap.add_argument("-d", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--budgets", default="0,64,16", help="MiB, comma-separated; 0: the default (256)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_one(args)))
        return 0
    logits_mb = args.n * args.c * 4 / 2**20
    grads_mb = (args.n + args.c) * args.d * (4 if args.dtype == "float32" else 2) / 2**20
    print(f"N={args.n} C={args.c} D={args.d} {args.dtype} on {args.device}: fp32 logits {logits_mb:.0f} MiB, "
          f"gradients of x and W {grads_mb:.0f} MiB")
    for mb in args.budgets.split(","):
        env = {k: v for k, v in os.environ.items() if k != "NNK_CHUNK_MB"}
        if int(mb):
            env["NNK_CHUNK_MB"] = mb
        cmd = [sys.executable, "-m", "bench.chunk_budget", "--child", *(argv if argv is not None else sys.argv[1:])]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        lo, hi = r["peak_mb"]
        print(f"NNK_CHUNK_MB={mb if int(mb) else 'unset (256)'}: blocks {tuple(r['blocks'])}, peak extra "
              f"{lo:.0f}-{hi:.0f} MiB ({hi / logits_mb:.1%} of the fp32 logits), median step {r['step_s']:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
