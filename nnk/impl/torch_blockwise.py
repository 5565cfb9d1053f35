"""``impl="torch"``: the cosine cross-entropy in blocks of rows x classes with an
online log-sum-exp, in plain PyTorch ops (any device; what "auto" picks on CPU).

No N x C buffer ever exists: the forward keeps per row a running max, sum of
the other exponentials (nnk/impl/lse.py), target logit and (for label
smoothing) sum of logits; the backward recomputes each logit tile and turns
it into its gradient on the spot.
Extra memory is O((N + C) * D) for the normalized operands and gradient
accumulators plus one tile of ``block_rows x block_classes`` (a few copies).

Math per tile (all in float32, float64 for float64 input), with z the logits,
``lse`` the row log-sum-exp and g the upstream gradient of each row loss:
``dz = g * (p - (1 - ls) onehot - ls / C) + (2 zl lse g + g_lse) * p``,
``dcos = dz * scale`` (times ``dpsi/dcos`` on the target column),
``dxn += dcos @ wn``, ``dwn += dcos.T @ xn``, ``dscale += sum(dz * cos')``,
``dbias += sum_rows(dz)``, then back through the normalizations.
"""
from __future__ import annotations

import math

import torch

from . import fused_backward
from .lse import merge_partials, tile_partial
from .._options import CCEOptions
from ..ops import row_normalize, row_normalize_backward
from ..reference import acc_dtype, margin_grad_ref, margin_value_ref, target_sine_ref

# Elements of one logits tile: 2^21 float32 = 8 MiB; the backward holds about
# four tile-sized temporaries.
TILE_ELEMENTS = 1 << 21
MAX_BLOCK_ROWS = 1024


def _blocks(n: int, c: int, block_rows: int | None, block_classes: int | None):
    """(rows, classes) per tile; rows None: every row in one tile. While
    torch.compile traces, tiles take all rows and 2^21 / 1024 classes: a row
    loop (or a tile width) that depends on N makes Dynamo specialize N, one
    graph per batch size (dynamic=True too) until the recompile limit, where
    fullgraph=True fails. The tile is then N x 2048 (the eager tiles hold
    2^21 logits, as these do up to N = 1024)."""
    if block_rows is None and torch.compiler.is_compiling():
        return None, block_classes or max(1, min(c, TILE_ELEMENTS // MAX_BLOCK_ROWS))
    r = block_rows or max(1, min(n, MAX_BLOCK_ROWS))
    b = block_classes or max(1, min(c, TILE_ELEMENTS // max(r, 1)))
    return r, b


def row_blocks(n: int, r_blk: int | None) -> list[slice]:
    """The tiles' row slices (one of all rows for r_blk None: see _blocks)."""
    if r_blk is None:
        return [slice(None)]
    return [slice(r0, min(n, r0 + r_blk)) for r0 in range(0, n, r_blk)]


def _normalized(t: torch.Tensor, on: bool, eps: float):
    acc = t.to(acc_dtype(t.dtype))
    if not on:
        return acc, None
    return row_normalize(acc, eps)


class _BlockwiseCCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, scale, bias, target, opts: CCEOptions, block_rows, block_classes):
        n, c = x.shape[0], weight.shape[0]
        acc = acc_dtype(x.dtype)
        # 1. Normalized operands in the accumulation dtype (O((N + C) D)).
        xn, xnorm = _normalized(x, opts.normalize_input, opts.eps)
        wn, wnorm = _normalized(weight, opts.normalize_weight, opts.eps)
        s = scale.to(acc) if isinstance(scale, torch.Tensor) else scale
        b = bias.to(acc) if bias is not None else None
        valid = target != opts.ignore_index
        t = torch.where(valid, target, torch.zeros_like(target))

        # 2. Target cosine, margin, target logit: O(N D), one gathered row each;
        #    ArcFace's sin(theta) and branch from a float64 cosine
        #    (target_sine_ref), float64 input's from its own cosine.
        cos_t = (xn * wn[t]).sum(dim=1)
        sin_t = None
        if opts.angular_margin != 0.0 and acc != torch.float64:
            sin_t = target_sine_ref(x, weight, t, angular_margin=opts.angular_margin, eps=opts.eps)
        psi = torch.where(valid, margin_value_ref(cos_t, opts.angular_margin, opts.additive_margin, sin_t), cos_t)
        s_t = s[t] if isinstance(s, torch.Tensor) and s.dim() == 1 else s
        z_t = psi * s_t + (b[t] if b is not None else 0.0)

        # 3. Online log-sum-exp (and sum of logits for smoothing) over tiles,
        #    as (max, rest) partials (nnk/impl/lse.py).
        r_blk, c_blk = _blocks(n, c, block_rows, block_classes)
        run_max = torch.full((n,), float("-inf"), dtype=acc, device=x.device)
        run_rest = torch.zeros((n,), dtype=acc, device=x.device)
        sum_z = torch.zeros((n,), dtype=acc, device=x.device) if opts.label_smoothing else None
        for rows in row_blocks(n, r_blk):
            for c0 in range(0, c, c_blk):
                z, _ = _tile(xn[rows], wn, s, b, t[rows], valid[rows], z_t[rows], psi[rows], c0, min(c, c0 + c_blk))
                blk_max, blk_rest = tile_partial(z)
                run_max[rows], run_rest[rows] = merge_partials(torch.stack((run_max[rows], blk_max)),
                                                               torch.stack((run_rest[rows], blk_rest)))
                if sum_z is not None:
                    sum_z[rows] += z.sum(dim=1)
        log_sum = run_rest.log1p()
        lse = run_max + log_sum
        # A row holding +inf: lse = +inf, as torch.logsumexp; a NaN log sum
        # makes its loss and probabilities NaN, as F.cross_entropy's
        # (math.h lse_finish).
        log_sum = torch.where(lse == math.inf, math.nan, log_sum)

        # 4. Row loss: lse - (1 - ls) z_t - (ls / C) sum_z + zl lse^2 (0 if
        #    ignored), grouped as math.h's row_loss, with lse as max + log sum
        #    unrounded (log sum = log1p(rest)): (1 - ls)((max - z_t) +
        #    log sum) + ls ((max - sum_z / C) + log sum), small differences
        #    where the loss is small (a confident row, C = 1).
        ls = opts.label_smoothing
        row = (1.0 - ls) * ((run_max - z_t) + log_sum)
        if sum_z is not None:
            row = row + ls * ((run_max - sum_z / c) + log_sum)
        if opts.z_loss:
            row = row + opts.z_loss * lse.square()
        row = torch.where(valid, row, torch.zeros_like(row))

        # The backward takes p = exp((z - max) - log sum), as log_softmax does:
        # exp(z - lse) with lse rounded to float32 errs by half an ulp of |lse|
        # (s = 64: 4e-6) in every probability, up to 7x the reference's error.
        ctx.save_for_backward(xn, xnorm, wn, wnorm, t, valid, cos_t, sin_t, psi, z_t, lse, run_max, log_sum,
                              scale if isinstance(scale, torch.Tensor) else None, bias)
        ctx.opts, ctx.blocks, ctx.py_scale = opts, (r_blk, c_blk), scale
        ctx.dtypes = (x.dtype, weight.dtype)
        return row, lse

    @staticmethod
    @fused_backward
    def backward(ctx, g_row, g_lse):
        xn, xnorm, wn, wnorm, t, valid, cos_t, sin_t, psi, z_t, lse, run_max, log_sum, scale, bias = ctx.saved_tensors
        opts: CCEOptions = ctx.opts
        r_blk, c_blk = ctx.blocks
        n, c = xn.shape[0], wn.shape[0]
        acc = xn.dtype
        s = scale.to(acc) if scale is not None else ctx.py_scale
        b = bias.to(acc) if bias is not None else None
        per_class = isinstance(s, torch.Tensor) and s.dim() == 1
        # Only the contractions some input needs (linear probing on a frozen
        # backbone needs no d x; a frozen head's weight no d W).
        need_x, need_w = ctx.needs_input_grad[:2]
        need_s = scale is not None and ctx.needs_input_grad[2]
        need_b = bias is not None and ctx.needs_input_grad[3]

        ls = opts.label_smoothing
        g = torch.where(valid, g_row.to(acc), torch.zeros_like(lse))
        # dz = g ((p - ls / C) - [c == y] (1 - ls)) + coef_z p (math.h dlogit):
        # the target's p - 1 from expm1 (pm1_t below); g's factor first, where
        # a row whose target takes all the probability (C = 1) gets
        # exactly 0 (g p - g ls / C - g (1 - ls) left ~1e-7 g, times 1 / eps
        # in the d x of a zero row: 6e5, inf in float16); the z-loss term and
        # the lse output's (d lse / dz = softmax) apart, not rounded against 1.
        coef_z = 2.0 * (opts.z_loss * g) * lse if opts.z_loss else None
        if g_lse is not None:
            coef_z = g_lse.to(acc) if coef_z is None else coef_z + g_lse.to(acc)
        # Rows without a finite logit (lse = -inf: a -inf bias on every class
        # of a class-parallel shard) and without upstream gradient (the
        # combined loss gives such a shard's terms zero weight) get p = 0, not
        # exp(-inf + inf) = NaN; with an upstream gradient their NaN
        # propagates as F.cross_entropy's (math.h dlogit).
        empty = (run_max == float("-inf")) & (g == 0)
        if g_lse is not None:
            empty &= g_lse == 0
        if coef_z is not None:
            coef_z = torch.where(empty, 0.0, coef_z)
        run_max = torch.where(empty, float("inf"), run_max)
        log_sum = torch.where(empty, 0.0, log_sum)
        dpsi = margin_grad_ref(cos_t, opts.angular_margin, opts.exact_margin, sin_t)
        # The target's (p - 1) + ls - ls / C, its p - 1 from expm1, not rounded
        # against 1: an ulp of p is 10% of a confident row's p - 1 ~ -1e-6,
        # and CUDA's exp may err by 2 ulp (math.h dlogit).
        pm1_t = ((z_t - run_max) - log_sum).expm1_() + (ls - ls / c)

        dxn = torch.zeros_like(xn) if need_x else None
        dwn = torch.zeros_like(wn) if need_w else None
        ds = torch.zeros(c if per_class else (), dtype=acc, device=xn.device) if need_s else None
        db = torch.zeros(c, dtype=acc, device=xn.device) if need_b else None
        for rows in row_blocks(n, r_blk):
            for c0 in range(0, c, c_blk):
                c1 = min(c, c0 + c_blk)
                # 1. Recompute the tile exactly as the forward did.
                z, cos = _tile(xn[rows], wn, s, b, t[rows], valid[rows], z_t[rows], psi[rows], c0, c1)
                # 2. dz from the softmax p.
                p = (z - run_max[rows, None]).sub_(log_sum[rows, None]).exp_()
                dz = p - ls / c if coef_z is not None else p.sub_(ls / c)
                col, inside = _target_slots(t[rows], valid[rows], c0, c1)
                _update_targets(dz, col, inside, lambda old: pm1_t[rows])
                dz = dz.mul_(g[rows, None])
                if coef_z is not None:
                    dz = dz.add_(p.mul_(coef_z[rows, None]))
                if db is not None:
                    db[c0:c1] += dz.sum(dim=0)
                if ds is not None:
                    contrib = (dz * cos).sum(dim=0)
                    if per_class:
                        ds[c0:c1] += contrib
                    else:
                        ds += contrib.sum()
                if not (need_x or need_w):
                    continue
                # 3. dcos = dz * scale, with d psi / d cos on the target column.
                dcos = dz.mul_(s[c0:c1] if per_class else s)
                _update_targets(dcos, col, inside, lambda old: old * dpsi[rows])
                if need_x:
                    dxn[rows] += dcos @ wn[c0:c1]
                if need_w:
                    dwn[c0:c1] += dcos.T @ xn[rows]

        # 4. Through the normalizations (or straight through when off).
        x_dtype, w_dtype = ctx.dtypes
        dx = dw = None
        if need_x:
            dx = (row_normalize_backward(dxn, xn, xnorm, opts.eps) if xnorm is not None else dxn).to(x_dtype)
        if need_w:
            dw = (row_normalize_backward(dwn, wn, wnorm, opts.eps) if wnorm is not None else dwn).to(w_dtype)
        return (
            dx,
            dw,
            ds.to(scale.dtype) if ds is not None else None,
            db.to(bias.dtype) if db is not None else None,
            None, None, None, None,
        )


def _target_slots(t, valid, c0, c1):
    """Per row, the tile column of its target (clamped into [0, c1 - c0)) and
    whether the target really lies in [c0, c1). Static shapes (no ``nonzero``),
    so that torch.compile(fullgraph=True) traces the loop."""
    inside = valid & (t >= c0) & (t < c1)
    return (t - c0).clamp(0, c1 - c0 - 1)[:, None], inside


def _update_targets(tile, col, inside, fn):
    """In place: ``tile[i, col[i]] = fn(tile[i, col[i]])`` on the rows where
    ``inside``; the other rows get their own entry written back unchanged."""
    old = tile.gather(1, col).squeeze(1)
    tile.scatter_(1, col, torch.where(inside, fn(old), old)[:, None])


def _tile(xn, wn, s, b, t, valid, z_t, psi, c0, c1):
    """Logits of rows ``xn`` x classes [c0, c1) with the margins on the target
    column; also the cosines with psi on the target (what the scale multiplies)."""
    cos = xn @ wn[c0:c1].T
    col, inside = _target_slots(t, valid, c0, c1)
    _update_targets(cos, col, inside, lambda old: psi)
    s_blk = s[c0:c1] if isinstance(s, torch.Tensor) and s.dim() == 1 else s
    z = cos * s_blk
    if b is not None:
        z += b[c0:c1]
    # Bitwise the forward's target logit, used by the row loss.
    _update_targets(z, col, inside, lambda old: z_t)
    return z, cos


def cosine_cross_entropy_torch(x, weight, target, scale, bias, opts: CCEOptions,
                               *, block_rows: int | None = None, block_classes: int | None = None):
    """Backend entry (arguments already checked by nnk.functional): returns the
    (N,) row losses (0 on ignored rows) and the (N,) log-sum-exp, both
    differentiable."""
    return _BlockwiseCCE.apply(x, weight, scale, bias, target, opts, block_rows, block_classes)
