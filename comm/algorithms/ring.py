"""Ring algorithms: reduce-scatter, all-gather and their composition, all-reduce.

Bandwidth-optimal (each rank sends 2(n-1)/n of the data for all-reduce) at the price of
2(n-1) latency terms. The reduce-scatter and all-gather halves are exposed on their own
because the hierarchical algorithms run them inside a node.

Blocks are lists of regions ("pieces") so that a block may be non-contiguous: the
hierarchical algorithm gives a rank of a small node several chunks to own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from topocoll.topology import Topology

from ..collectives import CollectiveSpec
from ..plan import Plan, Scratch, blocks, finalize, reduce_op, regions_by_counts
from ..schedule import Copy, Recv, Reduce, Region, Schedule, Send

Block = Sequence[Region]


def _slot_sizes(all_blocks: Sequence[Block]) -> list[int]:
    """Largest piece at each piece position, to size per-position scratch once."""
    width = max((len(b) for b in all_blocks), default=0)
    return [max((b[j].count for b in all_blocks if j < len(b)), default=0) for j in range(width)]


def ring_reduce_scatter(plan: Plan, scratch: Scratch, group: Sequence[int],
                        all_blocks: Sequence[Block], op: str, tag: int = 0,
                        out: Callable[[int], Block] | None = None) -> None:
    """After this, member i holds the reduction of block i.

    `all_blocks[b]` names block b's pieces in every member's input. With `out` None the
    reduction happens in place in the input; otherwise member i's final block lands in
    `out(i)` and the input is left untouched (partial sums live in scratch).
    """
    n = len(group)
    if n == 1:
        if out is not None:
            for dst, src in zip(out(0), all_blocks[0]):
                if src.count:
                    plan.add(group[0], [Copy(dst, src)])
        return
    slots = _slot_sizes(all_blocks)
    for i, rank in enumerate(group):
        tmp = [scratch.alloc(rank, s) for s in slots]
        acc = [scratch.alloc(rank, s) for s in slots] if out is not None else []
        right, left = group[(i + 1) % n], group[(i - 1) % n]
        for k in range(n - 1):
            send_b, recv_b = (i - k - 1) % n, (i - k - 2) % n
            last = k == n - 2
            steps: list = []
            for j, piece in enumerate(all_blocks[send_b]):
                src = piece if (k == 0 or out is None) else acc[j].sub(0, piece.count)
                if piece.count:
                    steps.append(Send(right, src, tag))
            for j, piece in enumerate(all_blocks[recv_b]):
                if not piece.count:
                    continue
                landing = tmp[j].sub(0, piece.count)
                steps.append(Recv(left, landing, tag))
                if out is None:
                    dst = piece
                elif last:
                    dst = out(i)[j]
                else:
                    dst = acc[j].sub(0, piece.count)
                steps.append(Reduce(dst, (piece, landing), op))
            plan.add(rank, steps)


def ring_all_gather(plan: Plan, group: Sequence[int], all_blocks: Sequence[Block],
                    tag: int = 0, own: Callable[[int], Block] | None = None) -> None:
    """Member i starts with block i (in place, or in `own(i)`); all end with every block."""
    n = len(group)
    if own is not None:
        for i, rank in enumerate(group):
            for dst, src in zip(all_blocks[i], own(i)):
                if src.count:
                    plan.add(rank, [Copy(dst, src)])
    if n == 1:
        return
    for i, rank in enumerate(group):
        right, left = group[(i + 1) % n], group[(i - 1) % n]
        for k in range(n - 1):
            send_b, recv_b = (i - k) % n, (i - k - 1) % n
            steps: list = []
            for j, piece in enumerate(all_blocks[send_b]):
                src = own(i)[j] if (k == 0 and own is not None) else piece
                if piece.count:
                    steps.append(Send(right, src, tag))
            steps += [Recv(left, piece, tag) for piece in all_blocks[recv_b] if piece.count]
            plan.add(rank, steps)


def ring_all_reduce_plan(plan: Plan, scratch: Scratch, group: Sequence[int], region: Region,
                         op: str, tag: int = 0) -> None:
    """Ring all-reduce of `region` (same offsets on every member), in place."""
    parts = [[b] for b in blocks(region, len(group))]
    # Rotate so member i finishes the reduce-scatter owning block i, as the gather expects.
    ring_reduce_scatter(plan, scratch, group, parts, op, tag)
    ring_all_gather(plan, group, parts, tag)


# ----- collective entry points ---------------------------------------------------------
def all_reduce(topology: Topology, spec: CollectiveSpec, params: dict) -> Schedule:
    plan, scratch = Plan(), Scratch()
    group = list(range(spec.world_size))
    ring_all_reduce_plan(plan, scratch, group, Region("data", 0, spec.count), reduce_op(spec.op))
    return finalize(plan, scratch, spec, topology, "ring", params)


def reduce_scatter(topology: Topology, spec: CollectiveSpec, params: dict) -> Schedule:
    plan, scratch = Plan(), Scratch()
    group = list(range(spec.world_size))
    parts = [[r] for r in regions_by_counts("in", spec.counts)]
    ring_reduce_scatter(plan, scratch, group, parts, reduce_op(spec.op),
                        out=lambda i: [Region("out", 0, spec.counts[i])])
    return finalize(plan, scratch, spec, topology, "ring", params)


def all_gather(topology: Topology, spec: CollectiveSpec, params: dict) -> Schedule:
    plan = Plan()
    group = list(range(spec.world_size))
    parts = [[r] for r in regions_by_counts("out", spec.counts)]
    ring_all_gather(plan, group, parts, own=lambda i: [Region("in", 0, spec.counts[i])])
    return finalize(plan, Scratch(), spec, topology, "ring", params)

