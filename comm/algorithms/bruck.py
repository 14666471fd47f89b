"""Bruck's all-to-all(-v): ceil(log2 p) rounds, for small messages.

Block k of rank i starts as the data for rank i+k. In round r every block whose index
has bit r set moves 2^r ranks forward, packed into one message, so after all rounds block
k sits at its destination. p-1 messages per rank become log2(p) at the cost of moving
each byte about log2(p)/2 times: the right trade when latency dominates.

The uneven (-v) form needs every rank's sizes to know what its partners' packs hold; the
count matrix is all-gathered by the executor before such a schedule is built.
"""

from __future__ import annotations

from topocoll.topology import Topology

from ..collectives import CollectiveSpec
from ..plan import Plan, Scratch, finalize
from ..schedule import Copy, Recv, Region, Schedule, Send, Step


def _block_size(spec: CollectiveSpec, holder: int, k: int, round_: int) -> int:
    """Size of block k held by `holder` before round `round_` (it moved k mod 2^r)."""
    p = spec.world_size
    source = (holder - (k % (1 << round_))) % p
    return spec.matrix[source][(source + k) % p]


def bruck_plan(plan: Plan, scratch: Scratch, spec: CollectiveSpec, rank: int) -> None:
    p = spec.world_size
    send_at, recv_at = spec.send_displs(rank), spec.recv_displs(rank)
    row = spec.matrix[rank]
    where: dict[int, Region] = {
        k: Region("in", send_at[(rank + k) % p], row[(rank + k) % p]) for k in range(1, p)
    }
    if row[rank]:
        plan.add(rank, [Copy(Region("out", recv_at[rank], row[rank]),
                             Region("in", send_at[rank], row[rank]))])
    round_ = 0
    while (1 << round_) < p:
        distance = 1 << round_
        moving = [k for k in range(1, p) if k & distance]
        to, frm = (rank + distance) % p, (rank - distance) % p
        outgoing = [where[k] for k in moving if where[k].count]
        incoming = [(k, _block_size(spec, frm, k, round_)) for k in moving]
        steps: list[Step] = []
        if len(outgoing) == 1:
            steps.append(Send(to, outgoing[0]))  # one block: send it where it lies
        elif outgoing:
            pack = scratch.alloc(rank, sum(r.count for r in outgoing))
            offset, copies = 0, []
            for r in outgoing:
                copies.append(Copy(pack.sub(offset, r.count), r))
                offset += r.count
            plan.add(rank, copies)
            steps.append(Send(to, pack))
        total_in = sum(n for _, n in incoming)
        if total_in:
            landing = scratch.alloc(rank, total_in)
            steps.append(Recv(frm, landing))
            offset = 0
            for k, n in incoming:
                where[k] = landing.sub(offset, n)
                offset += n
        else:
            for k, _ in incoming:
                where[k] = Region("tmp", 0, 0)
        plan.add(rank, steps)
        round_ += 1
    finals: list[Step] = []
    for k in range(1, p):
        source = (rank - k) % p
        if where[k].count:
            finals.append(Copy(Region("out", recv_at[source], where[k].count), where[k]))
    plan.add(rank, finals)


def all_to_all(topology: Topology, spec: CollectiveSpec, params: dict) -> Schedule:
    plan, scratch = Plan(), Scratch()
    for rank in range(spec.world_size):
        bruck_plan(plan, scratch, spec, rank)
    return finalize(plan, scratch, spec, topology, "bruck", params)
