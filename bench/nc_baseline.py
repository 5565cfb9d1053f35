"""The paper-style neural-collapse baseline that nnk's NC statistics are
timed against, and a CPU measurement of it against nnk and one ``H^T H``.

:func:`nc_paper_baseline` does what the normalized-neural-collapse paper's code
does (written here from the formulas, not copied): two passes over the data
in mini-batches with a Python loop over the classes in every batch (pass 1:
class sums; pass 2: ``Sigma_W += (h_c - mu_c)^T (h_c - mu_c)`` per class), then
``Sigma_W`` and ``Sigma_B`` go to the CPU and NC1 is ``tr(Sigma_W pinv(Sigma_B)) / K``
with scipy's pseudo-inverse of the D x D matrix; NC2 / NC3 from the classifier
Gram and ``W M^T`` against the simplex ETF. The tensors stay on their device
for the loops (the paper ran them on the GPU), so the harness can call it on
CUDA features too.

    python bench/nc_baseline.py --n 20000 --d 512 --k 100 --repeat 3

prints one JSON line: sizes, device, versions and the best-of-``repeat``
seconds of the baseline, of nnk's statistics + NC1-NC3 (no NC4), of nnk's
statistics alone (``nnk.nc_stats``), and of one ``H^T H`` (``torch.mm``) on the
same features.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import scipy
import scipy.linalg
import torch


def _etf(k: int) -> np.ndarray:
    return (np.eye(k) - np.ones((k, k)) / k) / np.sqrt(k - 1)


@torch.no_grad()
def nc_paper_baseline(features, labels, num_classes, weight=None, batch_size: int = 1024) -> dict:
    """NC1, NC2 (classifier vs ETF), NC3 (``W M^T`` vs ETF) the paper's way.

    features (N, D) float tensor on any device; labels (N,) int; weight
    (K, D) or None. Assumes every class has samples (as the paper's code does).
    Returns ``{"nc1": float, "nc2": float | None, "nc3": float | None}``.
    """
    n, d = features.shape
    dev = features.device
    sums = torch.zeros(num_classes, d, dtype=torch.float32, device=dev)
    counts = torch.zeros(num_classes, dtype=torch.int64, device=dev)
    # Pass 1: class means, one class at a time in every batch.
    for i in range(0, n, batch_size):
        h, y = features[i:i + batch_size].float(), labels[i:i + batch_size]
        for c in range(num_classes):
            idx = y == c
            if idx.any():
                sums[c] += h[idx].sum(0)
                counts[c] += int(idx.sum())
    means = sums / counts[:, None]
    # Pass 2: within-class scatter, one class at a time in every batch.
    sw = torch.zeros(d, d, dtype=torch.float32, device=dev)
    for i in range(0, n, batch_size):
        h, y = features[i:i + batch_size].float(), labels[i:i + batch_size]
        for c in range(num_classes):
            idx = y == c
            if idx.any():
                z = h[idx] - means[c]
                sw += z.T @ z
    sw = (sw / n).cpu().numpy().astype(np.float64)
    m = means.cpu().numpy().astype(np.float64)
    mu_g = (sums.sum(0) / n).cpu().numpy().astype(np.float64)
    mt = m - mu_g
    sb = mt.T @ mt / num_classes
    out = {"nc1": float(np.trace(sw @ scipy.linalg.pinv(sb)) / num_classes), "nc2": None, "nc3": None}
    if weight is not None:
        w = weight.detach().cpu().numpy().astype(np.float64)
        g = w @ w.T
        out["nc2"] = float(np.linalg.norm(g / np.linalg.norm(g) - _etf(num_classes)))
        a = w @ m.T
        out["nc3"] = float(np.linalg.norm(a / np.linalg.norm(a) - _etf(num_classes)))
    return out


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> dict:
    import nnk

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--impl", default="torch", help="nnk impl (torch on CPU)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    y = torch.arange(a.n) % a.k
    h = 3.0 * torch.randn(a.k, a.d, generator=g)[y] + torch.randn(a.n, a.d, generator=g)
    w = torch.randn(a.k, a.d, generator=g)

    ours = nnk.nc_metrics_from_stats(nnk.nc_stats(h, y, a.k, impl=a.impl), w)
    base = nc_paper_baseline(h, y, a.k, w)
    agree = {key: abs(getattr(ours, key) - base[key]) / abs(base[key]) for key in base}
    t_base = _best(lambda: nc_paper_baseline(h, y, a.k, w), a.repeat)
    t_nnk = _best(lambda: nnk.nc_metrics_from_stats(nnk.nc_stats(h, y, a.k, impl=a.impl), w), a.repeat)
    t_stats = _best(lambda: nnk.nc_stats(h, y, a.k, impl=a.impl), a.repeat)
    t_gram = _best(lambda: torch.mm(h.T, h), a.repeat)
    result = {
        "n": a.n, "d": a.d, "k": a.k, "dtype": "float32", "device": "cpu",
        "cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "numpy": np.__version__, "scipy": scipy.__version__, "nnk_impl": a.impl,
        "seconds": {"paper_baseline": t_base, "nnk_nc_metrics": t_nnk, "nnk_nc_stats": t_stats, "HtH_mm": t_gram},
        "speedup_vs_baseline": t_base / t_nnk, "stats_ratio_to_HtH": t_stats / t_gram,
        "relative_difference_nnk_vs_baseline": agree,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
