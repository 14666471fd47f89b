"""Data-parallel training with the topocoll backend: one word changes from a Gloo script.

    torchrun --nproc-per-node 4 examples/ddp_train.py [--steps 20] [--backend topocoll]

Trains a small MLP on a synthetic regression task with DistributedDataParallel and prints
the loss; `--backend gloo` runs the same script on Gloo for comparison. With
TOPOCOLL_DEBUG=1 every collective logs which algorithm ran and why.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--backend", default="topocoll")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group(backend=args.backend)  # the one word that changes
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = DistributedDataParallel(
        nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    target = torch.randn(32, 1, generator=torch.Generator().manual_seed(1))
    for step in range(args.steps):
        g = torch.Generator().manual_seed(1000 * step + rank)
        x = torch.randn(64, 32, generator=g)
        loss = nn.functional.mse_loss(model(x), x @ target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if rank == 0 and (step % 5 == 4 or step == args.steps - 1):
            print(f"step {step + 1:3d}  loss {loss.item():.4f}  ({dist.get_backend()}, "
                  f"{world} ranks)", flush=True)
    checksum = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).sum()
    dist.all_reduce(checksum)
    if rank == 0:
        print(f"final parameter checksum {checksum.item() / world:.6f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
