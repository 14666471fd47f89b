"""Topology-aware all-reduce: keep the slow inter-node links busy only with what must cross.

`hierarchical`: intra-node reduce-scatter -> inter-node all-reduce of each chunk among
its owners (one per node, along a rail) -> intra-node all-gather. Each node's uplinks
carry 2(N-1)/N of the data once, instead of the flat ring's many crossings, and with K
rails the K owners of different chunks use K NICs at once.

Uneven nodes (3 + 5 ranks) work: the buffer is cut into M = max ranks-per-node chunks;
on a node of L ranks local rank l owns chunks l, l+L, l+2L, ... so every chunk has
exactly one owner per node, and the chunk's inter-node all-reduce runs among them.

`hierarchical_leader`: reduce to each node's first rank, all-reduce among leaders,
broadcast inside the node; fewest inter-node messages, for tiny vectors.

Inner algorithms are chosen per level: `intra` in {ring, direct}, `inter` in {ring,
recursive_doubling, rabenseifner, tree, native}.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from topocoll.topology import Topology

from ..collectives import CollectiveSpec
from ..plan import Plan, Scratch, blocks, finalize, reduce_op
from ..schedule import Native, Region, Schedule
from .direct import direct_all_gather, direct_reduce_scatter
from .rabenseifner import rabenseifner_plan
from .recursive_doubling import recursive_doubling_plan
from .ring import ring_all_gather, ring_all_reduce_plan, ring_reduce_scatter
from .tree import binomial_broadcast, binomial_reduce, tree_all_reduce_plan

FlatAllReduce = Callable[[Plan, Scratch, Sequence[int], Region, str, int], None]

FLAT_ALL_REDUCE: dict[str, FlatAllReduce] = {
    "ring": ring_all_reduce_plan,
    "recursive_doubling": recursive_doubling_plan,
    "rabenseifner": rabenseifner_plan,
    "tree": tree_all_reduce_plan,
}
INTER_CHOICES = (*FLAT_ALL_REDUCE, "native")
INTRA_CHOICES = ("ring", "direct")

TAG_INTRA = 1
TAG_INTER_BASE = 16  # chunk j's inter-node exchange uses tag 16 + j
TAG_SEGMENT_STRIDE = 1 << 12  # pipeline segment s adds s * stride to every tag
MAX_SEGMENTS = 64


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"hierarchical: {name}={value!r} is not one of {', '.join(choices)}")


def owned_chunks(chunks: Sequence[Region], node_size: int) -> list[list[Region]]:
    """Local rank l of a node of `node_size` ranks owns chunks l, l+L, l+2L, ..."""
    return [list(chunks[l::node_size]) for l in range(node_size)]


def hierarchical_plan(plan: Plan, scratch: Scratch, topology: Topology, region: Region,
                      op: str, intra: str = "ring", inter: str = "ring",
                      tag_base: int = 0) -> None:
    """In-place all-reduce of `region` over the whole topology."""
    _check_choice("intra", intra, INTRA_CHOICES)
    _check_choice("inter", inter, INTER_CHOICES)
    width = max(topology.layout)
    chunks = blocks(region, width)
    reduce_scatter = ring_reduce_scatter if intra == "ring" else direct_reduce_scatter
    all_gather = ring_all_gather if intra == "ring" else direct_all_gather
    for ranks in topology.nodes:
        reduce_scatter(plan, scratch, ranks, owned_chunks(chunks, len(ranks)), op,
                       tag_base + TAG_INTRA)
    everyone = range(topology.world_size)
    plan.pad(everyone)  # level boundary: nodes of different sizes stay in step
    if topology.num_nodes > 1:
        per_chunk: list[Plan] = []
        for j, chunk in enumerate(chunks):
            owners = [ranks[j % len(ranks)] for ranks in topology.nodes]
            sub = Plan()
            if inter == "native":
                for rank in owners if chunk.count else ():
                    sub.add(rank, [Native("all_reduce", tuple(owners), chunk, chunk, op=op)])
            else:
                FLAT_ALL_REDUCE[inter](sub, scratch, owners, chunk, op,
                                       tag_base + TAG_INTER_BASE + j)
            per_chunk.append(sub)
        if inter == "native":  # one native call per phase: run a rank's chunks in turn
            for sub in per_chunk:
                plan.extend(sub)
        else:
            plan.extend(Plan.merge_parallel(per_chunk))
        plan.pad(everyone)
    for ranks in topology.nodes:
        all_gather(plan, ranks, owned_chunks(chunks, len(ranks)), tag_base + TAG_INTRA)
    plan.pad(everyone)


def pipeline_slices(region: Region, segments: int) -> list[Region]:
    """`region` cut into `segments` slices, the first and last half the size of the rest.

    Why: the network waits for the first slice's intra-node reduce-scatter (fill) and
    the caller for the last slice's all-gather (drain). Halving the two end slices
    halves both, while the middle slices stay large (each slice costs a round of
    messages). 64 MiB on the emulated 2x4 cluster: fill 44 ms and drain 49 ms of 615
    with four equal slices."""
    if segments < 3:
        return blocks(region, segments)
    weights = [1] + [2] * (segments - 2) + [1]
    total = sum(weights)
    out, offset, seen = [], 0, 0
    for weight in weights:
        seen += weight
        end = region.count * seen // total
        out.append(region.sub(offset, end - offset))
        offset = end
    return out


def pipelined_plan(plan: Plan, scratch: Scratch, topology: Topology, region: Region, op: str,
                   segments: int, **options: str) -> None:
    """`segments` hierarchical all-reduces on consecutive slices (`pipeline_slices`),
    staggered by one phase: the network carries slice s while slice s+1 is reduced
    inside the node."""
    if not 1 <= segments <= MAX_SEGMENTS:
        raise ValueError(f"hierarchical: segments must be in 1..{MAX_SEGMENTS}, got {segments}")
    if segments == 1:
        hierarchical_plan(plan, scratch, topology, region, op, **options)
        return
    subplans = []
    for s, part in enumerate(pipeline_slices(region, segments)):
        sub = Plan()
        hierarchical_plan(sub, scratch, topology, part, op, tag_base=s * TAG_SEGMENT_STRIDE,
                          **options)
        subplans.append(sub)
    if options.get("inter") == "native":  # a native call must have its phase to itself
        for sub in subplans:
            plan.extend(sub)
    else:
        plan.extend(Plan.merge_staggered(subplans))


def leader_plan(plan: Plan, scratch: Scratch, topology: Topology, region: Region, op: str,
                inter: str = "recursive_doubling") -> None:
    """Reduce to node leaders, all-reduce among leaders, broadcast inside each node."""
    _check_choice("inter", inter, INTER_CHOICES)
    for ranks in topology.nodes:
        binomial_reduce(plan, scratch, ranks, region, op, 0, TAG_INTRA)
    leaders = [ranks[0] for ranks in topology.nodes]
    if len(leaders) > 1:
        if inter == "native":
            for rank in leaders if region.count else ():
                plan.add(rank, [Native("all_reduce", tuple(leaders), region, region, op=op)])
        else:
            FLAT_ALL_REDUCE[inter](plan, scratch, leaders, region, op, TAG_INTER_BASE)
    for ranks in topology.nodes:
        binomial_broadcast(plan, ranks, region, 0, TAG_INTRA)


def all_reduce(topology: Topology, spec: CollectiveSpec, params: dict) -> Schedule:
    plan, scratch = Plan(), Scratch()
    options = {"intra": str(params.get("intra", "ring")),
               "inter": str(params.get("inter", "ring"))}
    segments = int(params.get("segments", 1))
    pipelined_plan(plan, scratch, topology, Region("data", 0, spec.count), reduce_op(spec.op),
                   segments, **options)
    return finalize(plan, scratch, spec, topology, "hierarchical",
                    {**params, **options, "segments": segments})


def all_reduce_leader(topology: Topology, spec: CollectiveSpec, params: dict) -> Schedule:
    plan, scratch = Plan(), Scratch()
    options = {"inter": params.get("inter", "recursive_doubling")}
    leader_plan(plan, scratch, topology, Region("data", 0, spec.count), reduce_op(spec.op),
                **options)
    return finalize(plan, scratch, spec, topology, "hierarchical_leader", {**params, **options})
