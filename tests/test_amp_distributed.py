"""GradScaler(process_group=...) and ShardedGradScaler over torch.distributed: gloo, 2 CPU processes.

- DDP-style: each rank has its own gradients; an overflow on rank 1 only must make BOTH ranks skip the step
  and back off the same way (found_inf all-reduced).
- Sharded: each rank holds half of every gradient; the clip norm must be the global norm of the whole
  gradient and found_inf must agree.
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
    _init(rank, init_file)
    try:
        p = torch.nn.Parameter(torch.ones(6))
        opt = torch.optim.SGD([p], lr=0.1)
        scaler = GradScaler("cpu", init_scale=256.0, growth_interval=100, process_group=dist.group.WORLD)
        scales, values = [], []
        for i in range(3):
            scaler.scale((p * (rank + 1)).sum()).backward()
            if i == 1 and rank == 1:
                p.grad[2] = math.inf  # only this rank sees the overflow
            scaler.step(opt)
            scaler.update()
            p.grad = None
            scales.append(scaler.get_scale())
            values.append(p.detach().clone())
        torch.save({"scales": scales, "values": values}, os.path.join(out_dir, f"ddp{rank}.pt"))
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
        torch.save({"norms": norms, "shards": [s.detach() for s in shards], "scale": scaler.get_scale()},
                   os.path.join(out_dir, f"sharded{rank}.pt"))
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
    for r in results:
        assert r["scales"] == [256.0, 128.0, 128.0]
    for rank, r in enumerate(results):
        # step 0 applied, step 1 skipped on both ranks (rank 0's grads were finite), step 2 applied
        assert torch.equal(r["values"][1], r["values"][0])
        torch.testing.assert_close(r["values"][0], torch.full((6,), 1 - 0.1 * (rank + 1)))
        assert not torch.equal(r["values"][2], r["values"][1])


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
