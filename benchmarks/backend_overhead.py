"""Per-call overhead of the topocoll torch backend against plain Gloo, in the same run.

    python -m topocoll.benchmarks.backend_overhead [-n 4] [--iters 300] [--bytes 8]

Starts -n local ranks (or, under torchrun, is one of them), then alternates blocks of
`dist.all_reduce` on an 8-byte tensor through the default topocoll group and through a
Gloo group over the same ranks, and prints the median per-call time of each and their
ratio. Blocks alternate so that machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def _measure(iters: int, nbytes: int) -> dict:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("topocoll")
    rank, world = dist.get_rank(), dist.get_world_size()
    gloo = dist.new_group(list(range(world)), backend="gloo")
    x = torch.ones(max(nbytes // 4, 1), dtype=torch.float32)
    times: dict[str, list[float]] = {"topocoll": [], "gloo": []}
    for _ in range(20):  # warm-up: connections, schedule cache
        dist.all_reduce(x)
        dist.all_reduce(x, group=gloo)
    block = 25
    for _ in range(max(iters // block, 1)):
        for name, group in (("topocoll", None), ("gloo", gloo)):
            dist.barrier(group=gloo)
            start = time.perf_counter()
            for _ in range(block):
                dist.all_reduce(x, group=group)
            times[name].append((time.perf_counter() - start) / block * 1e6)
    choice = dist.group.WORLD.communicator(x.device).last_choice
    result = {name: statistics.median(v) for name, v in times.items()}
    dist.destroy_process_group()
    return {"rank": rank, "world_size": world, "bytes": x.numel() * 4,
            "topocoll_us": round(result["topocoll"], 2), "gloo_us": round(result["gloo"], 2),
            "ratio": round(result["topocoll"] / result["gloo"], 3),
            "algorithm": choice.algorithm if choice else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=4, help="ranks to start locally")
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--bytes", type=int, default=8)
    args = parser.parse_args(argv)
    if "RANK" in os.environ:
        row = _measure(args.iters, args.bytes)
        if row["rank"] == 0:
            print(f"8-byte all_reduce on {row['world_size']} ranks: topocoll "
                  f"{row['topocoll_us']:.1f} us/call ({row['algorithm']}), gloo "
                  f"{row['gloo_us']:.1f} us/call, ratio {row['ratio']:.2f}")
            print(json.dumps(row))
        return 0
    from .launcher import launch_local

    result = launch_local(args.n, ["-m", "topocoll.benchmarks.backend_overhead",
                                   "--iters", str(args.iters), "--bytes", str(args.bytes)],
                          timeout=600)
    if result.returncode:
        sys.stderr.write(result.stderr_tail)
    return result.returncode


if __name__ == "__main__":
    raise SystemExit(main())
