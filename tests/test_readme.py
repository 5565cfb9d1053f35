"""Every ```python block of README.md runs, each in a fresh namespace."""
import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _python_blocks():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    blocks = []
    for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
        line = text.count("\n", 0, m.start()) + 1
        blocks.append(pytest.param(m.group(1), id=f"README.md:{line}"))
    return blocks


BLOCKS = _python_blocks()


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("code", BLOCKS)
def test_readme_block_runs(code):
    exec(compile(code, README, "exec"), {"__name__": "__readme__"})


def test_readme_demo_table_matches_the_committed_results():
    import json

    root = os.path.dirname(README)
    with open(os.path.join(root, "bench", "results", "demo-cpu.json")) as f:
        final = json.load(f)["final"]
    with open(README, encoding="utf-8") as f:
        text = f.read()
    lin, cos = final["linear"], final["cosine"]
    rows = [
        ("train loss", "{:.4f}", "loss"),
        ("test accuracy (360 images)", "{:.2%}", "test_acc"),
        ("NC1", "{:.3f}", "nc1"),
        ("NC2", "{:.3f}", "nc2"),
        ("NC3", "{:.3f}", "nc3"),
        ("NC4", "{:.4f}", "nc4"),
    ]
    for label, fmt, key in rows:
        row = f"| {label} | {fmt.format(lin[key])} | {fmt.format(cos[key])} |"
        assert row in text, row


def test_readme_functional_block_shows_every_option():
    import inspect

    import nnk

    block = next(p.values[0] for p in BLOCKS if "nnk.cosine_cross_entropy(" in p.values[0])
    for name, param in inspect.signature(nnk.cosine_cross_entropy).parameters.items():
        if param.kind is inspect.Parameter.KEYWORD_ONLY:
            assert f"    {name}=" in block, name
