"""Binomial trees: reduce to a root, broadcast from a root, and all-reduce as both.

2 log2(p) latency terms but each a whole-vector transfer: a small-message algorithm,
and the building block of the leader-based hierarchical all-reduce.
"""

from __future__ import annotations

from collections.abc import Sequence

from topocoll.topology import Topology

from ..collectives import CollectiveSpec
from ..plan import Plan, Scratch, finalize, reduce_op
from ..schedule import Recv, Reduce, Region, Schedule, Send


def binomial_reduce(plan: Plan, scratch: Scratch, group: Sequence[int], region: Region,
                    op: str, root: int = 0, tag: int = 0) -> None:
    """Reduce `region` of every member into the member at index `root`, in place there."""
    n = len(group)
    if n == 1 or region.count == 0:
        return
    for i, rank in enumerate(group):
        rel = (i - root) % n
        tmp = None
        mask = 1
        while mask < n:
            if rel & mask:
                plan.add(rank, [Send(group[(rel - mask + root) % n], region, tag)])
                break
            if rel + mask < n:
                tmp = tmp or scratch.alloc(rank, region.count)
                plan.add(rank, [Recv(group[(rel + mask + root) % n], tmp, tag),
                                Reduce(region, (region, tmp), op)])
            else:
                plan.add(rank)
            mask <<= 1
    plan.pad(group)


def binomial_broadcast(plan: Plan, group: Sequence[int], region: Region, root: int = 0,
                       tag: int = 0) -> None:
    """Copy `region` of the member at index `root` to every member.

    Round r: every holder sends to the member 2^(depth-1-r) beyond it. Each member gets one
    phase per round (empty while it waits), so members stay in step for pipelining.
    """
    n = len(group)
    if n == 1 or region.count == 0:
        return
    depth = (n - 1).bit_length()
    for i, rank in enumerate(group):
        rel = (i - root) % n
        if rel == 0:
            mask = 1 << depth
        else:
            mask = rel & -rel
            for _ in range(depth - mask.bit_length()):
                plan.add(rank)
            plan.add(rank, [Recv(group[(rel - mask + root) % n], region, tag)])
        mask >>= 1
        while mask > 0:
            plan.add(rank, [Send(group[(rel + mask + root) % n], region, tag)]
                     if rel + mask < n else [])
            mask >>= 1
    plan.pad(group)


def tree_all_reduce_plan(plan: Plan, scratch: Scratch, group: Sequence[int], region: Region,
                         op: str, tag: int = 0) -> None:
    binomial_reduce(plan, scratch, group, region, op, 0, tag)
    binomial_broadcast(plan, group, region, 0, tag)


def all_reduce(topology: Topology, spec: CollectiveSpec, params: dict) -> Schedule:
    plan, scratch = Plan(), Scratch()
    tree_all_reduce_plan(plan, scratch, list(range(spec.world_size)),
                         Region("data", 0, spec.count), reduce_op(spec.op))
    return finalize(plan, scratch, spec, topology, "tree", params)


def broadcast(topology: Topology, spec: CollectiveSpec, params: dict) -> Schedule:
    plan = Plan()
    binomial_broadcast(plan, list(range(spec.world_size)), Region("data", 0, spec.count),
                       spec.root)
    return finalize(plan, Scratch(), spec, topology, "tree", params)
