"""Shared cases of the cosine cross-entropy tests: option sets, input makers and
an fp64 ground truth written independently of nnk.reference (literal acos/cos,
explicit smoothing sum), so that the reference itself is checked."""
from __future__ import annotations

import math

import torch

from nnk.reference import cosine_cross_entropy_ref

IGNORE = -100

# (id, options). Tensor-valued options are given as ("scale_scalar_tensor", v) etc.
# and materialized per test by make_inputs, so that each test gets fresh leaves.
OPTION_CASES = [
    ("plain", {}),
    ("scale20", {"scale": 20.0}),
    ("scale_tensor", {"scale": "tensor0d"}),
    ("scale_per_class", {"scale": "per_class"}),
    ("bias", {"bias": True}),
    ("cosface", {"scale": 30.0, "additive_margin": 0.35}),
    ("arcface_exact", {"scale": 30.0, "angular_margin": 0.5}),
    ("arcface_detached", {"scale": 30.0, "angular_margin": 0.5, "margin_grad": "detached"}),
    ("combined", {"scale": "per_class", "bias": True, "angular_margin": 0.3, "additive_margin": 0.2}),
    ("smoothing", {"scale": 10.0, "label_smoothing": 0.2}),
    ("z_loss", {"scale": 10.0, "z_loss": 1e-2}),
    ("ignored", {"scale": 10.0, "ignore": True}),
    ("ignore_index_custom", {"scale": 10.0, "ignore": True, "ignore_index": 3}),
    ("sum", {"scale": 5.0, "reduction": "sum"}),
    ("none", {"scale": 5.0, "reduction": "none", "ignore": True}),
    ("no_input_norm", {"normalize_input": False, "additive_margin": 0.1}),
    ("no_weight_norm", {"normalize_weight": False, "scale": 2.0}),
    ("linear", {"normalize_input": False, "normalize_weight": False, "bias": True}),
    ("everything", {"scale": "per_class", "bias": True, "angular_margin": 0.4, "additive_margin": 0.1,
                    "label_smoothing": 0.1, "z_loss": 1e-3, "ignore": True, "reduction": "sum"}),
]


def make_inputs(n, d, c, opts, *, dtype=torch.float64, device="cpu", seed=0, requires_grad=True):
    """Returns (x, weight, target, kwargs) for nnk.cosine_cross_entropy and the
    leaves (name -> tensor) whose gradients the tests compare."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    w = torch.randn(c, d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    target = torch.randint(0, c, (n,), generator=g).to(device)
    kw = {k: v for k, v in opts.items() if k not in ("scale", "bias", "ignore")}
    leaves = {"x": x, "weight": w}
    if opts.get("ignore"):
        ign = kw.get("ignore_index", IGNORE)
        target[::3] = ign
    sc = opts.get("scale", 1.0)
    if sc == "tensor0d":
        sc = torch.tensor(12.0, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device)
        leaves["scale"] = sc
    elif sc == "per_class":
        sc = (torch.rand(c, generator=g, dtype=torch.float64) * 20 + 1).to(
            device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        leaves["scale"] = sc
    kw["scale"] = sc
    if opts.get("bias"):
        b = torch.randn(c, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
        kw["bias"] = b
        leaves["bias"] = b
    if requires_grad:
        for t in leaves.values():
            t.requires_grad_(True)
    return x, w, target, kw, leaves


def ground_truth(x, weight, target, *, scale=1.0, bias=None, normalize_input=True, normalize_weight=True,
                 additive_margin=0.0, angular_margin=0.0, margin_grad="exact", ignore_index=IGNORE,
                 label_smoothing=0.0, reduction="mean", z_loss=0.0, eps=1e-12, return_lse=False):
    """fp64 loss from the formulas of the API docstring, written without nnk."""
    del margin_grad  # the value does not depend on it
    xd, wd = x.detach().double(), weight.detach().double()
    if normalize_input:
        xd = xd / xd.norm(dim=1, keepdim=True).clamp_min(eps)
    if normalize_weight:
        wd = wd / wd.norm(dim=1, keepdim=True).clamp_min(eps)
    cos = xd @ wd.T
    n, c = cos.shape
    s = scale.detach().double() if isinstance(scale, torch.Tensor) else torch.tensor(float(scale), dtype=torch.float64)
    s_vec = s.expand(c) if s.dim() == 0 else s
    logits = cos * s_vec
    valid = target != ignore_index
    for i in range(n):
        if not valid[i]:
            continue
        y = int(target[i])
        ct = float(cos[i, y])
        psi = ct
        if angular_margin:
            th = math.acos(min(1.0, max(-1.0, ct)))
            psi = math.cos(th + angular_margin) if th + angular_margin <= math.pi else ct - angular_margin * math.sin(angular_margin)
        psi -= additive_margin
        logits[i, y] = s_vec[y] * psi
    if bias is not None:
        logits = logits + bias.detach().double()
    lse = torch.logsumexp(logits, dim=1)
    rows = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        if valid[i]:
            y = int(target[i])
            rows[i] = (lse[i] - (1 - label_smoothing) * logits[i, y] - label_smoothing / c * logits[i].sum()
                       + z_loss * lse[i] ** 2)
    if reduction == "none":
        loss = rows
    elif reduction == "sum":
        loss = rows.sum()
    else:
        loss = rows.sum() / valid.sum()
    return (loss, lse) if return_lse else loss


def max_err(a, b):
    return (a.detach().double() - b.detach().double()).abs().max().item() if a.numel() else 0.0


# Weight of the lse output in the test objective: its gradient (+ g_lse * softmax)
# is part of the backend contract, so every gradient check includes it.
LSE_WEIGHT = 0.3


def objective(loss, lse):
    """Scalar the gradient tests differentiate: the loss (summed if per-row) plus
    row-dependent multiples of the lse, so that g_lse is not a constant (the
    loss alone when lse is None)."""
    total = loss if loss.dim() == 0 else loss.sum()
    if lse is None:
        return total
    weights = torch.linspace(-1.0, 1.0, lse.shape[0], dtype=lse.dtype, device=lse.device)
    return total + LSE_WEIGHT * (lse * weights).sum()


def grads(loss, lse, leaves):
    return dict(zip(leaves, torch.autograd.grad(objective(loss, lse), list(leaves.values()))))


def reference(x, w, t, kw):
    return cosine_cross_entropy_ref(x, w, t, return_lse=True, **kw)


def _split_rows(name, got, truth, small):
    """``{name: (got, truth)}`` over the rows that ``small`` leaves out, and
    ``{name/zero: ...}`` over those it marks, when it marks any."""
    if small is None or not small.any():
        return {name: (got, truth)}
    return {name: (got[~small], truth[~small]), f"{name}/zero": (got[small], truth[small])}


def error_table(fn, opts, n, d, c, dtype, *, device="cpu", seed=0, mutate=None, with_lse=True):
    """Errors of ``fn(x, w, t, kw) -> (loss, lse)`` and of the same-dtype
    reference against the fp64 reference on the same (rounded) inputs: loss,
    lse and every gradient (lse in the objective), as
    ``{"impl": {name: err}, "ref": {name: err}, "mag": {name: max |truth|}}``.
    The rows of x and W whose norm is below eps (their gradient is ~1/eps
    times the others') are judged apart, as ``"x/zero"`` and ``"weight/zero"``:
    within one maximum their errors would hide every other row's.
    ``mutate(x, w, t)`` edits the inputs in place first (peaked rows, zero rows).
    ``with_lse=False``: ``fn`` returns the loss alone and the lse is left out
    of the comparison and the objective."""
    x, w, t, kw, leaves = make_inputs(n, d, c, opts, dtype=dtype, seed=seed, device=device)
    x64, w64, _, kw64, leaves64 = make_inputs(n, d, c, opts, dtype=torch.float64, seed=seed, device=device)
    with torch.no_grad():
        if mutate is not None:
            mutate(x, w, t)
        for k in leaves:  # ground truth on exactly the rounded low-precision values
            leaves64[k].copy_(leaves[k].double())

    def outputs(got):  # (loss, lse); lse None without with_lse
        if with_lse:
            return got
        return (got[0] if isinstance(got, tuple) else got), None

    truth = outputs(reference(x64, w64, t, kw64))
    g_truth = grads(*truth, leaves64)
    eps = kw.get("eps", 1e-12)
    small = {"x": x64.norm(dim=1) < eps if kw.get("normalize_input", True) else None,
             "weight": w64.norm(dim=1) < eps if kw.get("normalize_weight", True) else None}

    def parts(g):  # name -> (got, truth), the small-norm rows apart
        out = {}
        for k in g:
            out.update(_split_rows(k, g[k], g_truth[k], small.get(k)))
        return out

    out = {"mag": {"loss": truth[0].abs().max().item()}}
    if with_lse:
        out["mag"]["lse"] = truth[1].abs().max().item()
    out["mag"].update({k: tr.abs().max().item() if tr.numel() else 0.0 for k, (_, tr) in parts(g_truth).items()})
    for name, f in (("impl", fn), ("ref", reference)):
        loss, lse = outputs(f(x, w, t, kw))
        g = grads(loss, lse, leaves)
        errs = {"loss": max_err(loss, truth[0])}
        if with_lse:
            errs["lse"] = max_err(lse, truth[1])
        errs.update({k: max_err(got, tr) for k, (got, tr) in parts(g).items()})
        out[name] = errs
    return out


def assert_within_bound(errs, atol, rtol=0.0):
    """Every error of the impl within 2x the same-dtype reference's, plus atol
    and rtol times the quantity's magnitude."""
    for k, e in errs["impl"].items():
        bound = 2 * errs["ref"][k] + atol + rtol * errs["mag"][k]
        assert e <= bound, f"{k}: impl error {e:.3g} vs reference {errs['ref'][k]:.3g} (magnitude {errs['mag'][k]:.3g})"
