"""torch.distributed through backend="topocoll", checked call by call against backend="gloo".

Run on every rank of a torchrun-style job (our local launcher or torchrun):
    python tests/backend_checks.py [--ddp] [--moe]
The default group is topocoll; a Gloo group over the same ranks runs the same calls on
the same random inputs, and the results must agree (exactly for integers, min and max;
within float tolerance otherwise). Where Gloo has no such op (AVG) the reference is
computed locally from every rank's regenerated input. Prints `BACKEND-CHECKS OK rank=R`.
"""

from __future__ import annotations

import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32,
          torch.int64, torch.int8, torch.uint8]
OPS = [dist.ReduceOp.SUM, dist.ReduceOp.PRODUCT, dist.ReduceOp.MIN, dist.ReduceOp.MAX,
       dist.ReduceOp.AVG]
COUNTS = [1, 7, 1009, 40001]


def data(rank: int, count: int, dtype: torch.dtype, op, salt: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * rank + 17 * count + salt)
    if dtype.is_floating_point:
        if op == dist.ReduceOp.PRODUCT:
            return (torch.rand(count, generator=g) * 0.2 + 0.9).to(dtype)
        return (torch.rand(count, generator=g) * 2 - 1).to(dtype)
    if op == dist.ReduceOp.PRODUCT:
        return torch.randint(1, 3, (count,), generator=g).to(dtype)
    return torch.randint(0 if dtype == torch.uint8 else -50, 50, (count,), generator=g).to(dtype)


def close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape or a.dtype != b.dtype:
        raise AssertionError(f"{what}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}")
    if a.dtype.is_floating_point:
        tol = {torch.float16: 1e-2, torch.bfloat16: 6e-2}.get(a.dtype, 1e-5)
        ok = torch.allclose(a.double(), b.double(), rtol=tol, atol=tol)
    else:
        ok = torch.equal(a, b)
    if not ok:
        diff = (a.double() - b.double()).abs()
        raise AssertionError(f"{what}: max difference {diff.max().item()} at "
                             f"{int(diff.argmax())}")


def supported(dtype: torch.dtype, op) -> bool:
    if op == dist.ReduceOp.AVG:
        return dtype.is_floating_point
    return dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64,
                     torch.int32, torch.int64)


def reference_all_reduce(world: int, count: int, dtype: torch.dtype, op) -> torch.Tensor:
    parts = [data(r, count, dtype, op).double() for r in range(world)]
    acc = parts[0]
    for p in parts[1:]:
        if op in (dist.ReduceOp.SUM, dist.ReduceOp.AVG):
            acc = acc + p
        elif op == dist.ReduceOp.PRODUCT:
            acc = acc * p
        elif op == dist.ReduceOp.MIN:
            acc = torch.minimum(acc, p)
        else:
            acc = torch.maximum(acc, p)
    if op == dist.ReduceOp.AVG:
        acc = acc / world
    return acc.to(dtype)


def check_all_reduce(rank: int, world: int, gloo) -> int:
    cases = 0
    for dtype in DTYPES:
        for op in OPS:
            if not supported(dtype, op):
                continue
            for count in COUNTS:
                for async_op in (False, True):
                    ours = data(rank, count, dtype, op)
                    what = f"rank {rank}: all_reduce {dtype} {op} count={count} async={async_op}"
                    work = dist.all_reduce(ours, op=op, async_op=async_op)
                    if async_op:
                        work.wait()
                        assert work.is_completed(), what
                        assert work.get_future().value()[0] is ours or torch.equal(
                            work.get_future().value()[0], ours), what
                    if op == dist.ReduceOp.AVG:
                        close(ours, reference_all_reduce(world, count, dtype, op), what)
                    else:
                        theirs = data(rank, count, dtype, op)
                        dist.all_reduce(theirs, op=op, group=gloo)
                        close(ours, theirs, what)
                    cases += 1
    return cases


def check_other_collectives(rank: int, world: int, gloo) -> int:
    cases = 0
    for dtype in (torch.float32, torch.bfloat16, torch.int64, torch.float16):
        for rows in (1, 3, 17):
            inp = data(rank, rows * world * 5, dtype, dist.ReduceOp.SUM, 1).view(-1, 5)
            out, ref = torch.empty_like(inp), torch.empty_like(inp)
            dist.all_to_all_single(out, inp)
            dist.all_to_all_single(ref, inp, group=gloo)
            close(out, ref, f"rank {rank}: all_to_all_single {dtype} rows={rows}")
            splits_in = [(rank + j) % 3 for j in range(world)]
            splits_out = [(j + rank) % 3 for j in range(world)]
            inp_v = data(rank, sum(splits_in) * 2, dtype, dist.ReduceOp.SUM, 2).view(-1, 2)
            out_v = torch.empty(sum(splits_out), 2, dtype=dtype)
            ref_v = torch.empty_like(out_v)
            work = dist.all_to_all_single(out_v, inp_v, splits_out, splits_in, async_op=True)
            work.wait()
            dist.all_to_all_single(ref_v, inp_v, splits_out, splits_in, group=gloo)
            close(out_v, ref_v, f"rank {rank}: all_to_all_single splits {dtype}")
            ins = [data(rank, rows, dtype, dist.ReduceOp.SUM, 3 + j) for j in range(world)]
            outs = [torch.empty(rows, dtype=dtype) for _ in range(world)]
            refs = [torch.empty(rows, dtype=dtype) for _ in range(world)]
            dist.all_to_all(outs, ins)
            dist.all_to_all(refs, ins, group=gloo)
            for j in range(world):
                close(outs[j], refs[j], f"rank {rank}: all_to_all list {dtype} peer {j}")
            shard = data(rank, rows * 3, dtype, dist.ReduceOp.SUM, 4)
            gathered = torch.empty(rows * 3 * world, dtype=dtype)
            ref_g = torch.empty_like(gathered)
            dist.all_gather_into_tensor(gathered, shard)
            dist.all_gather_into_tensor(ref_g, shard, group=gloo)
            close(gathered, ref_g, f"rank {rank}: all_gather_into_tensor {dtype}")
            full = data(rank, rows * world * 2, dtype, dist.ReduceOp.SUM, 5)
            mine = torch.empty(rows * 2, dtype=dtype)
            dist.reduce_scatter_tensor(mine, full)
            expected = full.clone()
            dist.all_reduce(expected, group=gloo)
            close(mine, expected[rank * rows * 2:(rank + 1) * rows * 2],
                  f"rank {rank}: reduce_scatter_tensor {dtype}")
            cases += 5
    # Delegated collectives must work too (nothing raises NotImplementedError).
    b = data(rank, 11, torch.float32, None, 6)
    dist.broadcast(b, src=world - 1)
    close(b, data(world - 1, 11, torch.float32, None, 6), f"rank {rank}: broadcast")
    gathered = [torch.empty(3) for _ in range(world)]
    dist.all_gather(gathered, torch.full((3,), float(rank)))
    assert all(torch.equal(t, torch.full((3,), float(i))) for i, t in enumerate(gathered))
    r = torch.tensor([float(rank + 1)])
    dist.reduce(r, dst=0)
    if rank == 0:
        assert r.item() == world * (world + 1) / 2
    if world > 1:
        if rank == 0:
            dist.send(torch.tensor([42.0]), dst=1)
        elif rank == 1:
            got = torch.zeros(1)
            dist.recv(got, src=0)
            assert got.item() == 42.0
        ops = []
        peer_next, peer_prev = (rank + 1) % world, (rank - 1) % world
        token, incoming = torch.tensor([float(rank)]), torch.zeros(1)
        ops.append(dist.P2POp(dist.isend, token, peer_next))
        ops.append(dist.P2POp(dist.irecv, incoming, peer_prev))
        for req in dist.batch_isend_irecv(ops):
            req.wait()
        assert incoming.item() == float(peer_prev)
    objs = [None] * world
    dist.all_gather_object(objs, {"rank": rank})
    assert [o["rank"] for o in objs] == list(range(world))
    dist.barrier()
    # torch's dist.monitored_barrier() refuses any backend not named "gloo" before it
    # reaches the group; the group's own method is delegated to the inner Gloo group.
    dist.group.WORLD.monitored_barrier(timedelta(seconds=60)) if world > 1 else None
    sub = dist.new_group(list(range(0, world, 2)))
    if rank % 2 == 0:
        t = torch.ones(5)
        dist.all_reduce(t, group=sub)
        assert t[0].item() == len(range(0, world, 2)), t
    explicit = dist.new_group(list(range(world)), backend="topocoll")
    t = torch.full((9,), float(rank))
    dist.all_reduce(t, group=explicit)
    assert t[0].item() == sum(range(world))
    return cases + 6


def check_ddp(rank: int, world: int, gloo) -> None:
    """20 steps of a small model under topocoll and under Gloo: equal parameters."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(13, 31), nn.ReLU(), nn.Linear(31, 7))

    ours = DDP(model(), process_group=dist.group.WORLD, bucket_cap_mb=0.001)
    theirs = DDP(model(), process_group=gloo, bucket_cap_mb=0.001)
    stats = dist.group.WORLD.communicator(torch.device("cpu")).executor.stats
    before = stats.collectives
    opt_a = torch.optim.SGD(ours.parameters(), lr=0.05, momentum=0.9)
    opt_b = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=0.9)
    for step in range(20):
        g = torch.Generator().manual_seed(step * 100 + rank)
        x, y = torch.randn(8, 13, generator=g), torch.randn(8, 7, generator=g)
        for net, opt in ((ours, opt_a), (theirs, opt_b)):
            opt.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
            opt.step()
    if stats.collectives - before < 20:  # DDP's gradient all-reduces ran through us
        raise AssertionError(f"rank {rank}: DDP ran only {stats.collectives - before} "
                             "topocoll collectives in 20 steps")
    for (name, a), b in zip(ours.module.named_parameters(), theirs.module.parameters()):
        if not torch.allclose(a, b, rtol=1e-5, atol=1e-6):
            raise AssertionError(f"rank {rank}: DDP parameter {name} differs by "
                                 f"{(a - b).abs().max().item()}")


def check_moe(rank: int, world: int) -> None:
    """Token dispatch to experts with data-dependent uneven splits (some zero), and back."""
    g = torch.Generator().manual_seed(7 + rank)
    tokens = torch.randn(int(torch.randint(0, 40, (1,), generator=g)), 6, generator=g)
    expert = torch.randint(0, world, (tokens.shape[0],), generator=g)
    expert[expert == (rank + 1) % world] = rank  # guarantee some zero splits
    order = torch.argsort(expert, stable=True)
    send_splits = torch.bincount(expert, minlength=world)
    recv_splits = torch.empty_like(send_splits)
    dist.all_to_all_single(recv_splits, send_splits)  # exchange counts first, as MoE does
    dispatched = torch.empty(int(recv_splits.sum()), 6)
    dist.all_to_all_single(dispatched, tokens[order], recv_splits.tolist(),
                           send_splits.tolist())
    processed = dispatched * 2.0  # the "expert"
    combined = torch.empty_like(tokens)
    dist.all_to_all_single(combined, processed, send_splits.tolist(), recv_splits.tolist())
    restored = torch.empty_like(tokens)
    restored[order] = combined
    if not torch.equal(restored, tokens * 2.0):
        raise AssertionError(f"rank {rank}: MoE round trip lost tokens")


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("topocoll")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert dist.get_backend() == "topocoll"
    gloo = dist.new_group(list(range(world)), backend="gloo")
    cases = 0
    if "--ddp" in sys.argv:
        check_ddp(rank, world, gloo)
    elif "--moe" in sys.argv:
        for _ in range(3):
            check_moe(rank, world)
    else:
        cases += check_all_reduce(rank, world, gloo)
        cases += check_other_collectives(rank, world, gloo)
    dist.barrier()
    dist.destroy_process_group()
    print(f"BACKEND-CHECKS OK rank={rank} cases={cases}", flush=True)


if __name__ == "__main__":
    main()
