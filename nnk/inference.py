"""Inference with a cosine head, the computation behind ``nnk.cosine_logits``,
``nnk.cosine_topk`` and the modules' ``forward`` / ``predict``: the row
normalization they share and the top k without the (N, C) logits."""
from __future__ import annotations

import torch

from .impl.torch_blockwise import TILE_ELEMENTS, _blocks, row_blocks  # the blockwise path's tile sizes
from .ops import row_normalize
from .reference import acc_dtype, cosine_logits_ref


def normalized_rows(t: torch.Tensor, eps: float) -> torch.Tensor:
    """``F.normalize(t, dim=1, eps=eps)`` in the accumulation dtype of t
    (float32, float64 for float64), through nnk::row_normalize (fused,
    float64 sums of squares) when nnk._C is built: autograd then saves the
    normalized rows and norms only, where the reference's float64 norms would
    keep a float64 copy of the weight (measured for CosineLinear's forward at
    C=400k, D=64: 1.0x the weight's size extra instead of 3.2x)."""
    return row_normalize(t.to(acc_dtype(t.dtype)), eps)[0]


def logits_topk(x, weight, k: int, *, scale, bias, normalize_input: bool, normalize_weight: bool, eps: float,
                block_classes: int | None = None):
    """``logits = cosine_logits_ref(x, weight, scale=scale, bias=bias, ...)``
    ranked as ``logits.topk(min(k, C))``, scored in tiles of about 2^21 logits
    and 2^21 weight entries (up to 1024 rows, all rows while torch.compile
    traces: see torch_blockwise._blocks; ``block_classes`` columns if given),
    each tile's top-k merged into a running top-k per row. Extra memory
    O(tile + N k), whatever C.

    x (N, D) float, weight (C, D), scale a float, 0-d or (C,) tensor, bias (C,)
    or None, all checked by the caller. Returns
    ``(logits, classes, cosines)``, each (N, min(k, C)), best first: the
    logits and cosines in float32 (float64 for float64 x), the classes int64.
    Ties may be ordered differently from topk."""
    n, c, d = x.shape[0], weight.shape[0], weight.shape[1]
    k = min(k, c)
    per_class = isinstance(scale, torch.Tensor) and scale.dim() == 1
    r_blk, c_blk = _blocks(n, c, None, block_classes)
    if block_classes is None:  # the weight tile (normalized per tile) is bounded too
        c_blk = min(c_blk, max(1, TILE_ELEMENTS // d))
    acc = acc_dtype(x.dtype)
    out_logits = torch.empty(n, k, dtype=acc, device=x.device)
    classes = torch.empty(n, k, dtype=torch.int64, device=x.device)
    cosines = torch.empty(n, k, dtype=acc, device=x.device)
    for rows in row_blocks(n, r_blk):
        xr = x[rows]
        best = None  # (logits, classes, cosines) of the classes seen so far
        for c0 in range(0, c, c_blk):
            c1 = min(c, c0 + c_blk)
            cos = cosine_logits_ref(xr, weight[c0:c1], normalize_input=normalize_input,
                                    normalize_weight=normalize_weight, eps=eps, normalize=normalized_rows)
            key = cos * (scale[c0:c1].to(cos.dtype) if per_class else scale)
            if bias is not None:
                key = key + bias[c0:c1].to(cos.dtype)
            top = key.topk(min(k, c1 - c0), dim=1)
            tile = (top.values, top.indices + c0, cos.gather(1, top.indices))
            if best is not None:  # merge with the running top-k
                tile = tuple(torch.cat(p, dim=1) for p in zip(best, tile))
                top = tile[0].topk(min(k, tile[0].shape[1]), dim=1)
                tile = (top.values, tile[1].gather(1, top.indices), tile[2].gather(1, top.indices))
            best = tile
        out_logits[rows], classes[rows], cosines[rows] = best
    return out_logits, classes, cosines
