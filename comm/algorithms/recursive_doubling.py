"""Recursive doubling all-reduce: log2(p) exchanges of the whole vector.

Latency-optimal for small messages. For a group size that is not a power of two we use
the standard fix (Thakur, Rabenseifner and Gropp 2005): the first 2*rem members pair up,
the even one of each pair hands its data to the odd one and sits out, the remaining
power of two runs the exchange, and the result is handed back.
"""

from __future__ import annotations

from collections.abc import Sequence

from topocoll.topology import Topology

from ..collectives import CollectiveSpec
from ..plan import Plan, Scratch, finalize, largest_power_of_two_at_most, reduce_op
from ..schedule import Recv, Reduce, Region, Schedule, Send


def fold_in(plan: Plan, scratch: Scratch, group: Sequence[int], region: Region, op: str,
            tag: int) -> list[int]:
    """Reduce the extra members into partners; return the power-of-two active group."""
    n = len(group)
    rem = n - largest_power_of_two_at_most(n)
    active: list[int] = []
    for i, rank in enumerate(group):
        if i < 2 * rem:
            if i % 2 == 0:
                plan.add(rank, [Send(group[i + 1], region, tag)])
            else:
                tmp = scratch.alloc(rank, region.count)
                plan.add(rank, [Recv(group[i - 1], tmp, tag), Reduce(region, (region, tmp), op)])
                active.append(rank)
        else:
            active.append(rank)
    if rem:
        plan.pad(group)
    return active


def fold_out(plan: Plan, group: Sequence[int], region: Region, tag: int) -> None:
    """Hand the result back to the members that sat out."""
    rem = len(group) - largest_power_of_two_at_most(len(group))
    for i in range(0, 2 * rem, 2):
        plan.add(group[i + 1], [Send(group[i], region, tag)])
        plan.add(group[i], [Recv(group[i + 1], region, tag)])
    if rem:
        plan.pad(group)


def recursive_doubling_plan(plan: Plan, scratch: Scratch, group: Sequence[int],
                            region: Region, op: str, tag: int = 0) -> None:
    """In-place all-reduce of `region` over `group`."""
    if len(group) == 1 or region.count == 0:
        return
    active = fold_in(plan, scratch, group, region, op, tag)
    pof2 = len(active)
    for nr, rank in enumerate(active):
        tmp = scratch.alloc(rank, region.count)
        mask = 1
        while mask < pof2:
            partner = active[nr ^ mask]
            plan.add(rank, [Send(partner, region, tag), Recv(partner, tmp, tag),
                            Reduce(region, (region, tmp), op)])
            mask <<= 1
    plan.pad(group)
    fold_out(plan, group, region, tag)


def all_reduce(topology: Topology, spec: CollectiveSpec, params: dict) -> Schedule:
    plan, scratch = Plan(), Scratch()
    recursive_doubling_plan(plan, scratch, list(range(spec.world_size)),
                            Region("data", 0, spec.count), reduce_op(spec.op))
    return finalize(plan, scratch, spec, topology, "recursive_doubling", params)
