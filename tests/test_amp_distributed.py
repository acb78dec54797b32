"""GradScaler(process_group=...) and ShardedGradScaler over torch.distributed: gloo, 2 CPU processes.

- DDP-style: each rank has its own gradients; an overflow on rank 1 only must make BOTH ranks skip the step
  and back off the same way (found_inf all-reduced), with a plain optimizer (skipped on the host) and with
  effikern.optim.AdamW (1/scale and the clip folded in, skipped on the device).
- Sharded: each rank holds half of every gradient; the clip norm must be the global norm of the whole
  gradient (2-, inf- and 3-norm) and found_inf must agree (an overflow on one rank skips the step on both). A rank
  holding no shard still joins: the others' norm, their overflow. A disabled ShardedGradScaler clips with the
  global norm too.

Each worker runs all its cases in one process group: spawning the two processes is most of the cost.
"""

import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from effikern.amp import GradScaler, ShardedGradScaler

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD = 2


def _init(rank, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)


def _ddp_worker(rank, init_file, out_dir):
    import effikern.optim

    _init(rank, init_file)
    try:
        out = {}
        for name in ("sgd", "adamw"):
            p = torch.nn.Parameter(torch.ones(6))
            opt = torch.optim.SGD([p], lr=0.1) if name == "sgd" else effikern.optim.AdamW([p], lr=0.1)
            scaler = GradScaler("cpu", init_scale=256.0, growth_interval=100, process_group=dist.group.WORLD)
            scales, values = [], []
            for i in range(3):
                scaler.scale((p * (rank + 1)).sum()).backward()
                if i == 1 and rank == 1:
                    p.grad[2] = math.inf  # only this rank sees the overflow
                if name == "adamw":  # the folding path: a read-only pass, 1/scale and the clip into the update
                    scaler.unscale_(opt, max_norm=1.0)
                scaler.step(opt)
                scaler.update()
                p.grad = None
                scales.append(scaler.get_scale())
                values.append(p.detach().clone())
            out[name] = {"scales": scales, "values": values}
            if name == "adamw":
                out[name]["steps"] = opt.state[p]["step"].item()
        torch.save(out, os.path.join(out_dir, f"ddp{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _sharded_worker(rank, init_file, out_dir):
    _init(rank, init_file)
    try:
        torch.manual_seed(0)  # the same full gradient on both ranks; each keeps its half
        full = [torch.randn(10) * 64, torch.randn(4, 3) * 64]
        shards = [torch.nn.Parameter(torch.zeros(f.numel() // WORLD)) for f in full]
        for s, f in zip(shards, full):
            s.grad = f.flatten().chunk(WORLD)[rank].clone()
        opt = torch.optim.SGD(shards, lr=1.0)
        scaler = ShardedGradScaler("cpu", init_scale=64.0)
        scaler.scale(torch.ones(()))  # initialises the scale; grads above are already "scaled" by 64
        norms = {}
        for norm_type, max_norm in ((2.0, math.inf), (math.inf, 1.0)):  # norm only, then a clipped step
            with torch.no_grad():
                for s, f in zip(shards, full):
                    s.zero_()
                    s.grad = f.flatten().chunk(WORLD)[rank].clone()
            norms[norm_type] = scaler.unscale_(opt, max_norm=max_norm, norm_type=norm_type).item()
            scaler.step(opt)  # the inf-norm round clips in place with the global norm's coefficient
            scaler.update()
        out = {"norms": norms, "shards": [s.detach().clone() for s in shards], "scale": scaler.get_scale()}

        def round_(grads, norm_type=2.0):
            """One unscale_ (norm only) + step + update with these shard grads (None: the rank holds none);
            returns (norm, whether the params were left as they were, the scale after)."""
            before = [s.detach().clone() for s in shards]
            for s, g in zip(shards, grads):
                s.grad = g
            norm = scaler.unscale_(opt, max_norm=math.inf, norm_type=norm_type).item()
            scaler.step(opt)
            scaler.update()
            return norm, all(torch.equal(b, s) for b, s in zip(before, shards)), scaler.get_scale()

        def halves():
            return [f.flatten().chunk(WORLD)[rank].clone() for f in full]

        # The 3-norm: the ranks' norms combined as (sum of norm^3)^(1/3) (the fallback measures the shards).
        out["p3"] = round_(halves(), norm_type=3.0)
        # An overflow in rank 1's shard only: both ranks see it, skip the step and back off (64 -> 32).
        poisoned = halves()
        if rank == 1:
            poisoned[1][0] = math.inf
        out["overflow"] = round_(poisoned)
        # Rank 1 holds no shard (no grads): it joins the collective with nothing found and a norm of 0, so both
        # ranks get rank 0's norm; then rank 0's overflow backs off rank 1 too (32 -> 16).
        out["no_shard"] = round_(halves() if rank == 0 else [None, None])
        poisoned = halves()
        poisoned[0][0] = math.nan
        out["no_shard_overflow"] = round_(poisoned if rank == 0 else [None, None])

        # Disabled (bf16 training): no scale, no skipping, but unscale_(max_norm) still clips every shard with the
        # global norm's coefficient (an SGD with lr 1 from zero leaves the clipped gradient, negated).
        disabled = ShardedGradScaler("cpu", enabled=False)
        with torch.no_grad():
            for s, g in zip(shards, halves()):
                s.zero_()
                s.grad = g / 64
        out["disabled_norm"] = disabled.unscale_(opt, max_norm=1.0).item()
        disabled.step(opt)
        disabled.update()
        out["disabled_shards"] = [s.detach().clone() for s in shards]
        torch.save(out, os.path.join(out_dir, f"sharded{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(worker):
    with tempfile.TemporaryDirectory() as out_dir:
        init_file = os.path.join(out_dir, "init")
        mp.spawn(worker, args=(init_file, out_dir), nprocs=WORLD, join=True)
        name = "ddp" if worker is _ddp_worker else "sharded"
        return [torch.load(os.path.join(out_dir, f"{name}{r}.pt")) for r in range(WORLD)]


def test_ddp_ranks_skip_the_same_steps():
    results = _spawn(_ddp_worker)
    for rank, r in enumerate(results):
        for name in ("sgd", "adamw"):
            assert r[name]["scales"] == [256.0, 128.0, 128.0], name
            values = r[name]["values"]
            # step 0 applied, step 1 skipped on both ranks (rank 0's grads were finite), step 2 applied
            assert torch.equal(values[1], values[0]), name
            assert not torch.equal(values[2], values[1]), name
        torch.testing.assert_close(r["sgd"]["values"][0], torch.full((6,), 1 - 0.1 * (rank + 1)))
        # AdamW's first step moves every weight by lr (m / sqrt(v) = 1) after its decay, whatever the clip
        torch.testing.assert_close(r["adamw"]["values"][0], torch.full((6,), 1 - 0.1 * 0.01 - 0.1))
        assert r["adamw"]["steps"] == 2.0  # the skipped step did not count, on either rank


def test_sharded_global_norm_and_clip():
    results = _spawn(_sharded_worker)
    torch.manual_seed(0)
    full = [torch.randn(10) * 64, torch.randn(4, 3) * 64]
    flat = torch.cat([f.flatten() for f in full]) / 64
    truth2 = torch.linalg.vector_norm(flat).item()
    truth_inf = flat.abs().max().item()
    for rank, r in enumerate(results):
        assert r["norms"][2.0] == pytest.approx(truth2, rel=1e-5)
        assert r["norms"][math.inf] == pytest.approx(truth_inf, rel=1e-6)
        coef = 1.0 / (truth_inf + 1e-6)
        for s, f in zip(r["shards"], full):
            want = -(f.flatten().chunk(WORLD)[rank] / 64) * coef
            torch.testing.assert_close(s, want, rtol=1e-5, atol=1e-7)
        assert r["scale"] == 64.0
        norm3, stepped_unchanged, scale = r["p3"]
        assert norm3 == pytest.approx(torch.linalg.vector_norm(flat, 3.0).item(), rel=1e-5)
        assert not stepped_unchanged and scale == 64.0
        norm, unchanged, scale = r["overflow"]
        assert math.isinf(norm) and unchanged and scale == 32.0  # skipped on both ranks, not only rank 1
        # rank 0's shards alone: the first half of each gradient, unscaled by 32 (the scale since the overflow)
        rank0 = torch.cat([f.flatten().chunk(WORLD)[0] for f in full]) / 32
        norm, unchanged, scale = r["no_shard"]
        assert norm == pytest.approx(torch.linalg.vector_norm(rank0).item(), rel=1e-5)
        assert unchanged == (rank == 1) and scale == 32.0
        norm, unchanged, scale = r["no_shard_overflow"]
        assert math.isnan(norm) and unchanged and scale == 16.0
        assert r["disabled_norm"] == pytest.approx(truth2, rel=1e-5)
        coef = 1.0 / (truth2 + 1e-6)
        for s, f in zip(r["disabled_shards"], full):
            want = -(f.flatten().chunk(WORLD)[rank] / 64) * coef
            torch.testing.assert_close(s, want, rtol=1e-5, atol=1e-7)
