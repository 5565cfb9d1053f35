"""``python -m nnk demo``: its options, and a reduced run (--quick) that writes a
JSON of finite figures and a PNG."""
import json
import math
import subprocess
import sys

import pytest
import torch

from nnk.demo import HEADS, NC_FIELDS, main


def _numbers(obj):
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)


def test_help_lists_the_options():
    out = subprocess.run([sys.executable, "-m", "nnk", "demo", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for opt in ("--epochs", "--scale", "--margin", "--out", "--device", "--seed", "--quick"):
        assert opt in out, opt


def test_quick_demo_writes_finite_figures_and_a_plot(tmp_path, capsys):
    out = tmp_path / "demo-out"
    assert main(["--quick", "--epochs", "3", "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "throughput on cpu" in printed and "nnk.cosine_cross_entropy" in printed

    report = json.loads((out / "demo.json").read_text())
    assert report["device"] == "cpu" and report["config"]["epochs"] == 3
    nums = list(_numbers(report))
    assert nums and all(math.isfinite(v) for v in nums)
    for head in HEADS:
        h = report["heads"][head]
        assert h["epoch"] == [1, 2, 3]
        for key in ("loss", "test_acc") + NC_FIELDS:
            assert len(h[key]) == 3 and all(v is not None for v in h[key]), (head, key)
        assert 0.0 <= h["test_acc"][-1] <= 1.0 and h["nc1"][-1] >= 0.0
        # Both heads learn something in 3 epochs (10 classes: chance is 10%).
        assert h["test_acc"][-1] > 0.5 and h["loss"][-1] < h["loss"][0]
        # The mean loss per sample (not per batch): the first epoch starts
        # near log(10) = 2.3 for 10 classes.
        assert 0.3 < h["loss"][0] < 10.0, (head, h["loss"][0])
    tp = report["throughput"]
    assert tp["speedup"] == pytest.approx(tp["reference_ms"] / tp["fused_ms"], rel=1e-9)
    assert tp["fused_ms"] > 0 and tp["reference_ms"] > 0 and tp["impl"] == "torch"

    png = (out / "demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.parametrize("argv,msg", [
    (["--scale", "-1"], "scale"), (["--angular-margin", "30"], "angular_margin must be <="),
    (["--angular-margin", "2"], "pass scale= explicitly"), (["--device", "tpu"], "tpu"),
    (["--batch-size", "0"], "batch-size"), (["--lr", "0"], "lr"), (["--epochs", "0"], "epochs"),
    (["--out", "/proc/nnk_out"], "--out /proc/nnk_out"),
])
def test_bad_arguments_are_usage_errors(argv, msg, capsys):
    # Checked before any work: argparse's exit code 2 and message, not a traceback mid-run.
    with pytest.raises(SystemExit) as e:
        main(argv + ["--quick", "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and msg in err, err


def test_cuda_device_without_a_gpu_is_a_usage_error(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        main(["--device", "cuda", "--quick", "--no-progress"])
    assert e.value.code == 2 and "no CUDA device" in capsys.readouterr().err
