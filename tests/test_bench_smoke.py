"""Smoke test of the benchmark harness (bench/): a subset of the quick suite
runs on the CPU with few repetitions and writes its CSV, summary, metadata and
plots. It checks the schema, that every provider is accounted for (measured,
or reported as unavailable / skipped with a reason, never an error), that
what was measured is finite, and that every provider solved the same problem
(its loss equals the reference's). No timing or memory figure is asserted:
performance is measured in bench/, never in tests.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
# One plain case, one margin case (ArcFace: the trickiest peer setup), the NC case:
# two torch.compile compilations, the bulk of the ~1 min this takes on 2 cores.
SHAPES = "vision-plain-N256-D512-C100,face-arcface-*,nc"


def _bench(out, tag: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m bench --suite quick --device cpu`` with ``args``, its CSV in
    ``out/<tag>.csv``, without the Triton interpreter; asserts it succeeded."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "bench", "--suite", "quick", "--device", "cpu", "--reps", "2", "--warmup", "1",
           "--threads", "1", *args, "--out", str(out), "--tag", tag]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    _bench(out, "smoke", "--shapes", SHAPES, "--min-sample-ms", "1")
    from bench.report import read_csv

    return out, read_csv(out / "smoke.csv")   # read_csv rejects a header that is not the schema


def test_every_provider_accounted_for(quick_run):
    from bench.nc import nc_providers
    from bench.providers import ce_providers
    from bench.roofline import MODES
    from bench.shapes import CE_OP, SUITES, select

    _, rows = quick_run
    got = {(r["case"], r["provider"], r["mode"]) for r in rows}
    want = {(c.id, p.name, m) for c in select(SUITES["quick"], SHAPES.split(","))
            for p in (ce_providers() if c.op == CE_OP else nc_providers())
            for m in (MODES if c.op == CE_OP else ("fwd",))}
    assert got == want
    assert len(rows) == len(want)
    bad = [(r["case"], r["provider"], r["mode"], r["status"], r["notes"]) for r in rows
           if r["status"] not in ("ok", "unavailable", "skipped")]
    assert not bad, bad
    assert all(r["notes"] for r in rows if r["status"] != "ok"), "a provider not measured must say why"


def test_measured_rows_are_finite(quick_run):
    _, rows = quick_run
    ok = [r for r in rows if r["status"] == "ok"]
    for r in ok:
        # A bwd that only scales what its forward computed has no FLOPs of its own.
        scaled_only = r["mode"] == "bwd" and "bwd only scales the gradients" in r["notes"]
        for k in ("median_ms", "p20_ms", "p80_ms", "tflops", "vs_bound", "peak_mb"):
            if not (scaled_only and k in ("tflops", "vs_bound")):
                assert math.isfinite(r[k]), (r["case"], r["provider"], r["mode"], k, r[k])
    assert any(r["provider"] == "nnk-cuda-gradfwd" and r["mode"] == "bwd" and math.isnan(r["tflops"])
               for r in ok) or not any(r["provider"] == "nnk-cuda-gradfwd" for r in ok)
    for r in ok:
        assert r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["rounds"] == 2 and r["iters"] >= 1
        if r["op"] == "cosine_cross_entropy" and r["kind"] != "bound":
            assert math.isfinite(r["loss"]), (r["case"], r["provider"])
    # What must run on any CPU: nnk's torch paths (and the extension's CPU kernels
    # when it is built), the reference eager and compiled, the NC baseline, the bounds.
    import nnk

    ext = nnk.ops.has_op("cosine_cross_entropy_fwd", "cpu")
    measured = {(r["case"], r["provider"]) for r in ok}
    for r in rows:
        if r["op"] == "cosine_cross_entropy":
            need = ["nnk-torch", "ref-eager", "ref-compile", "bound-gemm"] + (["nnk-cuda"] if ext else [])
        else:
            need = ["nnk-nc_stats-torch", "nnk-nc_metrics", "paper-loop", "bound-gemm"] + (
                ["nnk-nc_stats-cuda"] if nnk.ops.has_op("nc_class_sums", "cpu") else [])
        for p in need:
            assert (r["case"], p) in measured, (r["case"], p)


def test_providers_solve_the_same_problem(quick_run):
    """Each provider's forward loss equals the reference's on the same inputs:
    catches a peer fed the wrong scale, margin or weight layout. Peers without
    margins are compared on plain cases only."""
    _, rows = quick_run
    ref = {r["case"]: r["loss"] for r in rows if r["provider"] == "ref-eager" and r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok" or r["kind"] == "bound" or r["op"] != "cosine_cross_entropy":
            continue
        if r["variant"] != "plain" and "no margins" in r["notes"]:
            continue
        assert r["loss"] == pytest.approx(ref[r["case"]], rel=1e-4), (r["case"], r["provider"])


def test_outputs_written(quick_run):
    out, rows = quick_run
    info = json.loads((out / "smoke_meta.json").read_text())
    for k in ("device", "torch", "triton", "nnk", "git_commit", "command", "timing", "peak_memory", "wall_s"):
        assert info[k] not in (None, ""), k
    summary = (out / "smoke_summary.md").read_text()
    assert "vision-plain-N256-D512-C100" in summary and "Not measured" in summary
    pngs = sorted(out.glob("smoke_*.png"))
    assert len(pngs) == 2 and all(p.stat().st_size > 0 for p in pngs)   # vision-plain and face-arcface


class _RaisesInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.float().square().sum()

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("boom")


def test_failing_providers_are_reported_and_the_others_run():
    """A peer that does not import is `unavailable`; one whose backward raises
    is an `error` in the modes with a backward and still measured in `fwd`;
    the reference beside them is measured in every mode."""
    from bench import meta
    from bench.providers import GemmBound, Provider, Reference, loss_run
    from bench.run import Bench, parse_args
    from bench.shapes import Case

    class NotImportable(Provider):
        name, kind = "not-importable", "peer"

        def build(self, case, inputs):
            raise ImportError("no module named 'peer'")

    class BrokenBackward(Provider):
        name, kind = "broken-backward", "peer"

        def build(self, case, inputs):
            return loss_run(lambda: _RaisesInBackward.apply(inputs.x), [inputs.x])

    args = parse_args(["--device", "cpu", "--reps", "2", "--warmup", "0", "--min-sample-ms", "0.1"])
    bench = Bench(args, meta.environment(torch.device("cpu")))
    case = Case("cosine_cross_entropy", "tiny", 8, 4, 16, "plain", 20.0)
    rows = bench.run_case(case, torch.float32, [NotImportable(), BrokenBackward(), Reference(False), GemmBound()])
    status = {(r["provider"], r["mode"]): (r["status"], r["notes"]) for r in rows}
    assert all(status[("not-importable", m)][0] == "unavailable" for m in ("fwd", "bwd", "fwdbwd"))
    assert "no module named 'peer'" in status[("not-importable", "fwd")][1]
    assert status[("broken-backward", "fwd")][0] == "ok"
    for m in ("bwd", "fwdbwd"):
        assert status[("broken-backward", m)][0] == "error" and "boom" in status[("broken-backward", m)][1]
    for m in ("fwd", "bwd", "fwdbwd"):
        assert status[("ref-eager", m)][0] == "ok"
        r = next(r for r in rows if r["provider"] == "ref-eager" and r["mode"] == m)
        assert math.isfinite(r["vs_bound"]) and r["vs_bound"] > 0


def test_device_math_measures_ulps(capsys):
    """bench/device_math.py: a float32 exp moved two ulps up from the
    correctly rounded one errs by 1.5 to 2.5 ulps (up to 4.5 just below a
    power of two, where the ulp halves), about 2 on average; the script runs
    and prints a row per function."""
    from bench.device_math import FUNCTIONS, main, ulp_errors

    def exp_two_ulps_up(a):
        r = torch.exp(a.double()).float()
        for _ in range(2):
            r = torch.nextafter(r, torch.full_like(r, math.inf))
        return r

    args = FUNCTIONS["exp"][2](100_000, torch.Generator().manual_seed(0))
    err = ulp_errors(exp_two_ulps_up, torch.exp, args)
    assert err.numel() == 100_000
    assert 1.5 <= err.min().item() and err.max().item() <= 4.5 and abs(err.mean().item() - 2) < 0.05
    assert main(["--device", "cpu", "--n", "1000"]) == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:]]
    assert rows == list(FUNCTIONS)


@pytest.mark.parametrize("impl", ["cuda", "triton"])
def test_sanitize_driver_runs_every_kernel_on_cpu(impl):
    """bench/sanitize.py is what compute-sanitizer runs on a GPU; here its CPU
    dry run (extension CPU kernels, Triton interpreter) in float32."""
    from nnk.ops import has_op

    if impl == "cuda" and not has_op("cosine_cross_entropy_fwd", "cpu"):
        pytest.skip("nnk._C not built")
    if impl == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton dry run needs TRITON_INTERPRET=1")
    from bench.sanitize import main

    assert main(["--impl", impl, "--device", "cpu", "--dtype", "fp32"]) == 0


def test_cases_pass_their_margins_to_the_loss():
    # The timed ArcFace / CosFace cases must run with their margins (every
    # provider, the reference included, takes case.loss_kwargs()).
    from bench.shapes import SUITES

    cases = [c for suite in SUITES.values() for c in suite if hasattr(c, "angular_margin")]
    assert any(c.angular_margin for c in cases) and any(c.additive_margin for c in cases)
    for c in cases:
        assert c.loss_kwargs() == {"scale": c.scale, "additive_margin": c.additive_margin,
                                   "angular_margin": c.angular_margin}, c


def test_gradfwd_is_skipped_where_nnk_declines_it():
    # nnk-cuda-gradfwd ran nnk-cuda's two passes wherever the logits need
    # class chunks (every LLM and face case on a GPU), labelled as gradients
    # computed in the forward: its bwd row lost its TFLOP/s and bound ratio.
    from bench.providers import Nnk
    from bench.shapes import CE_OP, Case
    from nnk.ops import cce_block_shape, has_op

    if not has_op("cosine_cross_entropy_fwd", "cpu"):
        pytest.skip("nnk._C is not built")
    p, cpu = Nnk("cuda", "gradfwd"), torch.device("cpu")
    small, large = Case(CE_OP, "t", 256, 128, 1000), Case(CE_OP, "t", 256, 128, 300_000)
    assert cce_block_shape(256, 300_000, 128, torch.float32, "cpu")[1] < 300_000
    assert p.check(small, cpu, torch.float32).status == "ok"
    chk = p.check(large, cpu, torch.float32)
    assert chk.status == "skipped" and "class chunks" in chk.reason
    assert p.check(small, cpu, torch.float16).status == "skipped"


def test_chunk64_is_skipped_where_the_default_blocks_fit(monkeypatch):
    # Where the default blocks already fit 64 MiB, nnk-cuda-chunk64 is
    # nnk-cuda's computation under another name; elsewhere it runs, and its
    # steps run under NNK_CHUNK_MB=64.
    from bench.providers import Nnk
    from bench.shapes import CE_OP, Case
    from nnk.ops import cce_block_shape, has_op

    if not has_op("cosine_cross_entropy_fwd", "cpu"):
        pytest.skip("nnk._C is not built")
    p, cpu = Nnk("cuda", "chunk64"), torch.device("cpu")
    assert p.name == "nnk-cuda-chunk64" and p.env == {"NNK_CHUNK_MB": "64"}
    small, large = Case(CE_OP, "t", 256, 128, 1000), Case(CE_OP, "t", 1024, 512, 100_000)
    assert cce_block_shape(1024, 100_000, 512, torch.float32, "cpu", 64 << 20) != \
        cce_block_shape(1024, 100_000, 512, torch.float32, "cpu")
    chk = p.check(small, cpu, torch.float32)
    assert chk.status == "skipped" and "already fit 64 MiB" in chk.reason
    assert p.check(large, cpu, torch.float32).status == "ok"


def test_chunk_budget_script_reports_each_budget():
    from nnk.ops import has_op

    if not has_op("cosine_cross_entropy_fwd", "cpu"):
        pytest.skip("nnk._C is not built")
    proc = subprocess.run([sys.executable, "-m", "bench.chunk_budget", "-n", "64", "-c", "3000", "-d", "16",
                           "--budgets", "0,1", "--reps", "1"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[1].startswith("NNK_CHUNK_MB=unset (256): blocks (64, 3000), peak extra"), proc.stdout
    assert lines[2].startswith("NNK_CHUNK_MB=1: blocks (64, ") and "(64, 3000)" not in lines[2], proc.stdout


def test_time_budget_stops_inside_a_case(tmp_path):
    """A budget that runs out inside a case (here: during the builds, a cold
    torch.compile among them) skips the rest of that case with a reason and
    keeps a row for every provider and mode, instead of running on until an
    outer time limit kills it and its rows."""
    proc = _bench(tmp_path, "budget", "--shapes", "vision-plain-N256-D512-C10", "--time-budget", "0.2", "--no-plots")
    assert "  vision-plain-N256-D512-C10 float32\n" in proc.stdout  # the case started within the budget
    from bench.providers import ce_providers
    from bench.report import read_csv
    from bench.roofline import MODES

    rows = read_csv(tmp_path / "budget.csv")
    assert len(rows) == len(ce_providers()) * len(MODES)
    cut = [r for r in rows if r["status"] == "skipped" and "time budget of 0.2 s used up" in r["notes"]]
    assert cut, [(r["provider"], r["mode"], r["status"]) for r in rows]
    # The bound, built first and within the budget, is still timed in every
    # mode (a budget that ran out during the builds skipped every row).
    assert all(r["status"] == "ok" for r in rows if r["provider"] == "bound-gemm"), rows
    assert all(r["status"] in ("ok", "skipped", "unavailable") for r in rows)


def test_an_interrupt_inside_a_case_keeps_its_finished_rows(tmp_path, monkeypatch):
    """SIGINT (bench/gpu_session.sh's hard limit, sent past the time budget)
    during a warm-up of a case's second mode: the first mode's rows are
    written, the providers warmed before the interrupt get their minimum
    rounds (no memory step), the rest of that case and the later cases are
    `skipped` as interrupted (not as out of time), and the summary is still
    written (the cut case lost all its rows before)."""
    import time
    from types import SimpleNamespace

    from bench import run
    from bench.providers import GemmBound, Nnk, Provider
    from bench.report import read_csv
    from bench.timing import Step

    late = SimpleNamespace(by=0.0)  # run.py's clock, moved past the budget at the interrupt
    monkeypatch.setattr(run, "time", SimpleNamespace(monotonic=lambda: time.monotonic() + late.by))

    class InterruptedInFwd(Provider):
        name, kind = "interrupted", "peer"

        def build(self, case, inputs):
            r = GemmBound().build(case, inputs)

            def interrupt():
                late.by = 1e6
                raise KeyboardInterrupt

            r.steps["fwd"] = Step(interrupt)
            return r

    monkeypatch.setattr(run, "ce_providers", lambda: [Nnk("torch"), InterruptedInFwd(), GemmBound()])
    shapes = "vision-plain-N256-D512-C10,vision-plain-N256-D512-C100"
    assert run.main(["--suite", "quick", "--device", "cpu", "--shapes", shapes, "--reps", "2", "--warmup", "0",
                     "--min-sample-ms", "0.1", "--no-plots", "--out", str(tmp_path), "--tag", "cut",
                     "--time-budget", "3600"]) == 130
    rows = read_csv(tmp_path / "cut.csv")
    status = {(r["case"], r["provider"], r["mode"]): (r["status"], r["notes"]) for r in rows}
    assert len(status) == len(rows) == 2 * 3 * 3
    first, second = shapes.split(",")
    for p in ("nnk-torch", "interrupted", "bound-gemm"):
        assert status[(first, p, "fwdbwd")][0] == "ok"
        cut = [(first, "bwd"), *((second, m) for m in ("fwdbwd", "fwd", "bwd"))]
        if p != "nnk-torch":  # warmed before the interrupt: sampled
            cut.append((first, "fwd"))
        for case, mode in cut:
            assert status[(case, p, mode)] == ("skipped", run.INTERRUPTED), (case, p, mode)
    done = next(r for r in rows if (r["case"], r["provider"], r["mode"]) == (first, "nnk-torch", "fwdbwd"))
    assert math.isfinite(done["median_ms"]) and math.isfinite(done["vs_bound"])
    warm = next(r for r in rows if (r["case"], r["provider"], r["mode"]) == (first, "nnk-torch", "fwd"))
    assert warm["status"] == "ok" and math.isfinite(warm["median_ms"]) and math.isnan(warm["peak_mb"])
    assert "interrupted: peak memory not measured" in warm["notes"]
    assert (tmp_path / "cut_summary.md").exists()


def test_an_interrupt_while_sampling_keeps_the_samples(tmp_path, monkeypatch):
    """SIGINT in the middle of the interleaved rounds: every provider with a
    sample gets its row (the mode's samples were all lost before, and with the
    headline's one mode, the whole case)."""
    from bench import run
    from bench.providers import GemmBound, Nnk, Provider
    from bench.report import read_csv
    from bench.timing import Step

    class InterruptedInRound3(Provider):
        name, kind = "interrupted", "peer"

        def build(self, case, inputs):
            r = GemmBound().build(case, inputs)
            calls = [0]

            def step():
                calls[0] += 1
                if calls[0] == 3:   # the first call (warm-up), then rounds 1 and 2
                    raise KeyboardInterrupt

            r.steps["fwdbwd"] = Step(step)
            return r

    monkeypatch.setattr(run, "ce_providers", lambda: [GemmBound(), InterruptedInRound3(), Nnk("torch")])
    assert run.main(["--suite", "quick", "--device", "cpu", "--shapes", "vision-plain-N256-D512-C10",
                     "--modes", "fwdbwd", "--reps", "5", "--warmup", "0", "--max-iters", "1", "--no-plots",
                     "--out", str(tmp_path), "--tag", "cut"]) == 130
    rows = {r["provider"]: r for r in read_csv(tmp_path / "cut.csv")}
    assert rows["interrupted"]["status"] == "ok" and rows["interrupted"]["rounds"] == 1
    for p in ("bound-gemm", "nnk-torch"):
        assert rows[p]["status"] == "ok" and rows[p]["rounds"] in (1, 2), rows[p]
        assert "interrupted: peak memory not measured" in rows[p]["notes"]
    assert math.isfinite(rows["nnk-torch"]["vs_bound"])


def test_an_interrupt_outside_a_cases_modes_is_recorded(tmp_path, monkeypatch):
    """SIGINT while a case's inputs are made (outside run_case's modes): the
    finished case keeps its rows, the cut case and the later ones are written
    as interrupted (the cut case was missing from the CSV and the later ones
    said "time budget used up" before), the summary is written and the exit
    status is 130."""
    from bench import run
    from bench.providers import CEInputs, GemmBound, Nnk
    from bench.report import read_csv

    made = []

    def inputs(case, *args):
        made.append(case.id)
        if len(made) == 2:
            raise KeyboardInterrupt
        return CEInputs(case, *args)

    monkeypatch.setattr(run, "CEInputs", inputs)
    monkeypatch.setattr(run, "ce_providers", lambda: [Nnk("torch"), GemmBound()])
    shapes = ["vision-plain-N256-D512-C10", "vision-plain-N256-D512-C100", "vision-plain-N256-D512-C1000"]
    assert run.main(["--suite", "quick", "--device", "cpu", "--shapes", ",".join(shapes), "--reps", "2",
                     "--warmup", "0", "--min-sample-ms", "0.1", "--no-plots", "--out", str(tmp_path),
                     "--tag", "cut", "--modes", "fwdbwd", "--time-budget", "3600"]) == 130
    assert made == shapes[:2]
    rows = read_csv(tmp_path / "cut.csv")
    status = {(r["case"], r["provider"]): (r["status"], r["notes"]) for r in rows}
    assert len(status) == len(rows) == 3 * 2
    for p in ("nnk-torch", "bound-gemm"):
        assert status[(shapes[0], p)][0] == "ok"
        for case in shapes[1:]:
            assert status[(case, p)] == ("skipped", run.INTERRUPTED), (case, p)
    assert (tmp_path / "cut_summary.md").exists()


def test_rows_say_what_their_figures_leave_out(tmp_path, monkeypatch):
    """A sample count cut by the case budget is flagged on the row (it looked
    like a full one); a forward that also computes the gradients says that
    its TFLOP/s counts one GEMM; the summary quotes the command, also when
    bench.report rewrites it from the CSV."""
    from bench import report, run
    from bench.providers import GemmBound, Nnk

    class GradsInForward(GemmBound):
        name, kind, grads_in_forward = "gradsfwd", "peer", True

    monkeypatch.setattr(run, "ce_providers", lambda: [Nnk("torch"), GradsInForward(), GemmBound()])
    argv = ["--suite", "quick", "--device", "cpu", "--shapes", "vision-plain-N256-D512-C10", "--reps", "5",
            "--min-rounds", "2", "--case-budget", "0", "--warmup", "0", "--min-sample-ms", "0.1", "--no-plots",
            "--out", str(tmp_path), "--tag", "cut"]
    assert run.main(argv) == 0
    rows = report.read_csv(tmp_path / "cut.csv")
    assert rows and all(r["status"] == "ok" and r["rounds"] == 2 for r in rows)
    assert all("2 of 5 rounds: the case's or the run's time budget ran out" in r["notes"] for r in rows)
    assert not any(r["notes"].startswith("; ") for r in rows)
    fwd_notes = {r["provider"]: r["notes"] for r in rows if r["mode"] == "fwd"}
    assert "also computes the gradients" in fwd_notes["gradsfwd"]
    assert "also computes the gradients" not in fwd_notes["nnk-torch"]
    command = "python -m bench " + " ".join(argv)
    assert f"Command: `{command}`" in (tmp_path / "cut_summary.md").read_text()
    (tmp_path / "cut_summary.md").unlink()
    assert report.main([str(tmp_path / "cut.csv")]) == 0
    assert f"Command: `{command}`" in (tmp_path / "cut_summary.md").read_text()
    (tmp_path / "cut_meta.json").write_text("[1, 2]")   # not a run's metadata: no command, no crash
    assert report.recorded_command(tmp_path / "cut.csv") is None


def test_margin_blind_providers_run_once_per_shape(tmp_path):
    """Peers without margins compute the same on a shape's ArcFace case as on
    its CosFace case: the second is skipped with a reason (time on a GPU
    session is short); nnk and the GEMM bound run on both."""
    _bench(tmp_path, "twin", "--shapes", "face-*", "--providers", "nnk-torch,torch-lce,bound-gemm", "--no-plots")
    from bench.report import read_csv

    status = {(r["variant"], r["provider"]): (r["status"], r["notes"]) for r in read_csv(tmp_path / "twin.csv")}
    assert status[("arcface", "nnk-torch")][0] == status[("arcface", "bound-gemm")][0] == "ok"
    if status[("cosface", "torch-lce")][0] != "ok":
        pytest.skip(f"torch-lce not measured here: {status[('cosface', 'torch-lce')]}")
    assert status[("arcface", "torch-lce")] == (
        "skipped", "the same computation as on face-cosface-N256-D128-C4096 (no margins)")


def test_a_sticky_cuda_error_skips_the_rest():
    """After an illegal memory access every CUDA call of the process fails:
    the providers after it are skipped with its name, not recorded as their
    own errors."""
    from bench.providers import GemmBound, Nnk, Provider
    from bench.run import Bench, parse_args
    from bench.shapes import SUITES

    class Crashing(Provider):
        name, kind = "crashing", "peer"

        def build(self, case, inputs):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    args = parse_args(["--suite", "quick", "--device", "cpu", "--reps", "2", "--warmup", "1"])
    env = {k: "-" for k in ("device", "torch", "triton", "nnk", "git_commit")}
    bench = Bench(args, env)
    rows = bench.run_case(SUITES["quick"][0], torch.float32, [Crashing(), Nnk("torch"), GemmBound()])
    assert {r["status"] for r in rows if r["provider"] == "crashing"} == {"error"}
    later = [r for r in rows if r["provider"] != "crashing"]
    assert later and all(r["status"] == "skipped" and "crashing hit a sticky CUDA error" in r["notes"]
                         for r in later)


def test_a_failure_releases_the_failed_steps_tensors():
    """The except block that records a failure holds its traceback, whose
    frames hold the failed step's tensors: they are released before the next
    provider runs (an OOM'd peer would otherwise keep its buffers)."""
    import gc
    import weakref

    from bench.run import _failure

    def step():
        buffer = torch.empty(1 << 10)
        step.buffer = weakref.ref(buffer)
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def wrapped():  # a peer that re-raises: the step's frame hangs off __cause__
        try:
            step()
        except RuntimeError as e:
            raise RuntimeError("the peer's own message: CUDA out of memory") from e

    for run in (step, wrapped):
        try:
            run()
        except RuntimeError as e:
            assert _failure(e)[0] == "oom"
            gc.collect()
            assert step.buffer() is None, run.__name__


def test_script_entry_and_device_errors():
    # The issue's two entries, `python -m bench` and `python bench/run.py`;
    # a CUDA device that is not there is a usage error, not a driver traceback.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--list", "--suite", "quick",
                             "--providers", "nnk-torch"], cwd="/", env=env, capture_output=True, text=True,
                            timeout=300)
    assert script.returncode == 0 and "nnk-torch" in script.stdout, script.stderr[-2000:]
    if not torch.cuda.is_available():
        bad = subprocess.run([sys.executable, "-m", "bench", "--list", "--device", "cuda"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
        assert bad.returncode == 2 and "no CUDA device is available" in bad.stderr, bad.stderr[-2000:]


def test_arcface_near_rows_reports_every_impl(capsys):
    # README's ArcFace figures come from this script: one JSON line per
    # (margin_grad, impl), nnk's error below the float32 reference's there.
    from bench import arcface_near_rows

    arcface_near_rows.main(["--seeds", "2", "--impls", "torch"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["margin_grad"], r["impl"]) for r in rows] == [("exact", "torch"), ("detached", "torch")]
    assert all(r["seeds_past_2x"] == 0 and r["median_dx_error"] < r["reference_median"] for r in rows)


def test_summary_states_the_issue_targets():
    """The summary says per nnk-triton / nnk-cuda fwd+bwd row whether the three
    targets are met (the bound ratio, ref-compile's ratio beside the
    like-for-like torch-compile, the peak beyond the gradients), and compares
    memory beyond the gradients (raw peaks hid the gap in extra memory)."""
    from bench.report import summary_markdown
    from bench.roofline import grads_mb, logits_mb
    from bench.shapes import CE_OP

    n, d, c = 8192, 4096, 131072
    logits, grads = logits_mb(n, c), grads_mb(n, c, d, "bfloat16", "fwdbwd")

    def row(provider, kind, ms, extra, vs_bound=math.nan):
        return {"case": "llm-plain-N8192-D4096-C131072", "dtype": "bfloat16", "op": CE_OP, "mode": "fwdbwd",
                "provider": provider, "kind": kind, "status": "ok", "N": n, "D": d, "C": c, "median_ms": ms,
                "tflops": 1.0, "vs_bound": vs_bound, "peak_mb": grads + extra * logits, "loss": 12.0, "notes": "",
                "suite": "full", "device": "GPU", "torch": "2.11", "triton": "3.6", "nnk": "0.1.0",
                "git_commit": "abc", "timestamp": "now", "p20_ms": ms, "p80_ms": ms}

    text = summary_markdown([row("bound-gemm", "bound", 80.0, 0.0, 1.0),
                             row("nnk-triton", "nnk", 100.0, 0.03, 1.25),
                             row("nnk-cuda", "nnk", 120.0, 0.08, 1.5),
                             row("nnk-cuda-chunk64", "nnk", 125.0, 0.045, 1.56),
                             row("ref-compile", "reference", 400.0, 1.2),
                             row("torch-compile", "pytorch", 160.0, 0.6)])
    assert ("Targets of nnk-triton (fwd+bwd): 1.25× the GEMM bound (≤ 1.35: met); 4.00× faster than ref-compile "
            "(≥ 1.5: met); 1.60× faster than torch-compile (16-bit GEMMs, like for like); peak − grads 3.0% of "
            "the fp32 logits (< 5%: met).") in text
    assert "Targets of nnk-cuda (fwd+bwd): 1.50× the GEMM bound (≤ 1.35: not met)" in text
    assert "peak − grads 8.0% of the fp32 logits (< 5%: not met)" in text
    assert ("Targets of nnk-cuda-chunk64 (fwd+bwd): 1.56× the GEMM bound (≤ 1.35: not met); 3.20× faster than "
            "ref-compile (≥ 1.5: met)") in text and "peak − grads 4.5% of the fp32 logits (< 5%: met)" in text
    assert ("memory ratio (their peak − grads / its peak − grads): ref-compile 4.00× / 40.00×; "
            "torch-compile 1.60× / 20.00×.") in text
