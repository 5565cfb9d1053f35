"""``python -m nnk demo``: a linear head against a cosine head on a small problem.

Trains the same small MLP on scikit-learn's bundled digits (8x8 images, 10
classes; no download) twice, with the same seed, batches and budget: (a) with
an ``nn.Linear`` head and cross-entropy, (b) with ``nnk.CosineLinear`` and its
fused loss. Each epoch it records the training loss, the test accuracy and
the neural-collapse metrics of the penultimate (training-set) features; it
writes a plot and a JSON of every figure, and ends with the fused op's
throughput against the PyTorch reference on the device it ran on.

NC metrics are ``nnk.nc_metrics(features, labels, weight, bias)`` of the
penultimate features h (the same features for both heads) with the classifier
each head applies: (W, b) for the linear head, the normalized rows of W for
the cosine head (its logits are ``s * cos``, whose argmax is that of
``h @ normalize(W).T``: so its NC4 is its own prediction disagreement).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

import nnk
from nnk.functional import resolve_impl
from nnk.reference import cosine_cross_entropy_ref

HEADS = ("linear", "cosine")
NC_FIELDS = ("nc1", "nc2", "nc2_equinorm", "nc2_equiangular", "nc3", "nc3_duality", "nc4")
NUM_CLASSES = 10


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m nnk demo",
        description="Train a small MLP on scikit-learn's digits with an nn.Linear head and with "
        "nnk.CosineLinear (same seed and budget); report loss, test accuracy and neural-collapse "
        "metrics per epoch, write a plot and a JSON, and time the fused op against the reference.",
    )
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 60; 4 with --quick)")
    p.add_argument("--scale", type=float, default=None,
                   help="cosine head scale s (default: nnk.CosineLinear's, 8.19 for 10 classes)")
    p.add_argument("--margin", type=float, default=0.0, help="cosine head additive (CosFace) margin (default 0)")
    p.add_argument("--angular-margin", type=float, default=0.0,
                   help="cosine head angular (ArcFace) margin in radians (default 0)")
    p.add_argument("--out", default="nnk_out", help="output folder for demo.json and demo.png (default ./nnk_out)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the init and the batch order")
    p.add_argument("--batch-size", type=int, default=64, help="(default 64)")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate, cosine-annealed (default 0.05)")
    p.add_argument("--quick", action="store_true",
                   help="reduced run for CI: 4 epochs and a small throughput problem")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available")
    return dev


def _data(seed: int, device: torch.device):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
    mean, std = x_tr.mean(0), x_tr.std(0) + 1.0  # +1: constant border pixels
    as_x = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32, device=device)  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.int64, device=device)  # noqa: E731
    return as_x(x_tr), as_y(y_tr), as_x(x_te), as_y(y_te)


class _Net(nn.Module):
    """A 3-layer MLP body (penultimate features of dimension 64) and a head."""

    def __init__(self, head: nn.Module, d_in: int = 64, width: int = 256, d_feat: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, d_feat),
        )
        self.head = head

    def loss(self, x, y):
        h = self.body(x)
        if isinstance(self.head, nnk.CosineLinear):
            return self.head.loss(h, y)  # fused, margins included
        return F.cross_entropy(self.head(h), y)

    def predict(self, x):
        h = self.body(x)
        if isinstance(self.head, nnk.CosineLinear):
            return self.head.predict(h)[0].squeeze(1)
        return self.head(h).argmax(1)


def _build(kind: str, args, device) -> tuple[_Net, torch.optim.Optimizer, object]:
    torch.manual_seed(args.seed)  # same body (and same initial head weight) for both
    if kind == "linear":
        head = nn.Linear(64, NUM_CLASSES)
    else:
        head = nnk.CosineLinear(64, NUM_CLASSES, scale=args.scale, additive_margin=args.margin,
                                angular_margin=args.angular_margin)
    net = _Net(head).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    if kind == "cosine":
        # Keep the class rows on the unit sphere (weight decay would shrink them).
        nnk.project_after_step(opt, net)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    return net, opt, sched


@torch.no_grad()
def _evaluate(net: _Net, x_tr, y_tr, x_te, y_te) -> dict:
    h = net.body(x_tr)
    if isinstance(net.head, nnk.CosineLinear):
        weight, bias = F.normalize(net.head.weight, dim=1), net.head.bias
    else:
        weight, bias = net.head.weight, net.head.bias
    m = nnk.nc_metrics(h, y_tr, weight=weight, bias=bias, num_classes=NUM_CLASSES)
    out = {"test_acc": float((net.predict(x_te) == y_te).float().mean())}
    out.update({f: (None if getattr(m, f) is None else float(getattr(m, f))) for f in NC_FIELDS})
    return out


def _train(args, device, data, progress: bool) -> dict:
    from tqdm.auto import tqdm

    x_tr, y_tr, x_te, y_te = data
    runs = {k: _build(k, args, device) for k in HEADS}
    history = {k: {"epoch": [], "loss": [], "test_acc": [], **{f: [] for f in NC_FIELDS}} for k in HEADS}
    # One generator per head with the same seed: identical batch orders.
    gens = {k: torch.Generator().manual_seed(args.seed) for k in HEADS}
    n = x_tr.shape[0]
    bar = tqdm(range(1, args.epochs + 1), desc="demo", unit="epoch", disable=not progress)
    for epoch in bar:
        line = [f"epoch {epoch:3d}/{args.epochs}"]
        for k in HEADS:
            net, opt, sched = runs[k]
            perm = torch.randperm(n, generator=gens[k]).to(device)
            total = torch.zeros((), device=device)
            for i in range(0, n, args.batch_size):
                idx = perm[i:i + args.batch_size]
                loss = net.loss(x_tr[idx], y_tr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.detach() * idx.numel()
            sched.step()
            total = float(total)
            ev = _evaluate(net, x_tr, y_tr, x_te, y_te)
            rec = history[k]
            rec["epoch"].append(epoch)
            rec["loss"].append(total / n)
            for f, v in ev.items():
                rec[f].append(v)
            line.append(f"{k}: loss {total / n:.4f} acc {ev['test_acc']:.2%} "
                        f"NC1 {ev['nc1']:.3g} NC2 {ev['nc2']:.3g} NC3 {ev['nc3']:.3g}")
        msg = " | ".join(line)
        (bar.write if progress else print)(msg)
        bar.set_postfix({f"{k} acc": f"{history[k]['test_acc'][-1]:.1%}" for k in HEADS})
    bar.close()
    return history


def _time(fns: dict, device, repeats: int) -> dict:
    """Median seconds of each fn() after one warm-up call each, the calls
    interleaved (a, b, b, a, a, b, ...: the order alternates per round): a
    slow spell of a shared machine (CPU quotas stall these VMs for 10x a call
    now and then) then hits both sides alike instead of one side's whole
    series, and neither always runs on the other's leftover cache state."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for i in range(repeats):
        for name, fn in list(fns.items())[::1 if i % 2 == 0 else -1]:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - t0)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def _throughput(device: torch.device, quick: bool, args) -> dict:
    """Forward + backward of nnk.cosine_cross_entropy against
    nnk.reference.cosine_cross_entropy_ref (same arguments) on ``device``."""
    if device.type == "cuda":
        n, c, d, dtype, repeats = (4096, 32768, 256, torch.bfloat16, 5) if quick else \
                                  (8192, 131072, 512, torch.bfloat16, 10)
    else:
        n, c, d, dtype, repeats = (512, 2048, 64, torch.float32, 5) if quick else \
                                  (2048, 8192, 128, torch.float32, 7)
    g = torch.Generator(device=device).manual_seed(args.seed)
    x = torch.randn(n, d, device=device, generator=g).to(dtype).requires_grad_()
    w = torch.randn(c, d, device=device, generator=g).to(dtype).requires_grad_()
    t = torch.randint(0, c, (n,), device=device, generator=g)
    kw = dict(scale=nnk.modules.default_scale(c, additive_margin=0.2), additive_margin=0.2)
    impl = resolve_impl("auto", device, dtype)
    out = {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "N": n, "C": c, "D": d,
           "impl": impl, "repeats": repeats}

    def step(fn):
        def run():
            x.grad = w.grad = None
            fn(x, w, t, **kw).backward()
        return run

    steps = {"fused": step(nnk.cosine_cross_entropy), "reference": step(cosine_cross_entropy_ref)}
    if device.type == "cuda":
        for name, run in steps.items():
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            run()
            torch.cuda.synchronize(device)
            out[f"{name}_peak_extra_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    for name, sec in _time(steps, device, repeats).items():
        out[f"{name}_ms"] = 1e3 * sec
        out[f"{name}_rows_per_s"] = n / sec
    out["speedup"] = out["reference_ms"] / out["fused_ms"]
    return out


def _throughput_line(tp: dict) -> str:
    line = (f"throughput on {tp['device']} ({tp['dtype']}, N={tp['N']} C={tp['C']} D={tp['D']}, "
            f"forward+backward, median of {tp['repeats']} interleaved): nnk.cosine_cross_entropy [impl={tp['impl']}] "
            f"{tp['fused_ms']:.1f} ms ({tp['fused_rows_per_s']:,.0f} rows/s), reference "
            f"{tp['reference_ms']:.1f} ms ({tp['reference_rows_per_s']:,.0f} rows/s): "
            f"{tp['speedup']:.2f}x")
    if "fused_peak_extra_mib" in tp:
        line += (f"; peak extra memory {tp['fused_peak_extra_mib']:,.0f} MiB vs "
                 f"{tp['reference_peak_extra_mib']:,.0f} MiB")
    return line


def _plot(history: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for k, style in zip(HEADS, ("-o", "-s")):
        h = history[k]
        label = "nn.Linear head" if k == "linear" else "nnk.CosineLinear head"
        ax1.plot(h["epoch"], h["nc1"], style, ms=3, label=label)
        ax2.plot(h["epoch"], [100 * a for a in h["test_acc"]], style, ms=3, label=label)
    ax1.set(xlabel="epoch", ylabel="NC1 = tr(Σ_W Σ_B⁺)/K (train features)", yscale="log",
            title="within-class variability collapse")
    ax2.set(xlabel="epoch", ylabel="test accuracy (%)", title="digits, test split")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _checked_args(argv):
    """``(args, device)``, every value checked before any work (argparse's
    usage error, exit code 2, instead of a traceback mid-run)."""
    p = _parser()
    args = p.parse_args(argv)
    if args.epochs is None:
        args.epochs = 4 if args.quick else 60
    if args.epochs < 1:
        p.error("--epochs must be >= 1")
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if not 0.0 < args.lr < math.inf:
        p.error(f"--lr must be a positive finite number, got {args.lr}")
    try:
        # The head's own checks of the margins (their range first: default_scale
        # would otherwise report an out-of-range one as "no positive logit gap"),
        # then of the scale.
        nnk.CosineLinear(1, NUM_CLASSES, scale=1.0, additive_margin=args.margin,
                         angular_margin=args.angular_margin)
        if args.scale is None:
            args.scale = nnk.modules.default_scale(NUM_CLASSES, additive_margin=args.margin,
                                                   angular_margin=args.angular_margin)
        nnk.CosineLinear(1, NUM_CLASSES, scale=args.scale, additive_margin=args.margin,
                         angular_margin=args.angular_margin)
        device = _device(args.device)
    except (ValueError, TypeError, RuntimeError) as e:
        p.error(str(e))
    try:
        os.makedirs(args.out, exist_ok=True)
        if not os.access(args.out, os.W_OK):
            raise PermissionError(f"{args.out} is not writable")
    except OSError as e:
        p.error(f"--out {args.out}: {e}")
    return args, device


def main(argv=None) -> int:
    args, device = _checked_args(argv)
    start = time.perf_counter()
    print(f"nnk {nnk.__version__} demo on {device} (torch {torch.__version__}); digits, "
          f"{args.epochs} epochs; cosine head s={args.scale:.3g} margin={args.margin} "
          f"angular_margin={args.angular_margin}")

    data = _data(args.seed, device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # Matrices of 64 x 256: thread start-up costs more than the work (10x
        # CPU time per step on a busy 2-core machine). The throughput
        # measurement below uses all threads again.
        torch.set_num_threads(1)
    try:
        history = _train(args, device, data, progress=not args.no_progress)
    finally:
        torch.set_num_threads(threads)

    print(f"\nafter {args.epochs} epochs      {'nn.Linear':>12} {'CosineLinear':>13}")
    rows = [("train loss", "loss", "{:.4f}"), ("test accuracy", "test_acc", "{:.2%}")]
    rows += [(f.upper().replace("_", " "), f, "{:.4g}") for f in NC_FIELDS]
    for label, key, fmt in rows:
        vals = [history[k][key][-1] for k in HEADS]
        print(f"{label:<24}" + "".join(f"{'n/a' if v is None else fmt.format(v):>13}" for v in vals))

    tp = _throughput(device, args.quick, args)
    png, js = os.path.join(args.out, "demo.png"), os.path.join(args.out, "demo.json")
    _plot(history, png)
    wall = time.perf_counter() - start
    report = {
        "nnk": nnk.__version__, "torch": torch.__version__, "device": str(device),
        "config": {k: v for k, v in vars(args).items() if k != "no_progress"},
        "nc_features": "penultimate training-set features; classifier (W, b) for the linear head, "
                       "normalize(W) rows for the cosine head",
        "heads": history,
        "final": {k: {key: history[k][key][-1] for key in history[k]} for k in HEADS},
        "throughput": tp,
        "wall_s": wall,
    }
    with open(js, "w") as f:
        json.dump(report, f, indent=1, allow_nan=True)
    print(f"\nwrote {png} and {js} ({wall:.0f} s)")
    print(_throughput_line(tp))
    bad = [k for k in HEADS if not all(math.isfinite(v) for v in history[k]["loss"])]
    return 1 if bad else 0
