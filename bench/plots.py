"""PNG plots of a results table: time and peak memory against C, one line per
provider, one figure per (family, variant, N, D, dtype) of the cosine
cross-entropy, one column per mode."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from .report import MODE_TITLES
from .shapes import CE_OP


def write_plots(rows: list[dict], out: Path, stem: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .providers import ce_providers

    # One color per provider across all figures.
    cmap = plt.get_cmap("tab20")
    color = {p.name: cmap((2 * i) % 20 + (2 * i) // 20) for i, p in enumerate(ce_providers())}
    groups = defaultdict(list)
    for r in rows:
        if r["op"] == CE_OP and r["status"] == "ok":
            groups[(r["family"], r["variant"], r["N"], r["D"], r["dtype"])].append(r)
    paths = []
    for (family, variant, n, d, dtype), rs in groups.items():
        modes = [m for m in ("fwdbwd", "fwd", "bwd") if any(r["mode"] == m for r in rs)]
        fig, axes = plt.subplots(2, len(modes), figsize=(5.2 * len(modes), 7.5), squeeze=False)
        providers = list(dict.fromkeys(r["provider"] for r in rs))
        for j, mode in enumerate(modes):
            for p in providers:
                pts = sorted((r["C"], r["median_ms"], r["peak_mb"]) for r in rs if r["provider"] == p and r["mode"] == mode)
                if not pts:
                    continue
                cs = [q[0] for q in pts]
                style = {"color": "black", "linestyle": "--"} if p == "bound-gemm" else {"color": color.get(p)}
                axes[0][j].plot(cs, [q[1] for q in pts], marker="o", label=p, **style)
                if p != "bound-gemm":
                    axes[1][j].plot(cs, [max(q[2], 1e-3) for q in pts], marker="o", label=p, **style)
            axes[0][j].set_title(f"{MODE_TITLES[mode]}: time")
            axes[1][j].set_title(f"{MODE_TITLES[mode]}: peak memory above inputs")
            axes[0][j].set_ylabel("median ms")
            axes[1][j].set_ylabel("MiB")
            for ax in (axes[0][j], axes[1][j]):
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_xlabel("C (classes)")
                ax.grid(True, which="both", alpha=0.3)
        axes[0][0].legend(fontsize=8)
        r0 = rs[0]
        fig.suptitle(f"{family} {variant}, N={n}, D={d}, {dtype} on {r0['device']}\n"
                     f"torch {r0['torch']}, nnk {r0['nnk']} @ {r0['git_commit']}", fontsize=10)
        fig.tight_layout()
        path = Path(out) / f"{stem}_{family}-{variant}-N{n}-D{d}_{dtype}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths
