"""Every nnk kernel once on small odd shapes, for ``compute-sanitizer``.

    compute-sanitizer --tool memcheck  --error-exitcode 9 python3 -m bench.sanitize --impl cuda
    compute-sanitizer --tool racecheck --error-exitcode 9 python3 -m bench.sanitize --impl cuda
    compute-sanitizer --tool memcheck  --error-exitcode 9 python3 -m bench.sanitize --impl triton

Covers, per impl: the fused cosine cross-entropy forward and backward in
float32 / float16 / bfloat16 (partial tiles and chunks, every option at least
once: per-class scale, bias, both margins in both ``margin_grad`` modes,
smoothing, z-loss, ignored and zero-norm rows, ``return_lse``, the mean / sum
/ none reductions, deterministic mode, and for ``cuda`` both the
gradients-in-forward op and the two-pass pair, also over several chunks),
the row-normalization ops
(``cuda``), and the NC statistics kernels on (N, D) and (B, N, D) features.
Each result is also compared with nnk's float64 reference, loosely: the
sanitizer finds the memory errors, the comparison catches garbage. Exit
status 1 on a mismatch. ``--device cpu`` dry-runs the script (extension CPU
kernels; Triton under TRITON_INTERPRET=1).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from .providers import environment

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (N, D, C): tails in every tile dimension; C > 1024 so that the CUDA forward
# epilogue's 32-warp merge runs. The extension's blocks of rows x class
# chunks run in run_cce_chunked (the block shape is not reachable from the
# public API).
SHAPES = [(37, 19, 101), (130, 70, 2100)]
CASES = [
    {"scale": 16.0},
    {"scale": "per_class", "bias": True, "additive_margin": 0.2, "reduction": "sum"},
    {"scale": 30.0, "angular_margin": 0.5, "label_smoothing": 0.1, "z_loss": 1e-3, "ignore": True},
    {"scale": 30.0, "angular_margin": 0.5, "margin_grad": "detached", "reduction": "none", "return_lse": True},
    {"scale": 8.0, "deterministic": True, "ignore": True},
]
# Loose bounds (relative to max(1, |truth|)): far above rounding in any of the
# three dtypes, far below what a wrong index or uninitialized memory gives.
TOL = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 1e-1}


def _inputs(n, d, c, case, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(c, d, generator=g, dtype=torch.float64)
    if dtype != torch.float16:  # a zero-norm row (its d x = g / eps overflows float16, as in PyTorch)
        x[3] = 0.0
    t = torch.randint(0, c, (n,), generator=g)
    if case.get("ignore"):
        t[::5] = -100
    leaves = {"x": x, "w": w}
    kw = {k: v for k, v in case.items() if k not in ("ignore", "scale", "bias")}
    if case["scale"] == "per_class":
        leaves["scale"] = torch.rand(c, generator=g, dtype=torch.float64) * 20 + 1
    else:
        kw["scale"] = case["scale"]
    if case.get("bias"):
        leaves["bias"] = torch.randn(c, generator=g, dtype=torch.float64)
    ours = {k: (v.to(device=device, dtype=dtype if k in ("x", "w", "bias") else torch.float32)
                .requires_grad_()) for k, v in leaves.items()}
    ref = {k: v.clone().requires_grad_() for k, v in leaves.items()}
    return ours, ref, t, kw


def _loss_and_grads(fn, leaves, t, kw):
    extra = {k: leaves[k] for k in ("scale", "bias") if k in leaves}
    out = fn(leaves["x"], leaves["w"], t, **kw, **extra)
    loss, lse = out if kw.get("return_lse") else (out, None)
    total = loss.sum() + (0.3 * lse.sum() if lse is not None else 0.0)
    grads = torch.autograd.grad(total, list(leaves.values()))
    return [loss, *([lse] if lse is not None else []), *grads]


def _close(name, got, want, tol, failures):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    err = (got - want).abs().max().item() if want.numel() else 0.0
    if not torch.isfinite(got).all() or err > tol * max(1.0, want.abs().max().item()):
        failures.append(f"{name}: max error {err:.3g}")


def run_cce(impl, device, dtypes, failures):
    import nnk
    from nnk.reference import cosine_cross_entropy_ref

    settings = ["0"] + (["1"] if impl == "cuda" else [])  # NNK_GRAD_IN_FORWARD: both extension paths
    for dtype in dtypes:
        for n, d, c in SHAPES:
            for i, case in enumerate(CASES):
                for env in settings:
                    ours, ref, t, kw = _inputs(n, d, c, case, dtype, device, seed=i)
                    with environment({"NNK_GRAD_IN_FORWARD": env}):
                        got = _loss_and_grads(lambda *a, **k: nnk.cosine_cross_entropy(*a, impl=impl, **k),
                                              ours, t.to(device), kw)
                    want = _loss_and_grads(cosine_cross_entropy_ref, ref, t,
                                           {k: v for k, v in kw.items() if k != "deterministic"})
                    for j, (a, b) in enumerate(zip(got, want)):
                        _close(f"cce {impl} NNK_GRAD_IN_FORWARD={env} {dtype} {(n, d, c)} case {i} output {j}",
                               a, b, TOL[dtype], failures)
    print(f"cce {impl}: {len(dtypes) * len(SHAPES) * len(CASES) * len(settings)} fwd+bwd runs", flush=True)


def run_cce_chunked(device, dtypes, failures):
    """The extension's loops over blocks (several row chunks and a partial
    one; one class chunk, or several and a partial one) on both training
    paths, through the backend entries that take the block shape."""
    from nnk._options import check_tensors, make_options
    from nnk.impl.extension import cosine_cross_entropy_extension, cosine_cross_entropy_extension_reduced
    from nnk.reference import cosine_cross_entropy_ref, reduce_rows

    case = {"scale": "per_class", "bias": True, "angular_margin": 0.3, "label_smoothing": 0.1, "ignore": True}
    opts = make_options(normalize_input=True, normalize_weight=True, additive_margin=0.0, angular_margin=0.3,
                        margin_grad="exact", ignore_index=-100, label_smoothing=0.1, z_loss=0.0, eps=1e-12,
                        deterministic=False)

    def two_pass(x, w, t, *, scale, bias, block, **kw):
        t, scale = check_tensors(x, w, t, scale, bias, opts)
        row, _ = cosine_cross_entropy_extension(x, w, t, scale, bias, opts, chunk_rows=16, chunk_classes=block)
        return reduce_rows(row, t != opts.ignore_index, "mean")

    def fused(x, w, t, *, scale, bias, block, **kw):
        t, scale = check_tensors(x, w, t, scale, bias, opts)
        return cosine_cross_entropy_extension_reduced(x, w, t, scale, bias, opts, "mean", chunk_rows=16,
                                                      chunk_classes=block)

    for dtype in dtypes:
        ours, ref, t, kw = _inputs(130, 70, 2100, case, dtype, device, seed=7)
        want = _loss_and_grads(cosine_cross_entropy_ref, ref, t, kw)
        for classes in (None, 512):
            # float16 never takes the fused path (nnk.impl.extension.grad_in_forward),
            # whose op refuses float16 gradients on CUDA.
            paths = (("two-pass", two_pass),) + ((("fused", fused),) if dtype != torch.float16 else ())
            for name, fn in paths:
                got = _loss_and_grads(fn, ours, t.to(device), {**kw, "block": classes})
                for j, (a, b) in enumerate(zip(got, want)):
                    _close(f"cce cuda chunked {name} classes={classes} {dtype} output {j}", a, b, TOL[dtype],
                           failures)
    print("cce cuda: blocks of 16 rows x (all, 512) classes, both training paths per dtype", flush=True)


def run_row_normalize(device, dtypes, failures):
    from nnk.ops import row_normalize

    for dtype in dtypes:
        x = torch.randn(45, 77, dtype=torch.float64)
        if dtype != torch.float16:
            x[2] = 0.0
        xd = x.to(device=device, dtype=dtype).requires_grad_()
        y, norm = row_normalize(xd)
        g = torch.randn(45, 77, dtype=torch.float64)
        (gx,) = torch.autograd.grad(y, [xd], g.to(device=device, dtype=dtype))
        xr = x.clone().requires_grad_()
        yr = torch.nn.functional.normalize(xr, dim=1, eps=1e-12)
        (gr,) = torch.autograd.grad(yr, [xr], g)
        _close(f"row_normalize {dtype} y", y, yr, TOL[dtype], failures)
        _close(f"row_normalize {dtype} norm", norm, x.norm(dim=1), TOL[dtype], failures)
        _close(f"row_normalize {dtype} grad", gx, gr, TOL[dtype], failures)
    print("row_normalize: fwd+bwd per dtype", flush=True)


def run_nc(impl, device, dtypes, failures):
    import nnk

    for dtype in dtypes:
        for shape in ((301, 67), (3, 150, 40)):
            h = torch.randn(*shape, dtype=torch.float64)
            y = torch.randint(0, 13, (shape[-2],))
            y[y == 5] = 6  # a class without samples
            got = nnk.nc_stats(h.to(device=device, dtype=dtype), y.to(device), 13, impl=impl)
            want = nnk.nc_stats(h.to(dtype).double(), y, 13, impl="torch")
            for field in ("counts", "means", "sigma_w", "sigma_b"):
                _close(f"nc {impl} {dtype} {shape} {field}", getattr(got, field), getattr(want, field),
                       TOL[dtype], failures)
    print(f"nc {impl}: class sums + centered Gram per dtype and shape", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--impl", choices=["cuda", "triton"], required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="fp32,fp16,bf16", help="comma list of fp32/fp16/bf16")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu" and args.impl == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("--impl triton on the CPU needs TRITON_INTERPRET=1")
    dtypes = [DTYPES[s] for s in args.dtype.split(",")]
    failures: list[str] = []
    run_cce(args.impl, device, dtypes, failures)
    if args.impl == "cuda":
        run_cce_chunked(device, dtypes, failures)
        run_row_normalize(device, dtypes, failures)
    run_nc(args.impl, device, dtypes, failures)
    if device.type == "cuda":
        torch.cuda.synchronize()
    for f in failures:
        print("MISMATCH", f)
    print("sanitize:", "FAILED" if failures else "ok", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
