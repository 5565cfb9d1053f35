"""Log-sum-exp partials as (max, rest): ``rest`` is the sum of exp(z - max)
over a row's entries except one entry equal to the max, whose exp(0) = 1 is
kept out (csrc/include/nnk/math.h lse_merge). A confident row's rest (1e-4,
say) then keeps its own precision, and lse = max + log1p(rest); a sum that
held the 1 rounded each small term to an ulp of 1 (row losses of 1e-4 off
by 1%, C = 200)."""
from __future__ import annotations

import torch

_NEG_INF = float("-inf")


def tile_partial(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max, rest) of each row of z (rows, cols); rows of -inf only give
    (-inf, 0). Ties at the max add 1 each beyond the first."""
    m = z.amax(dim=1)
    # Shift by 0 where a row has only -inf logits: exp(-inf - -inf) is NaN.
    shift = torch.where(m == _NEG_INF, 0.0, m)
    at_max = z == m[:, None]
    e = (z - shift[:, None]).exp_().masked_fill_(at_max, 0.0)
    rest = e.sum(dim=1) + (at_max.sum(dim=1) - 1)
    return m, torch.where(m == _NEG_INF, 0.0, rest)


def merge_partials(maxes: torch.Tensor, rests: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge k partials per row, stacked along dim 0 ((k, N) each), into the
    (max, rest) of the union: the partials at the max contribute their rest
    (and 1 each beyond the first), the others (rest + 1) exp(max_k - max)."""
    m = maxes.amax(dim=0)
    shift = torch.where(m == _NEG_INF, 0.0, m)
    at_max = maxes == m
    terms = torch.where(at_max, rests, (rests + 1) * (maxes - shift).exp())
    total = terms.sum(dim=0)
    rest = total + (at_max.sum(dim=0) - 1)
    # No finite max: the rests' sum (0, or NaN from the kernel's NaN-dropping max).
    return m, torch.where(m == _NEG_INF, total, rest)
