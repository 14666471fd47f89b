"""Pairwise-exchange all-to-all(-v): in step s rank i sends to i+s and receives from i-s.

Every rank receives from exactly one peer per step, so no receiver is flooded (incast);
`window` steps may share a phase to trade that for fewer latency terms. Needs only the
rank's own row and column of the count matrix, so all-to-all-v costs no extra exchange.
"""

from __future__ import annotations

from topocoll.topology import Topology

from ..collectives import CollectiveSpec
from ..plan import Plan, Scratch, finalize
from ..schedule import Copy, Recv, Region, Schedule, Send, Step


def pairwise_plan(plan: Plan, spec: CollectiveSpec, rank: int, window: int = 1) -> None:
    p = spec.world_size
    send_at, recv_at = spec.send_displs(rank), spec.recv_displs(rank)
    row = spec.matrix[rank]
    phases: list[list[Step]] = []
    for s in range(1, p):
        dst, src = (rank + s) % p, (rank - s) % p
        steps: list[Step] = []
        if row[dst]:
            steps.append(Send(dst, Region("in", send_at[dst], row[dst])))
        incoming = spec.matrix[src][rank]
        if incoming:
            steps.append(Recv(src, Region("out", recv_at[src], incoming)))
        if (s - 1) % window == 0:
            phases.append(steps)
        else:
            phases[-1].extend(steps)
    if row[rank]:  # the rank's block to itself is a local copy
        own = Copy(Region("out", recv_at[rank], row[rank]), Region("in", send_at[rank], row[rank]))
        if phases:
            phases[0].append(own)
        else:
            phases.append([own])
    for steps in phases:
        plan.add(rank, steps)


def all_to_all(topology: Topology, spec: CollectiveSpec, params: dict) -> Schedule:
    window = int(params.get("window", 1))
    if window < 1:
        raise ValueError(f"pairwise: window must be >= 1, got {window}")
    plan = Plan()
    for rank in range(spec.world_size):
        pairwise_plan(plan, spec, rank, window)
    return finalize(plan, Scratch(), spec, topology, "pairwise", {**params, "window": window})
