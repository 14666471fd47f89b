"""Rabenseifner's all-reduce: reduce-scatter by recursive halving, all-gather by doubling.

Sends 2(p-1)/p of the data like the ring but in 2 log2(p) steps, so it wins for medium
and large messages when latency still matters. Non-powers of two use the same fold-in /
fold-out fix as recursive doubling.
"""

from __future__ import annotations

from collections.abc import Sequence

from topocoll.topology import Topology

from ..collectives import CollectiveSpec
from ..plan import Plan, Scratch, blocks, finalize, reduce_op
from ..schedule import Recv, Reduce, Region, Schedule, Send
from .recursive_doubling import fold_in, fold_out


def _span(parts: list[Region], lo: int, hi: int) -> Region:
    """The contiguous region covering blocks lo..hi-1."""
    first, last = parts[lo], parts[hi - 1]
    return Region(first.buf, first.offset, last.end - first.offset)


def rabenseifner_plan(plan: Plan, scratch: Scratch, group: Sequence[int], region: Region,
                      op: str, tag: int = 0) -> None:
    """In-place all-reduce of `region` over `group`."""
    if len(group) == 1 or region.count == 0:
        return
    active = fold_in(plan, scratch, group, region, op, tag)
    pof2 = len(active)
    parts = blocks(region, pof2)
    for nr, rank in enumerate(active):
        tmp = scratch.alloc(rank, (region.count + 1) // 2 + pof2)
        lo, hi = 0, pof2
        distance = pof2 // 2
        history: list[tuple[int, int, int]] = []
        while distance >= 1:  # reduce-scatter by recursive halving
            partner = active[nr ^ distance]
            mid = (lo + hi) // 2
            if nr & distance:
                keep, give = (mid, hi), (lo, mid)
            else:
                keep, give = (lo, mid), (mid, hi)
            kept = _span(parts, *keep)
            landing = tmp.sub(0, kept.count)
            steps = []
            if _span(parts, *give).count:
                steps.append(Send(partner, _span(parts, *give), tag))
            if kept.count:
                steps += [Recv(partner, landing, tag), Reduce(kept, (kept, landing), op)]
            plan.add(rank, steps)
            history.append((partner, *give))
            lo, hi = keep
            distance //= 2
        for partner, give_lo, give_hi in reversed(history):  # all-gather by doubling
            mine, theirs = _span(parts, lo, hi), _span(parts, give_lo, give_hi)
            steps = []
            if mine.count:
                steps.append(Send(partner, mine, tag))
            if theirs.count:
                steps.append(Recv(partner, theirs, tag))
            plan.add(rank, steps)
            lo, hi = min(lo, give_lo), max(hi, give_hi)
    plan.pad(group)
    fold_out(plan, group, region, tag)


def all_reduce(topology: Topology, spec: CollectiveSpec, params: dict) -> Schedule:
    plan, scratch = Plan(), Scratch()
    rabenseifner_plan(plan, scratch, list(range(spec.world_size)),
                      Region("data", 0, spec.count), reduce_op(spec.op))
    return finalize(plan, scratch, spec, topology, "rabenseifner", params)
