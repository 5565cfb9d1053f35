"""``python -m nnk nc FEATURES LABELS [--weight W] [--bias B] [--json]``:
neural-collapse metrics of saved tensors (``.pt`` or ``.npy``)."""
from __future__ import annotations

import argparse
import json
import sys

import torch

from .metrics import NCMetrics, nc_metrics


class _InputError(Exception):
    pass


def _load(path: str, what: str) -> torch.Tensor:
    try:
        if path.endswith(".npy"):
            import numpy as np

            return torch.from_numpy(np.load(path, allow_pickle=False))
        if path.endswith(".pt") or path.endswith(".pth"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise _InputError(f"{what} {path!r}: expected a .pt/.pth or .npy file")
    except OSError as e:
        raise _InputError(f"{what} {path!r}: {e.strerror or e}") from e
    except _InputError:
        raise
    except Exception as e:  # noqa: BLE001 (a malformed file makes the unpicklers raise anything)
        raise _InputError(f"{what} {path!r}: cannot read it ({type(e).__name__}: {e})") from e
    if not isinstance(obj, torch.Tensor):
        raise _InputError(f"{what} {path!r} must hold one tensor, got {type(obj).__name__}")
    return obj


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m nnk nc",
        description="Neural-collapse metrics (NC1-NC4) of saved penultimate features.",
    )
    p.add_argument("features", help="(N, D) features, .pt or .npy")
    p.add_argument("labels", help="(N,) integer labels, .pt or .npy")
    p.add_argument("--weight", help="(K, D) classifier weight, .pt or .npy (enables nc2, nc3, nc4)")
    p.add_argument("--bias", help="(K,) classifier bias, .pt or .npy (used by nc4)")
    p.add_argument("--num-classes", type=int, help="K (default: weight rows, else max label + 1)")
    p.add_argument("--device", default="cpu", help="torch device to compute on (default: cpu)")
    p.add_argument("--impl", default="auto", choices=("auto", "triton", "torch", "cuda"))
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    return p


def _table(m: NCMetrics) -> str:
    def fmt(v):
        return "n/a (needs --weight)" if v is None else f"{v:.6g}"

    lines = [
        f"samples          {m.n}",
        f"classes          {m.num_present} of {m.num_classes} have samples"
        + (f"; missing: {list(m.missing_classes)}" if m.missing_classes else ""),
        f"nc1              {fmt(m.nc1)}",
        f"nc2              {fmt(m.nc2)}",
        f"nc2_equinorm     {fmt(m.nc2_equinorm)}",
        f"nc2_equiangular  {fmt(m.nc2_equiangular)}",
        f"nc3              {fmt(m.nc3)}",
        f"nc3_duality      {fmt(m.nc3_duality)}",
        f"nc4              {fmt(m.nc4)}",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    """Exit code 0 on success, 2 on bad arguments or input files."""
    try:
        args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:  # --help (0) or a usage error (2, message printed)
        return int(e.code or 0)
    try:
        dev = torch.device(args.device)
        features = _load(args.features, "features").to(dev)
        labels = _load(args.labels, "labels").to(dev)
        weight = _load(args.weight, "weight").to(dev) if args.weight else None
        bias = _load(args.bias, "bias").to(dev) if args.bias else None
        if features.dim() != 2:
            raise _InputError(f"features must be 2-D (N, D), got shape {tuple(features.shape)}")
        m = nc_metrics(features, labels, weight, bias, args.num_classes, impl=args.impl)
    except (_InputError, TypeError, ValueError, RuntimeError) as e:
        print(f"python -m nnk nc: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(m.as_dict(), indent=2) if args.json else _table(m))
    return 0
