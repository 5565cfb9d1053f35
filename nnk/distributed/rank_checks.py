"""Argument checks across ranks, run before any other collective.

A rank that raises on its own while the others enter a collective leaves them
waiting until the process group's timeout. So each entry point runs its local
checks inside :func:`agree`, which always takes part in one all-gather of a
small int64 signature (an error flag and the values every rank must share);
if a rank failed or the ranks disagree, every rank raises.
"""
from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.distributed as dist

from .collectives import _all_gather_single


def group_rank(group, caller: str) -> tuple[int, int]:
    """``(rank, world_size)`` of this process in ``group`` (None: the default group)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{caller} needs torch.distributed initialized (torch.distributed.init_process_group)")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"{caller}: this process is not a member of group {group!r}")
    return rank, dist.get_world_size(group)


def comm_device(group) -> torch.device:
    """Where the signature tensors live: the current GPU for an NCCL-only
    group, else the CPU."""
    backend = str(dist.get_backend(group))
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# Every signature is this many int64 (an error flag, the caller, its values,
# zeros): ranks in different entry points (one in forward, one in predict)
# then meet in one all-gather of one size and all raise. Gathers of the
# callers' own sizes made gloo abort the processes (SIGABRT).
SIGNATURE_FIELDS = 32


def _encode(v) -> int:
    if v is None or isinstance(v, (bool, int)):
        return -(2**63) if v is None else int(v)
    if isinstance(v, float):
        return struct.unpack("<q", struct.pack("<d", v))[0]
    return zlib.crc32(repr(v).encode())


def agree(
    caller: str,
    group,
    describe: Callable[[], tuple[object, Mapping[str, object]]],
    same: Sequence[str],
    info: Sequence[str] = (),
):
    """Run the local checks ``describe()`` and compare the ranks.

    ``describe`` returns ``(result, values)``; ``values`` maps every name of
    ``same`` (must be equal on all ranks) and ``info`` (gathered, may differ) to
    a bool, int, float, str or None. Returns ``(result, gathered)`` with
    ``gathered[name]`` the list of the ranks' values of each ``info`` name.

    Raises on every rank when any rank's ``describe`` raised (that rank
    re-raises its own exception, the others a ValueError quoting it) or when
    the ``same`` values differ (a ValueError naming the field and each rank's value).
    """
    _, world = group_rank(group, caller)
    try:
        result, values = describe()
        error = None
    except Exception as e:  # noqa: BLE001 (re-raised below, after the ranks have met)
        result, values, error = None, {}, e
    names = list(same) + list(info)
    if 2 + len(names) > SIGNATURE_FIELDS:
        raise AssertionError(f"{caller}: {len(names)} signature values, more than SIGNATURE_FIELDS - 2")
    row = [int(error is not None), _encode(caller)] + [_encode(values.get(n)) for n in names]
    row += [0] * (SIGNATURE_FIELDS - len(row))
    dev = comm_device(group)
    mine = torch.tensor(row, dtype=torch.int64, device=dev)
    table = torch.empty(world * SIGNATURE_FIELDS, dtype=torch.int64, device=dev)
    _all_gather_single(table, mine, group=group)
    table = table.view(world, SIGNATURE_FIELDS).cpu()
    elsewhere = bool((table[:, 1] != table[0, 1]).any())
    failed = [] if elsewhere else table[:, 0].nonzero().flatten().tolist()
    # A rank whose checks raised has no values: compare the others only.
    ok = table[table[:, 0] == 0]
    differ = [] if elsewhere else [n for i, n in enumerate(same)
                                   if len(ok) and bool((ok[:, 2 + i] != ok[0, 2 + i]).any())]
    if elsewhere or failed or differ:
        # Rare path: exchange readable values and messages to say what is wrong.
        mine_text = (caller, {n: repr(values.get(n)) for n in names},
                     f"{type(error).__name__}: {error}" if error else None)
        reports = [None] * world
        dist.all_gather_object(reports, mine_text, group=group)
        if elsewhere:
            calls = ", ".join(f"rank {r}: {reports[r][0]}" for r in range(world))
            raise ValueError(f"{caller}: the ranks are in different collective calls ({calls}); every rank of "
                             "the group must make the same call")
        if error is not None:
            raise error
        lines = [f"rank {r} rejected its arguments: {reports[r][2]}" for r in failed]
        for n in differ:
            per_rank = ", ".join(f"rank {r}: {reports[r][1][n]}" for r in range(world) if r not in failed)
            lines.append(f"ranks disagree on {n} ({per_rank})")
        raise ValueError(f"{caller}: " + "; ".join(lines))
    gathered = {n: table[:, 2 + len(same) + j].tolist() for j, n in enumerate(info)}
    return result, gathered


def check_partition(caller: str, starts: Sequence[int], counts: Sequence[int], num_classes: int) -> None:
    """The ranks' class ranges ``[start, start + count)`` must tile
    ``[0, num_classes)`` without gap or overlap (in any rank order). Every rank
    calls this with the same gathered values, so all raise together."""
    spans = sorted(zip(starts, counts))
    end = 0
    for start, count in spans:
        if start != end:
            ranges = ", ".join(f"rank {r}: [{s}, {s + c})" for r, (s, c) in enumerate(zip(starts, counts)))
            raise ValueError(
                f"{caller}: the ranks' class shards must tile [0, {num_classes}) without gap or overlap, got {ranges}"
            )
        end = start + count
    if end != num_classes:
        raise ValueError(f"{caller}: the ranks' class shards cover [0, {end}), but num_classes={num_classes}")
