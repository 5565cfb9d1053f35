"""The CSV schema of the results, its writer, and the markdown summary.

``python -m bench.report RESULTS.csv`` rewrites the summary and the plots of
a results file (e.g. of a run that was cut short).

Columns (one row per case x provider x mode x dtype, in this order):
suite, op, case, family, variant, N, D, C (K for nc_stats), scale, provider,
kind, mode (fwd | bwd | fwdbwd), dtype, status (ok | unavailable | skipped |
error | oom), median_ms, p20_ms, p80_ms (of the samples), rounds (samples),
iters (steps per sample), peak_mb, tflops (model FLOPs / median), vs_bound
(median / bound-gemm's median, same case, mode and dtype), loss (one forward's
value, a check that every provider solved the same problem), device, torch,
triton, nnk, git_commit, timestamp (UTC, ISO 8601), notes.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
from collections import defaultdict
from pathlib import Path

from .roofline import grads_mb, logits_mb
from .shapes import CE_OP

SCHEMA = [
    "suite", "op", "case", "family", "variant", "N", "D", "C", "scale", "provider", "kind", "mode",
    "dtype", "status", "median_ms", "p20_ms", "p80_ms", "rounds", "iters", "peak_mb", "tflops",
    "vs_bound", "loss", "device", "torch", "triton", "nnk", "git_commit", "timestamp", "notes",
]
FLOAT_COLUMNS = ("scale", "median_ms", "p20_ms", "p80_ms", "peak_mb", "tflops", "vs_bound", "loss")
INT_COLUMNS = ("N", "D", "C", "rounds", "iters")
MODE_TITLES = {"fwdbwd": "fwd+bwd", "fwd": "fwd", "bwd": "bwd"}


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return str(v)


class CsvLog:
    """Appends rows to ``path`` as they are measured (a run cut short keeps
    what it measured); writes the header when the file is new."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists() or self.path.stat().st_size == 0:
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(SCHEMA)

    def write(self, rows: list[dict]) -> None:
        with open(self.path, "a", newline="") as f:
            w = csv.writer(f)
            for row in rows:
                if set(row) != set(SCHEMA):
                    raise ValueError(f"row keys differ from the schema: {set(row) ^ set(SCHEMA)}")
                w.writerow([_fmt(row[k]) for k in SCHEMA])


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != SCHEMA:
            raise ValueError(f"{path}: columns {reader.fieldnames} are not the schema {SCHEMA}")
        rows = list(reader)
    for r in rows:
        for k in FLOAT_COLUMNS:
            r[k] = float(r[k]) if r[k] not in ("", "nan") else math.nan
        for k in INT_COLUMNS:
            r[k] = int(r[k]) if r[k] else 0
    return rows


def _ms(r) -> str:
    if r is None or r["status"] != "ok":
        return "—" if r is None else r["status"]
    return f"{r['median_ms']:.4g} ({r['p20_ms']:.4g}–{r['p80_ms']:.4g})"


def _num(v, fmt="{:.3g}") -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def summary_markdown(rows: list[dict], command: str | None = None) -> str:
    """Per case and dtype: each provider's times per mode (median, p20–p80),
    TFLOP/s, time over the GEMM bound and peak memory of the main mode, and
    the time and memory ratios of every other provider to each nnk one; then
    the providers not measured and why. ``command``: the bench's command
    line, quoted under the title."""
    if not rows:
        return "(no rows)\n"
    r0 = rows[0]
    out = [f"# Benchmark summary: {r0['suite']} suite on {r0['device']}", "",
           f"torch {r0['torch']}, triton {r0['triton']}, nnk {r0['nnk']}, commit {r0['git_commit']}, "
           f"started {r0['timestamp']}. Times in ms: median (p20–p80) of interleaved samples. "
           "× bound = time / time of the bare GEMMs (bound-gemm) at the same case and mode.", ""]
    if command:
        out += [f"Command: `{command}`", ""]
    by_case = defaultdict(list)
    for r in rows:
        by_case[(r["case"], r["dtype"])].append(r)
    for (case, dtype), rs in by_case.items():
        modes = [m for m in ("fwdbwd", "fwd", "bwd") if any(r["mode"] == m for r in rs)]
        main = modes[0]
        cell = {(r["provider"], r["mode"]): r for r in rs}
        providers = list(dict.fromkeys(r["provider"] for r in rs))
        measured = [p for p in providers if any(cell.get((p, m), {}).get("status") == "ok" for m in modes)]
        n, c = rs[0]["N"], rs[0]["C"]
        title = f"## {case} ({dtype})"
        logits = logits_mb(n, c) if rs[0]["op"] == CE_OP else None
        out += [title, ""]
        head = ["provider"] + [f"{MODE_TITLES[m]} ms" for m in modes] + [
            f"TFLOP/s ({MODE_TITLES[main]})", f"× bound ({MODE_TITLES[main]})", f"peak MiB ({MODE_TITLES[main]})"]
        if logits:
            head += ["peak / fp32 logits", "peak − grads / fp32 logits"]
        head += (["loss"] if logits else []) + ["notes"]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for p in measured:
            m = cell.get((p, main))
            ok = m is not None and m["status"] == "ok"
            line = [p] + [_ms(cell.get((p, mode))) for mode in modes]
            line += [_num(m["tflops"]) if ok else "—", _num(m["vs_bound"], "{:.2f}") if ok else "—",
                     _num(m["peak_mb"], "{:.4g}") if ok else "—"]
            if logits:
                grads = grads_mb(n, c, rs[0]["D"], dtype, main)
                line += [_num(m["peak_mb"] / logits, "{:.1%}") if ok else "—",
                         _num((m["peak_mb"] - grads) / logits, "{:.1%}") if ok else "—"]
            line += ([_num(m["loss"], "{:.5g}") if ok else "—"] if logits else []) + [(m or {}).get("notes", "")]
            out.append("| " + " | ".join(line) + " |")
        ok_main = [cell[(p, main)] for p in measured if cell.get((p, main), {}).get("status") == "ok"]
        others = [o for o in ok_main if not o["provider"].startswith("nnk-") and o["kind"] != "bound"]
        # Memory compared beyond the gradients every provider returns (raw
        # peaks, ~1 GiB of gradients at the headline shapes, squeezed an 80x
        # gap in extra memory to ~8x); for the forward alone, the raw peaks.
        held = grads_mb(n, c, rs[0]["D"], dtype, main) if logits and main != "fwd" else 0.0
        for mine in (r for r in ok_main if r["provider"].startswith("nnk-")):
            if others:
                extra = mine["peak_mb"] - held
                parts = [f"{o['provider']} {o['median_ms'] / mine['median_ms']:.2f}×"
                         + (f" / {(o['peak_mb'] - held) / extra:.2f}×" if extra > 0 and math.isfinite(o["peak_mb"])
                            else "")
                         for o in others]
                memory = "(their peak − grads / its peak − grads)" if held else "(their peak / its peak)"
                out += ["", f"Speed-up of {mine['provider']} ({MODE_TITLES[main]}; their time / its time) and "
                            f"memory ratio {memory}: " + "; ".join(parts) + "."]
            # Their variants too: nnk-triton-fastgrad's like-for-like backward,
            # nnk-cuda-chunk64's memory at a smaller block budget.
            if logits and main == "fwdbwd" and mine["provider"].startswith(("nnk-triton", "nnk-cuda")):
                out += ["", _targets_line(mine, {o["provider"]: o for o in ok_main}, held, logits)]
        if logits and main != "fwd":
            out += ["", f"peak − grads: the peak beyond the gradients of x and W that the step returns "
                        f"((N + C)·D in {dtype}: {grads_mb(n, c, rs[0]['D'], dtype, main):.4g} MiB), the "
                        "memory that the target of < 5% of the fp32 logits is about."]
        missing = [(p, cell.get((p, main)) or next(r for r in rs if r["provider"] == p)) for p in providers if p not in measured]
        if missing:
            out += ["", "Not measured: " + "; ".join(f"{p} ({r['status']}: {r['notes']})" for p, r in missing) + "."]
        out.append("")
    return "\n".join(out)


def _targets_line(mine: dict, by_provider: dict[str, dict], held: float, logits: float) -> str:
    """The issues' three targets for one nnk provider's fwd+bwd row: within
    1.35x of the GEMM bound, >= 1.5x faster than torch.compile of the
    reference (ref-compile; its GEMMs are float32 for 16-bit inputs, so
    torch-compile, the 16-bit head, is quoted beside it as the like-for-like
    baseline), peak beyond the gradients < 5% of the fp32 logits."""
    def verdict(ok: bool) -> str:
        return "met" if ok else "not met"

    parts = []
    if math.isfinite(mine["vs_bound"]):
        parts.append(f"{mine['vs_bound']:.2f}× the GEMM bound (≤ 1.35: {verdict(mine['vs_bound'] <= 1.35)})")
    else:
        parts.append("× bound not measured")
    for name, target in (("ref-compile", 1.5), ("torch-compile", None)):
        o = by_provider.get(name)
        if o is None and name == "torch-compile" and mine["dtype"] == "float32":
            continue   # the same computation as ref-compile in float32 (skipped)
        if o is None:
            parts.append(f"{name} not measured")
            continue
        ratio = o["median_ms"] / mine["median_ms"]
        judged = f" (≥ {target}: {verdict(ratio >= target)})" if target else " (16-bit GEMMs, like for like)"
        parts.append(f"{ratio:.2f}× faster than {name}{judged}")
    if math.isfinite(mine["peak_mb"]):
        frac = (mine["peak_mb"] - held) / logits
        parts.append(f"peak − grads {frac:.1%} of the fp32 logits (< 5%: {verdict(frac < 0.05)})")
    return f"Targets of {mine['provider']} (fwd+bwd): " + "; ".join(parts) + "."


def write_summary(rows: list[dict], path: Path, command: str | None = None) -> Path:
    Path(path).write_text(summary_markdown(rows, command))
    return Path(path)


def recorded_command(csv_path: Path) -> str | None:
    """The command line in the run's ``<stem>_meta.json`` beside the CSV, if any."""
    meta = Path(csv_path).with_name(Path(csv_path).stem + "_meta.json")
    try:
        info = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    return info.get("command") if isinstance(info, dict) else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="directory for the summary and plots (default: the CSV's)")
    args = ap.parse_args(argv)
    from .plots import write_plots

    rows = read_csv(args.csv)
    out = args.out or args.csv.parent
    out.mkdir(parents=True, exist_ok=True)
    stem = args.csv.stem
    print(write_summary(rows, out / f"{stem}_summary.md", command=recorded_command(args.csv)))
    for p in write_plots(rows, out, stem):
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
