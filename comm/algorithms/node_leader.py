"""Node-leader all-to-all(-v): the fewest messages, for small sizes.

Every rank but its node's leader (local rank 0) sends its whole input to the leader in
one message and receives its whole output back in one message. Leaders exchange one pack
per pair of nodes. Everything else is local copies in the leader.

Why: a small all-to-all costs messages, not bytes. On 8 ranks over 2 nodes a flat
all-to-all posts 7 sends and 7 receives per rank and `hierarchical_2d` still 4 and 4
(its proxies spread the packing over every rank); here six of the eight ranks post one
send and one receive. With more ranks than cores, as on our 2-core machine, every posted
message is CPU that the other ranks wait for. The price is that the leader moves every
byte of its node twice through memory and alone, so `hierarchical_2d` wins once
messages are large: the tuner decides where.

Layouts: leader of node a packs for node b the blocks (source s of a, destination d of
b), sources in rank order, each source's destinations in rank order; it unpacks the
pack of node b the same way.
"""

from __future__ import annotations

from topocoll.topology import Topology

from ..collectives import CollectiveSpec
from ..plan import Plan, Scratch, finalize
from ..schedule import Copy, Recv, Region, Schedule, Send, Step

TAG_GATHER = 1
TAG_PACK = 2
TAG_SCATTER = 3


def _pack_offsets(m: list[list[int]], sources: tuple[int, ...], dests: tuple[int, ...]
                  ) -> tuple[dict[tuple[int, int], int], int]:
    """Offset of block (s, d) in the pack from `sources`' node to `dests`' node; its size."""
    offsets, at = {}, 0
    for s in sources:
        for d in dests:
            offsets[s, d] = at
            at += m[s][d]
    return offsets, at


def all_to_all(topology: Topology, spec: CollectiveSpec, params: dict) -> Schedule:
    plan, scratch = Plan(), Scratch()
    nodes, m = topology.nodes, spec.matrix
    packs = {(a, b): _pack_offsets(m, nodes[a], nodes[b])
             for a in range(len(nodes)) for b in range(len(nodes)) if a != b}
    for home in range(len(nodes)):
        _plan_node(plan, scratch, topology, spec, home, packs)
    return finalize(plan, scratch, spec, topology, "node_leader", params)


def _plan_node(plan: Plan, scratch: Scratch, topology: Topology, spec: CollectiveSpec,
               home: int, packs: dict[tuple[int, int], tuple[dict[tuple[int, int], int], int]]
               ) -> None:
    """The phases of node `home`'s ranks: members one phase, the leader three."""
    p, nodes, node_of, m = spec.world_size, topology.nodes, topology.node_of, spec.matrix
    ranks = nodes[home]
    leader = ranks[0]
    # Off-diagonal traffic only: a rank whose data all stays with itself sends nothing.
    sends = {r: any(m[r][d] for d in range(p) if d != r) for r in ranks}
    receives = {r: any(m[s][r] for s in range(p) if s != r) for r in ranks}
    for rank in ranks[1:]:  # at most one message each way
        steps: list[Step] = []
        if sends[rank]:
            steps.append(Send(leader, Region("in", 0, sum(m[rank])), TAG_GATHER))
        if receives[rank]:
            steps.append(Recv(leader, Region("out", 0, sum(m[s][rank] for s in range(p))),
                              TAG_SCATTER))
        own = m[rank][rank]
        if own and not (sends[rank] and receives[rank]):
            # the leader has not got (or does not return) our own block: after the
            # receive, so it overwrites the hole the leader left there
            steps.append(Copy(Region("out", spec.recv_displs(rank)[rank], own),
                              Region("in", spec.send_displs(rank)[rank], own)))
        plan.add(rank, steps)

    gathered = {r: scratch.alloc(leader, sum(m[r])) for r in ranks[1:] if sends[r]}
    gather: list[Step] = [Recv(r, region, TAG_GATHER) for r, region in gathered.items()]
    outgoing = {b: scratch.alloc(leader, packs[home, b][1]) for b in range(len(nodes))
                if b != home and packs[home, b][1]}
    incoming = {b: scratch.alloc(leader, packs[b, home][1]) for b in range(len(nodes))
                if b != home and packs[b, home][1]}

    def block(s: int, d: int) -> Region:
        """Where block (s, d) is in the leader once the packs have arrived."""
        if s == leader:
            return Region("in", spec.send_displs(s)[d], m[s][d])
        if node_of[s] == home:
            return gathered[s].sub(spec.send_displs(s)[d], m[s][d])
        return incoming[node_of[s]].sub(packs[node_of[s], home][0][s, d], m[s][d])

    pack_copies: list[Step] = [
        Copy(region.sub(packs[home, b][0][s, d], m[s][d]), block(s, d))
        for b, region in outgoing.items() for s in ranks for d in nodes[b] if m[s][d]]
    plan.add(leader, gather + pack_copies)

    exchange: list[Step] = [Send(nodes[b][0], region, TAG_PACK)
                            for b, region in outgoing.items()]
    exchange += [Recv(nodes[b][0], region, TAG_PACK) for b, region in incoming.items()]
    assembly: list[Step] = []  # blocks in order: the executor fuses them into one copy
    scatter: list[Step] = []
    for d in ranks:
        total = sum(m[s][d] for s in range(p))
        if d == leader:
            target = Region("out", 0, total)
        elif receives[d]:
            target = scratch.alloc(leader, total)
            scatter.append(Send(d, target, TAG_SCATTER))
        else:
            continue  # nothing for d but its own block, which d copies itself
        at = spec.recv_displs(d)
        assembly += [Copy(target.sub(at[s], m[s][d]), block(s, d)) for s in range(p)
                     if m[s][d] and (s != d or d == leader or sends[d])]
    plan.add(leader, exchange + assembly)
    plan.add(leader, scatter)
