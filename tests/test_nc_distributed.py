"""NCTracker.all_reduce across data-parallel ranks: gloo on
127.0.0.1, 2 spawned ranks, bounded timeouts. The merged statistics, NC4
counts and DataLoader-helper metrics must equal the single-process ones on
the union of the ranks' samples; a rank with a mismatched tracker makes every
rank raise."""
from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import nnk
from nnk.nc import collect_nc_metrics

WORLD = 2
K, D = 6, 12
TIMEOUT_S = 120


def _data():
    g = torch.Generator().manual_seed(0)
    n = 240
    y = torch.randint(0, K - 1, (n,), generator=g)  # class K - 1 has no samples anywhere
    y[:40] = 0  # rank 0's rows (even indices) see class 0 first; rank 1 sees it later
    mu = torch.randn(K, D, generator=g)
    h = mu[y] + 0.3 * torch.randn(n, D, generator=g)
    w = torch.randn(K, D, generator=g)
    return h, y, w


def _close(a, b, what, rtol=1e-10):
    err = float((a - b).abs().max())
    assert err <= rtol * float(b.abs().max()) + 1e-12, f"{what}: max error {err}"


def _worker(rank: int, port: int):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group(
        "gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=TIMEOUT_S // 2)
    )
    try:
        h, y, w = _data()
        # Uneven shares and uneven batches: rank 0 the rows i % 3 == 0, rank 1 the rest.
        mine = torch.arange(len(y)) % 3 == 0 if rank == 0 else torch.arange(len(y)) % 3 != 0
        hr, yr = h[mine], y[mine]
        step = 17 if rank == 0 else 29
        hb = torch.stack([h, 1.5 * h - 2.0])  # batched (B, N, D) variant

        # 1. Statistics: merged == single process on all rows (float64 features:
        #    the check is exact up to float64 rounding).
        t = nnk.NCTracker(K, D)
        tb = nnk.NCTracker(K, D, batch=2)
        for i in range(0, len(yr), step):
            t.update(hr[i:i + step].double(), yr[i:i + step])
            tb.update(hb[:, mine][:, i:i + step].double(), yr[i:i + step])
        t.all_reduce()
        tb.all_reduce()
        ref = nnk.nc_stats(h.double(), y, K)
        s = t.compute()
        assert torch.equal(s.counts, ref.counts) and s.n == ref.n and s.missing_classes == (K - 1,)
        for name in ("means", "global_mean", "sigma_w", "sigma_b"):
            _close(getattr(s, name), getattr(ref, name), name)
        refb = nnk.nc_stats(hb.double(), y, K)
        _close(tb.compute().sigma_w, refb.sigma_w, "batched sigma_w")

        # 2. NC4 counts of the second pass.
        t.begin_nc4(w.double())
        for i in range(0, len(yr), step):
            t.update_nc4(hr[i:i + step].double())
        t.all_reduce()
        m, m_ref = t.metrics(), nnk.nc_metrics(h.double(), y, w.double())
        assert m.nc4 == m_ref.nc4, (m.nc4, m_ref.nc4)
        assert abs(m.nc1 - m_ref.nc1) <= 1e-9 * m_ref.nc1
        try:
            t.all_reduce()
        except RuntimeError as e:
            assert "nothing to merge" in str(e)
        else:
            raise AssertionError("a third all_reduce must raise")

        # 3. A rank whose tracker has another dim: every rank raises, none hangs.
        #    Rank 1's tracker is still open (no batch= and no sample): the
        #    failed merge does not give it rank 0's B.
        bad = nnk.NCTracker(K, D if rank == 0 else D + 1)
        if rank == 0:
            bad.update(hb[:, :5], y[:5])
        try:
            bad.all_reduce()
        except ValueError as e:
            assert "differ in (num_classes, dim, batch, phase)" in str(e), str(e)
        else:
            raise AssertionError("mismatched trackers must raise ValueError on every rank")
        assert bad.batch == (2 if rank == 0 else None), bad.batch

        # 4. The DataLoader helper, data parallel: every rank gets the metrics of all rows.
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(D, 8), torch.nn.Tanh(), torch.nn.Linear(8, K))
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(hr, yr), batch_size=32)
        got = collect_nc_metrics(model, loader, K, progress=False, all_reduce=True)
        with torch.no_grad():
            feats = model[1](model[0](h))
        want = nnk.nc_metrics(feats, y, model[2].weight.detach(), model[2].bias.detach())
        assert got.nc4 == want.nc4 and got.n == want.n
        assert abs(got.nc1 - want.nc1) <= 1e-4 * want.nc1, (got.nc1, want.nc1)

        # 5. Rank 1's loader is empty: it joins the merge with no samples (it
        #    used to raise alone and leave rank 0 waiting in the collective).
        got = collect_nc_metrics(model, loader if rank == 0 else [], K, progress=False, all_reduce=True)
        want = nnk.nc_metrics(feats[torch.arange(len(y)) % 3 == 0], y[torch.arange(len(y)) % 3 == 0],
                              model[2].weight.detach(), model[2].bias.detach())
        assert got.nc4 == want.nc4 and got.n == want.n, (got.n, want.n)
        assert abs(got.nc1 - want.nc1) <= 1e-4 * want.nc1, (got.nc1, want.nc1)

        # 6. A tracker built without batch= takes B from its first batched
        #    update; an empty rank's takes it from the others in the merge.
        ti = nnk.NCTracker(K, D)
        if rank == 0:
            ti.update(hb[:, mine].double(), yr)
        ti.all_reduce()
        assert ti.batch == 2, ti.batch
        first = torch.arange(len(y)) % 3 == 0  # rank 0's rows
        _close(ti.compute().sigma_w, nnk.nc_stats(hb[:, first].double(), y[first], K).sigma_w, "open batch sigma_w")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tracker_all_reduce_equals_single_process():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    ctx = mp.start_processes(_worker, args=(_free_port(),), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed NC test did not finish in {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
