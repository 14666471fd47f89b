"""Direct (one-phase) reduce-scatter and all-gather: every rank talks to every owner at once.

The same bytes as the ring in a single latency term, at the price of p-1 concurrent
messages per rank. Inside a node over shared memory that is usually the right trade,
which is why the hierarchical algorithms offer it for their intra-node levels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from topocoll.topology import Topology

from ..collectives import CollectiveSpec
from ..plan import Plan, Scratch, finalize, reduce_op, regions_by_counts
from ..schedule import Copy, Recv, Reduce, Region, Schedule, Send, Step
from .ring import Block


def direct_reduce_scatter(plan: Plan, scratch: Scratch, group: Sequence[int],
                          all_blocks: Sequence[Block], op: str, tag: int = 0,
                          out: Callable[[int], Block] | None = None) -> None:
    """Member i ends with the reduction of block i (in place, or in `out(i)`)."""
    n = len(group)
    for i, rank in enumerate(group):
        steps: list[Step] = []
        for b, block in enumerate(all_blocks):
            if b != i:
                steps += [Send(group[b], piece, tag) for piece in block if piece.count]
        reduces: list[Step] = []
        for j, piece in enumerate(all_blocks[i]):
            if not piece.count:
                continue
            landings = []
            for m in range(n):
                if m != i:
                    landing = scratch.alloc(rank, piece.count)
                    steps.append(Recv(group[m], landing, tag))
                    landings.append(landing)
            dst = piece if out is None else out(i)[j]
            if landings or dst != piece:
                reduces.append(Reduce(dst, (piece, *landings), op) if landings
                               else Copy(dst, piece))
        plan.add(rank, steps + reduces)


def direct_all_gather(plan: Plan, group: Sequence[int], all_blocks: Sequence[Block],
                      tag: int = 0, own: Callable[[int], Block] | None = None) -> None:
    """Member i starts with block i (in place, or in `own(i)`); all end with every block."""
    for i, rank in enumerate(group):
        mine = list(all_blocks[i]) if own is None else list(own(i))
        steps: list[Step] = []
        for m, peer in enumerate(group):
            if m != i:
                steps += [Send(peer, piece, tag) for piece in mine if piece.count]
        for b, block in enumerate(all_blocks):
            if b != i:
                steps += [Recv(group[b], piece, tag) for piece in block if piece.count]
        if own is not None:
            steps += [Copy(dst, src) for dst, src in zip(all_blocks[i], mine) if src.count]
        plan.add(rank, steps)


def reduce_scatter(topology: Topology, spec: CollectiveSpec, params: dict) -> Schedule:
    plan, scratch = Plan(), Scratch()
    parts = [[r] for r in regions_by_counts("in", spec.counts)]
    direct_reduce_scatter(plan, scratch, list(range(spec.world_size)), parts,
                          reduce_op(spec.op), out=lambda i: [Region("out", 0, spec.counts[i])])
    return finalize(plan, scratch, spec, topology, "direct", params)


def all_gather(topology: Topology, spec: CollectiveSpec, params: dict) -> Schedule:
    plan = Plan()
    parts = [[r] for r in regions_by_counts("out", spec.counts)]
    direct_all_gather(plan, list(range(spec.world_size)), parts,
                      own=lambda i: [Region("in", 0, spec.counts[i])])
    return finalize(plan, Scratch(), spec, topology, "direct", params)
