"""Helpers for writing schedule generators: per-rank phase lists, scratch space, composition.

Generators work on a *group* (a list of global ranks) and on *regions* of buffers, so
that a hierarchical algorithm can call a flat one on "the ranks of my node" or "the
owners of chunk j along rail k" and splice the result into its own plan, either after
what came before (`extend`) or side by side with other sub-plans (`merge_parallel`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from topocoll.topology import Topology

from .collectives import CollectiveSpec
from .schedule import (
    Phase,
    RankProgram,
    Region,
    Scale,
    Schedule,
    Step,
    with_levels,
)

SCRATCH = "tmp"


@dataclass
class Scratch:
    """Per-rank bump allocator in the `tmp` buffer.

    Each sub-algorithm reserves its own scratch once and reuses it across its phases, so
    sub-plans merged side by side never share scratch; nothing is ever freed, which keeps
    the bookkeeping trivial at a bounded cost (a few times the message size at most).
    """

    used: dict[int, int] = field(default_factory=lambda: defaultdict(int))

    def alloc(self, rank: int, count: int) -> Region:
        offset = self.used[rank]
        self.used[rank] = offset + count
        return Region(SCRATCH, offset, count)


class Plan:
    """rank -> list of phases under construction (each phase a list of steps)."""

    def __init__(self) -> None:
        self.phases: dict[int, list[list[Step]]] = defaultdict(list)

    def add(self, rank: int, steps: Iterable[Step] = ()) -> None:
        """Append one phase to `rank`, even an empty one.

        Empty phases keep the ranks of a group in step (phase k of every member is the
        same step of the algorithm), which is what lets `merge_staggered` pipeline plans
        without deadlock; `finalize` drops them.
        """
        self.phases[rank].append(list(steps))

    def pad(self, ranks: Iterable[int]) -> None:
        """Bring `ranks` to the same number of phases (a level boundary)."""
        ranks = list(ranks)
        depth = max((len(self.phases[r]) for r in ranks), default=0)
        for r in ranks:
            self.phases[r].extend([] for _ in range(depth - len(self.phases[r])))

    def add_local(self, rank: int, step: Step) -> None:
        """Append a local step to the rank's last phase (a new phase if it has none)."""
        if self.phases[rank]:
            self.phases[rank][-1].append(step)
        else:
            self.phases[rank].append([step])

    def extend(self, other: Plan) -> Plan:
        """Sequential composition: `other`'s phases run after ours, rank by rank."""
        for rank, phases in other.phases.items():
            self.phases[rank].extend([list(p) for p in phases])
        return self

    @classmethod
    def merge_parallel(cls, plans: Sequence[Plan]) -> Plan:
        """Side-by-side composition: phase i of each plan becomes one phase i.

        The plans must touch disjoint regions (the verifier's race check enforces it)
        and use distinct tags where they share a pair of ranks.
        """
        merged = cls()
        for plan in plans:
            for rank, phases in plan.phases.items():
                target = merged.phases[rank]
                for i, phase in enumerate(phases):
                    if i < len(target):
                        target[i].extend(phase)
                    else:
                        target.append(list(phase))
        return merged

    @classmethod
    def merge_staggered(cls, plans: Sequence[Plan], stagger: int = 1) -> Plan:
        """Software pipelining: plan i starts `i * stagger` phases after plan 0.

        Phase k of the result holds plan i's phase k - i*stagger, so while one segment
        crosses the network the next is reduced inside the node. Plans must use distinct
        tags: their messages between the same ranks may share a phase.
        """
        shifted = []
        for i, plan in enumerate(plans):
            moved = cls()
            for rank, phases in plan.phases.items():
                moved.phases[rank] = [[] for _ in range(i * stagger)] + [list(p) for p in phases]
            shifted.append(moved)
        return cls.merge_parallel(shifted)

    def ranks(self) -> set[int]:
        return {r for r, p in self.phases.items() if p}


def finalize(plan: Plan, scratch: Scratch, spec: CollectiveSpec, topology: Topology,
             algorithm: str, params: dict | None = None) -> Schedule:
    """Turn a plan into a `Schedule`: buffers declared, levels recorded, `avg` finished."""
    if topology.world_size != spec.world_size:
        raise ValueError(f"topology has {topology.world_size} ranks, collective "
                         f"{spec.collective} has {spec.world_size}")
    if spec.op == "avg" and spec.collective in ("all_reduce", "reduce_scatter"):
        for rank in range(spec.world_size):
            out = Region(spec.output_buffer, 0, spec.output_count(rank))
            if out.count:
                plan.add(rank, [Scale(out, spec.world_size)])
    programs = []
    for rank in range(spec.world_size):
        buffers = spec.user_buffers(rank)
        if scratch.used.get(rank):
            buffers[SCRATCH] = scratch.used[rank]
        kept = [(i, phase) for i, phase in enumerate(plan.phases.get(rank, [])) if phase]
        phases: tuple[Phase, ...] = tuple(with_levels(phase, rank, topology)
                                          for _, phase in kept)
        programs.append(RankProgram(rank, buffers, phases, tuple(i for i, _ in kept)))
    return Schedule(
        collective=spec.collective,
        algorithm=algorithm,
        programs=tuple(programs),
        topology=topology,
        spec=spec.to_dict(),
        params=dict(params or {}),
    )


def reduce_op(op: str) -> str:
    """The elementwise op the steps use: avg reduces as sum and is scaled at the end."""
    return "sum" if op == "avg" else op


def blocks(region: Region, parts: int) -> list[Region]:
    """`region` cut into `parts` contiguous, nearly equal blocks (first ones larger)."""
    base, extra = divmod(region.count, parts)
    out, offset = [], 0
    for i in range(parts):
        n = base + (1 if i < extra else 0)
        out.append(region.sub(offset, n))
        offset += n
    return out


def regions_by_counts(buf: str, counts: Sequence[int]) -> list[Region]:
    """Consecutive regions of `buf`, one per count (e.g. each rank's block)."""
    out, offset = [], 0
    for c in counts:
        out.append(Region(buf, offset, c))
        offset += c
    return out


def largest_power_of_two_at_most(n: int) -> int:
    p = 1
    while p * 2 <= n:
        p *= 2
    return p
