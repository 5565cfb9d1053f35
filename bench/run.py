"""``python -m bench``: time and measure every available provider on the cases
of a suite; write a CSV (schema in bench/report.py), a metadata JSON, a
markdown summary and PNG plots.

Per case and dtype: the inputs are made on the device; each provider is
checked (missing ones get a row saying why) and built; then per mode each is
warmed up (first call timed apart: compilation, autotuning) and sampled in
interleaved rounds; then one more step per provider measures its peak memory.
Rows are appended to the CSV as each case finishes. Past ``--time-budget`` no
provider is built, but those built are still warmed and sampled (their
minimum rounds). A SIGINT (an outer time limit) keeps the rows of the
finished cases, of the interrupted case's finished modes and the samples of
the providers warm in its current mode (one round at least; no memory step),
writes the rest as skipped, still writes the summary, and exits with status 130.
"""
from __future__ import annotations

if __package__ in (None, ""):  # `python bench/run.py`: run as the package's module
    import runpy
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    runpy.run_module("bench", run_name="__main__")

import argparse
import fnmatch
import gc
import json
import math
import shlex
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import meta
from .memory import PeakMemory
from .nc import NCInputs, nc_providers
from .providers import CEInputs, Check, Provider, ce_providers, dtype_name
from .report import CsvLog, read_csv, write_summary
from .roofline import MODES, NC_MODES, tflops
from .shapes import CE_OP, SUITES, Case, select
from .timing import Clock, interleaved, summarize, warm_up

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
DEFAULTS = {  # per device type: rounds, warm-up steps, min ms per sample, max steps per sample
    "cuda": {"reps": 20, "warmup": 3, "min_sample_ms": 2.0, "max_iters": 200},
    "cpu": {"reps": 7, "warmup": 2, "min_sample_ms": 10.0, "max_iters": 100},
}


def _csv_list(s: str) -> list[str]:
    return [p.strip() for p in s.split(",") if p.strip()]


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", choices=sorted(SUITES), default="quick",
                    help="quick: CPU-sized smoke suite; medium: the full families at CPU sizes; full: the GPU shapes")
    ap.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available)")
    ap.add_argument("--dtype", type=_csv_list, default=None,
                    help="comma list of bf16/fp16/fp32 (default: bf16 on cuda, fp32 on cpu)")
    ap.add_argument("--out", type=Path, default=Path("bench_out"), help="output directory (default: bench_out)")
    ap.add_argument("--tag", default=None, help="file-name stem (default: <device-slug>_<suite>)")
    ap.add_argument("--shapes", type=_csv_list, default=None,
                    help="comma list of case-id patterns or family names (e.g. 'vision,llm-*-C131072')")
    ap.add_argument("--providers", type=_csv_list, default=None,
                    help="comma list of provider-name patterns (e.g. 'nnk-*,ref-eager,bound-gemm')")
    ap.add_argument("--modes", type=_csv_list, default=list(MODES), help="comma list of fwdbwd,fwd,bwd")
    ap.add_argument("--reps", type=int, default=None, help="interleaved rounds (samples per provider)")
    ap.add_argument("--min-rounds", type=int, default=3, help="rounds taken even past the case budget")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps after the first call")
    ap.add_argument("--min-sample-ms", type=float, default=None, help="a sample averages steps up to this long")
    ap.add_argument("--max-iters", type=int, default=None, help="at most this many steps per sample")
    ap.add_argument("--case-budget", type=float, default=120.0,
                    help="seconds of sampling per case (split over its modes) after which rounds stop")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds for the whole run: later cases are reported as skipped")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads for CPU runs (1 is robust on a shared machine: no thread-pool "
                         "barrier waits for a descheduled worker)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--list", action="store_true", help="print the cases and provider availability, run nothing")
    args = ap.parse_args(argv)
    try:
        args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        ap.error(f"--device {args.device}: {e}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: no CUDA device is available here")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    d = DEFAULTS["cuda" if args.device.type == "cuda" else "cpu"]
    for k, v in d.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    names = args.dtype or (["bf16"] if args.device.type == "cuda" else ["fp32"])
    bad = [n for n in names if n not in DTYPES]
    if bad:
        ap.error(f"--dtype {bad}: choose from {sorted(DTYPES)}")
    args.dtypes = [DTYPES[n] for n in names]
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        ap.error(f"--modes {bad}: choose from {MODES}")
    return args


def _pick(providers: list[Provider], patterns) -> list[Provider]:
    if not patterns:
        return providers
    return [p for p in providers if any(fnmatch.fnmatch(p.name, pat) for pat in patterns)]


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# Errors after which every CUDA call of the process fails (the context is lost).
_STICKY = ("illegal memory access", "device-side assert", "unspecified launch failure", "misaligned address",
           "an illegal instruction")


INTERRUPTED = "not run: the run was interrupted (SIGINT)"


def sticky_cuda_error(e: BaseException) -> bool:
    return any(s in str(e) for s in _STICKY)


def _failure(e: BaseException) -> tuple[str, str]:
    """The status of a provider that raised: ``oom``, ``unavailable`` (an
    installed peer that does not import here), else ``error``. Also clears
    the locals of the finished frames in the tracebacks of e and of the
    exceptions it chains: they hold the failed step's tensors, which the
    except block calling this would otherwise keep alive (and cached on the
    GPU) while the next provider is timed."""
    seen, pending = set(), [e]
    while pending:
        x = pending.pop()
        if x is not None and id(x) not in seen:
            seen.add(id(x))
            traceback.clear_frames(x.__traceback__)
            pending += [x.__cause__, x.__context__]
    msg = " ".join(f"{type(e).__name__}: {e}".split())[:400]
    if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower() \
            or "can't allocate memory" in str(e):
        return "oom", msg
    return ("unavailable" if isinstance(e, ImportError) else "error"), msg


class Bench:
    def __init__(self, args, env: dict):
        self.args, self.env = args, env
        self.clock, self.mem = Clock(args.device), PeakMemory(args.device)
        self.timestamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.deadline = time.monotonic() + args.time_budget if args.time_budget else None
        self.case_ids: set[str] = set()   # the run's cases (main sets them)
        self.sticky: str | None = None    # why the rest is not run, after a sticky CUDA error
        self.interrupted = False          # a SIGINT arrived inside a case: stop after writing it

    def row(self, case: Case, dtype, provider: Provider, mode: str, status: str, notes: str = "", **vals) -> dict:
        r = {"suite": self.args.suite, "op": case.op, "case": case.id, "family": case.family,
             "variant": case.variant, "N": case.N, "D": case.D, "C": case.C, "scale": case.scale,
             "provider": provider.name, "kind": provider.kind, "mode": mode, "dtype": dtype_name(dtype),
             "status": status, "median_ms": math.nan, "p20_ms": math.nan, "p80_ms": math.nan, "rounds": 0,
             "iters": 0, "peak_mb": math.nan, "tflops": math.nan, "vs_bound": math.nan, "loss": math.nan,
             "device": self.env["device"], "torch": self.env["torch"], "triton": self.env["triton"],
             "nnk": self.env["nnk"], "git_commit": self.env["git_commit"], "timestamp": self.timestamp,
             "notes": notes}
        r.update(vals)
        return r

    def run_case(self, case: Case, dtype, providers: list[Provider]) -> list[dict]:
        args = self.args
        modes = [m for m in args.modes if m in (MODES if case.op == CE_OP else NC_MODES)]
        rows: dict[tuple[str, str], dict] = {}

        def fail(p: Provider, e: BaseException, only_mode: str | None = None):
            status, msg = _failure(e)
            print(f"    {p.name}: {status}: {msg}", flush=True)
            if sticky_cuda_error(e) and self.sticky is None:
                # Every later CUDA call fails: the rest of the run is skipped
                # with this reason rather than recorded as errors of others.
                self.sticky = f"not run: {p.name} hit a sticky CUDA error earlier ({msg[:160]})"
            for m in modes:
                if (only_mode in (None, m)) and rows.get((p.name, m), {}).get("status") != "ok":
                    rows[(p.name, m)] = self.row(case, dtype, p, m, status, msg)

        try:
            inputs = (CEInputs if case.op == CE_OP else NCInputs)(case, args.device, dtype, args.seed)
        except Exception as e:  # noqa: BLE001
            status, msg = _failure(e)
            return [self.row(case, dtype, p, m, status, f"making the inputs: {msg}") for p in providers for m in modes]

        # Margin-blind providers (peers without margins, the bare GEMMs) compute
        # the same on ArcFace as on the CosFace case of the same shape: timed once.
        twin = case.id.replace("-arcface-", "-cosface-") if case.variant == "arcface" else None
        same_as_twin = f"the same computation as on {twin} (no margins)"

        def out_of_time() -> bool:
            return self.sticky is not None or (self.deadline is not None and time.monotonic() > self.deadline)

        def stop_reason() -> str:
            return self.sticky or f"time budget of {args.time_budget or 0:g} s used up"
        runs, losses, notes = {}, {}, {}
        try:
            for p in providers:
                chk = p.check(case, args.device, dtype)
                if chk.status == "ok" and p.margin_blind and twin in self.case_ids:
                    chk = Check("skipped", same_as_twin)
                if chk.status == "ok" and out_of_time():
                    # Builds (a cold torch.compile, Triton autotuning) are unbounded:
                    # the rest of the case is skipped, and its finished rows kept.
                    chk = Check("skipped", stop_reason())
                if chk.status != "ok":
                    for m in modes:
                        rows[(p.name, m)] = self.row(case, dtype, p, m, chk.status, chk.reason)
                    continue
                try:
                    runs[p.name] = p.build(case, inputs)
                    losses[p.name] = runs[p.name].loss() if runs[p.name].loss else math.nan
                    notes[p.name] = p.notes(case)
                except Exception as e:  # noqa: BLE001
                    runs.pop(p.name, None)
                    fail(p, e)
                    _free(args.device)
            by_name = {p.name: p for p in providers}
            # Everything alive now (modules imported by the builds, the inputs) is
            # left out of later collections: the gc.collect() before each memory
            # measurement then costs milliseconds, not a scan of torch's heap.
            gc.collect()
            gc.freeze()

            for mode in modes:
                steps, iters, extra = {}, {}, {}
                for name, run in list(runs.items()):
                    if mode not in run.steps:
                        continue
                    # Past the run's deadline a built provider is still warmed
                    # and sampled (its minimum rounds): skipping it threw away
                    # builds that had already cost the time (the bound and
                    # nnk's rows of a case whose compiles overran). An outer
                    # SIGINT then stops the warm-ups and samples what is warm.
                    if self.sticky is not None or self.interrupted:
                        why = self.sticky or INTERRUPTED
                        rows[(name, mode)] = self.row(case, dtype, by_name[name], mode, "skipped", why)
                        continue
                    slow = by_name[name].slow
                    try:
                        w = warm_up(run.steps[mode], self.clock, warmup=0 if slow else args.warmup,
                                    min_sample_ms=args.min_sample_ms, max_iters=1 if slow else args.max_iters)
                    except KeyboardInterrupt:
                        self.interrupted = True
                        run.steps[mode].teardown()
                        rows[(name, mode)] = self.row(case, dtype, by_name[name], mode, "skipped", INTERRUPTED)
                        continue
                    except Exception as e:  # noqa: BLE001
                        fail(by_name[name], e, mode)
                        run.steps[mode].teardown()
                        _free(args.device)
                        continue
                    steps[name], iters[name] = run.steps[mode], w.iters
                    extra[name] = [f"first call {w.first_ms / 1e3:.3g} s"] if w.first_ms > 1000 else []
                    extra[name] += w.warnings

                def on_error(name, e, mode=mode):
                    fail(by_name[name], e, mode)
                    runs[name].steps[mode].teardown()
                    steps.pop(name, None)
                    _free(args.device)

                mode_deadline = time.monotonic() + args.case_budget / len(modes)
                if self.deadline is not None:
                    mode_deadline = min(mode_deadline, self.deadline)
                # After an interrupt, one round of what is warm: the outer
                # limit's SIGKILL follows 15 s later, and a case's rows are
                # written only when it ends.
                min_rounds = 1 if self.interrupted else args.min_rounds
                if self.interrupted:
                    mode_deadline = time.monotonic()
                samples, cut = interleaved(dict(steps), iters, self.clock, rounds=args.reps,
                                           min_rounds=min_rounds, deadline=mode_deadline, on_error=on_error,
                                           max_rounds={n: args.min_rounds for n in steps if by_name[n].slow})
                self.interrupted |= cut
                for name in list(steps):
                    if not samples[name]:
                        rows[(name, mode)] = self.row(case, dtype, by_name[name], mode, "skipped", INTERRUPTED)
                        continue
                    if self.interrupted:
                        # No memory step after an interrupt: the outer limit kills soon after.
                        extra[name].append("interrupted: peak memory not measured")
                        peak = math.nan
                    else:
                        try:
                            peak = self.mem.measure(steps[name])
                        except Exception as e:  # noqa: BLE001
                            on_error(name, e)
                            continue
                    med, p20, p80 = summarize(samples[name])
                    note = "; ".join(x for x in [notes[name], *extra[name]] if x)
                    rows[(name, mode)] = self.row(
                        case, dtype, by_name[name], mode, "ok", note, median_ms=med, p20_ms=p20, p80_ms=p80,
                        rounds=len(samples[name]), iters=iters[name], peak_mb=peak, tflops=tflops(case, mode, med),
                        loss=losses[name])
                    r = rows[(name, mode)]
                    more = []
                    if mode == "bwd" and by_name[name].grads_in_forward:
                        r["tflops"] = math.nan
                        more.append("bwd only scales the gradients its forward computed: no TFLOP/s or bound ratio")
                    if mode == "fwd" and by_name[name].grads_in_forward:
                        more.append("fwd also computes the gradients (3 GEMMs), but TFLOP/s and × bound count "
                                    "the forward's one")
                    if len(samples[name]) < args.reps and not by_name[name].slow:
                        more.append(f"{len(samples[name])} of {args.reps} rounds: the case's or the run's time "
                                    "budget ran out, or an interrupt")
                    r["notes"] = "; ".join(x for x in [r["notes"], *more] if x)
                    print(f"    {mode:6s} {name:20s} {med:10.4g} ms  [{p20:.4g}, {p80:.4g}]  x{len(samples[name])}"
                          f"  {r['tflops']:8.3g} TFLOP/s  peak {peak:9.4g} MiB", flush=True)
                _free(args.device)
        except KeyboardInterrupt:
            # SIGINT at an outer time limit (bench/gpu_session.sh): the rows
            # of the finished modes are kept, the rest of the case is skipped,
            # and main writes the case and stops.
            self.interrupted = True
            print(f"    interrupted: {case.id} keeps its finished rows", flush=True)
            for p in providers:
                for m in modes:
                    if (p.name, m) not in rows and not (p.name in runs and m not in runs[p.name].steps):
                        rows[(p.name, m)] = self.row(case, dtype, p, m, "skipped", INTERRUPTED)

        # Emptied rather than deleted: the on_error closures above refer to the name.
        runs.clear()
        del inputs
        gc.unfreeze()   # so that cycles holding this case's tensors are collected now
        _free(args.device)
        for mode in modes:
            bound = rows.get(("bound-gemm", mode))
            if bound is not None and bound["status"] == "ok":
                for p in providers:
                    r = rows.get((p.name, mode))
                    if r is not None and r["status"] == "ok" and not (mode == "bwd" and p.grads_in_forward):
                        r["vs_bound"] = r["median_ms"] / bound["median_ms"]
        return [rows[(p.name, m)] for p in providers for m in modes if (p.name, m) in rows]

    def skipped(self, case: Case, dtype, providers: list[Provider], why: str) -> list[dict]:
        modes = [m for m in self.args.modes if m in (MODES if case.op == CE_OP else NC_MODES)]
        return [self.row(case, dtype, p, m, "skipped", why) for p in providers for m in modes]


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cases = select(SUITES[args.suite], args.shapes)
    ce, nc = _pick(ce_providers(), args.providers), _pick(nc_providers(), args.providers)
    env = meta.environment(args.device)
    if args.list:
        for case in cases:
            for dtype in args.dtypes:
                for p in (ce if case.op == CE_OP else nc):
                    chk = p.check(case, args.device, dtype)
                    print(f"{case.id:34s} {dtype_name(dtype):9s} {p.name:20s} {chk.status:11s} {chk.reason}")
        return 0

    stem = args.tag or f"{env['device_slug']}_{args.suite}"
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    csv_path, meta_path = out / f"{stem}.csv", out / f"{stem}_meta.json"
    if csv_path.exists():
        csv_path.unlink()
    log, bench = CsvLog(csv_path), Bench(args, env)
    bench.case_ids = {c.id for c in cases}
    started = time.monotonic()
    info = {**env, "command": "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv),
            "suite": args.suite, "dtypes": [dtype_name(d) for d in args.dtypes], "modes": args.modes,
            "cases": [c.id for c in cases], "reps": args.reps, "warmup": args.warmup,
            "min_sample_ms": args.min_sample_ms, "max_iters": args.max_iters, "case_budget_s": args.case_budget,
            "time_budget_s": args.time_budget, "timing": bench.clock.method, "peak_memory": bench.mem.method,
            "started": bench.timestamp, "host_threads": torch.get_num_threads()}
    meta_path.write_text(json.dumps(info, indent=2))
    print(f"bench: {args.suite} suite on {env['device']} ({', '.join(info['dtypes'])}) -> {csv_path}", flush=True)

    def providers_of(case: Case) -> list[Provider]:
        return ce if case.op == CE_OP else nc

    todo = [(dtype, case) for dtype in args.dtypes for case in cases]
    try:
        while todo:
            dtype, case = todo[0]
            # An interrupt first: gpu_session.sh sends it past the time budget.
            if bench.interrupted:
                rows = bench.skipped(case, dtype, providers_of(case), INTERRUPTED)
            elif bench.sticky is not None:
                rows = bench.skipped(case, dtype, providers_of(case), bench.sticky)
            elif bench.deadline is not None and time.monotonic() > bench.deadline:
                rows = bench.skipped(case, dtype, providers_of(case), f"time budget of {args.time_budget:g} s used up")
            else:
                print(f"  {case.id} {dtype_name(dtype)}", flush=True)
                t0 = time.monotonic()
                rows = bench.run_case(case, dtype, providers_of(case))
                print(f"  {case.id} {dtype_name(dtype)}: {time.monotonic() - t0:.1f} s", flush=True)
            todo.pop(0)
            log.write(rows)
    except KeyboardInterrupt:
        # SIGINT at a hard time limit outside a case's modes (run_case keeps
        # the finished modes of one inside them): while the inputs were made,
        # a case was cleaned up or between two cases.
        bench.interrupted = True
    for dtype, case in todo:  # the case cut outside its modes, and the later ones
        log.write(bench.skipped(case, dtype, providers_of(case), INTERRUPTED))
    if bench.interrupted:
        # The summary and plots are still written from the finished rows.
        print("bench: interrupted; summarizing the finished cases", flush=True)

    info["wall_s"] = round(time.monotonic() - started, 1)
    info["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    meta_path.write_text(json.dumps(info, indent=2))
    rows = read_csv(csv_path)
    print(write_summary(rows, out / f"{stem}_summary.md", command=info["command"]))
    if not args.no_plots:
        from .plots import write_plots

        for p in write_plots(rows, out, stem):
            print(p)
    print(f"bench: {len(rows)} rows in {info['wall_s']} s", flush=True)
    if bench.sticky is not None:
        print(f"bench: stopped early, {bench.sticky}", flush=True)
        return 3
    return 130 if bench.interrupted else 0
