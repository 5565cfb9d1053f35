"""Collectives, bytes and time per training step of nnk.distributed.ShardedCosineLinear.

Counts every collective of one forward + backward (name, dtype, elements per
rank) by wrapping the torch.distributed calls nnk makes, then times steps.
insightface's Partial FC moves the same feature all-gather / reduce-scatter
and three all-reduces of N floats in the loss.

    # CPU, gloo, 2 processes on this machine
    python bench/distributed_comm.py --spawn 2 --n 64 --d 128 --c 10000
    # GPUs (one process per GPU), NCCL
    torchrun --nproc-per-node=8 bench/distributed_comm.py --backend nccl --n 128 --d 512 --c 1000000
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import socket
import statistics
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist

from nnk.distributed import ShardedCosineLinear, collectives, rank_checks

LOG: list[tuple[str, str, str, int]] = []
PHASE = ["setup"]


def _counted(name, fn):
    def wrapper(*args, **kwargs):
        tensor = kwargs.get("tensor", kwargs.get("input_tensor", kwargs.get("input")))
        if tensor is None:
            # all_reduce(tensor), all_gather_single(out, in), reduce_scatter_single(out, in)
            tensor = args[0] if name == "all_reduce" else args[1]
        LOG.append((PHASE[0], name, str(tensor.dtype).replace("torch.", ""), tensor.numel()))
        return fn(*args, **kwargs)
    return wrapper


@contextmanager
def counting():
    saved = (dist.all_reduce, collectives._all_gather_single, collectives._reduce_scatter_single,
             rank_checks._all_gather_single)
    dist.all_reduce = _counted("all_reduce", saved[0])
    collectives._all_gather_single = _counted("all_gather", saved[1])
    collectives._reduce_scatter_single = _counted("reduce_scatter", saved[2])
    rank_checks._all_gather_single = _counted("all_gather(signature)", saved[3])
    try:
        yield
    finally:
        dist.all_reduce, collectives._all_gather_single, collectives._reduce_scatter_single, \
            rank_checks._all_gather_single = saved


def run(args):
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", torch.cuda.current_device()) if args.backend == "nccl" else torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(rank)
    head = ShardedCosineLinear(args.d, args.c, scale=64.0, angular_margin=0.5, label_smoothing=args.ls,
                               sample_rate=args.sample_rate, device=dev, dtype=torch.float32)
    feats = torch.randn(args.n, args.d, device=dev, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, args.c, (args.n,), device=dev)

    def step():
        loss = head(feats, labels)  # bf16/fp16 features: the fp32 weight is cast to their dtype
        PHASE[0] = "backward"
        loss.backward()
        PHASE[0] = "forward"

    PHASE[0] = "forward"
    with counting():
        step()
    times = []
    for _ in range(args.iters):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if rank == 0:
        elem = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8}
        print(f"world={world} backend={args.backend} N/rank={args.n} D={args.d} C={args.c} dtype={args.dtype} "
              f"label_smoothing={args.ls} sample_rate={args.sample_rate}")
        # Input tensor of each collective on one rank (a reduce-scatter's input is the whole gathered block).
        print(f"{'phase':9} {'collective':22} {'dtype':9} {'in elements':>13} {'in bytes':>10}")
        for phase, name, dt, numel in LOG:
            print(f"{phase:9} {name:22} {dt:9} {numel:13d} {numel * elem.get(dt, 4):10d}")
        loss_bytes = sum(n * elem.get(dt, 4) for ph, name, dt, n in LOG if name == "all_reduce" and ph == "forward")
        print(f"loss all-reduces: {loss_bytes} bytes in; insightface's 3 x N_global float32: "
              f"{3 * args.n * world * 4} bytes in")
        print(f"step fwd+bwd: median {statistics.median(times) * 1e3:.2f} ms over {args.iters}")
        if args.out:
            with open(args.out, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["world", "phase", "collective", "dtype", "input_elements"])
                w.writerows([world, *row] for row in LOG)


def _spawned(rank, world, port, args):
    dist.init_process_group(args.backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        run(args)
    finally:
        dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="gloo", choices=("gloo", "nccl"))
    p.add_argument("--device", default="cpu", help="device of the tensors with gloo (cpu or cuda)")
    p.add_argument("--spawn", type=int, default=0, help="start this many local processes (else: torchrun)")
    p.add_argument("--n", type=int, default=64, help="rows per rank")
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--c", type=int, default=10000)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--ls", type=float, default=0.0, help="label smoothing")
    p.add_argument("--sample-rate", type=float, default=1.0)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default="", help="CSV of the collectives")
    args = p.parse_args()
    if args.spawn:
        import torch.multiprocessing as mp

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_spawned, args=(args.spawn, port, args), nprocs=args.spawn)
        return
    if args.backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(args.backend)
    try:
        run(args)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
