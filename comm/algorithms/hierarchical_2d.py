"""Node-aggregated (2D) all-to-all(-v): few large messages on the inter-node network.

Phase A (intra-node): each rank forwards the data it has for destination (node m, local
q) to its node's proxy for that column, local rank q mod L; the proxy receives every
source's share straight into one pack per destination, in source order.
Phase B: each proxy sends one pack per destination across the network (along rail
q mod K when nodes are even), while same-node data goes directly, over the other link.

A flat all-to-all sends N*L messages per rank pair of nodes; this sends one. When a
node's ranks are consecutive the pack lands directly in the receiver's output.
"""

from __future__ import annotations

from topocoll.topology import Topology

from ..collectives import CollectiveSpec
from ..plan import Plan, Scratch, finalize
from ..schedule import Copy, Recv, Region, Schedule, Send, Step

TAG_FORWARD = 1
TAG_DIRECT = 2
TAG_PACK = 3


def _proxy(topology: Topology, node: int, dest: int) -> int:
    """The rank of `node` that carries its traffic for `dest` across the network."""
    ranks = topology.nodes[node]
    return ranks[topology.local_rank_of[dest] % len(ranks)]


def hierarchical_2d_plan(plan: Plan, scratch: Scratch, topology: Topology,
                         spec: CollectiveSpec) -> None:
    p, node_of, nodes = spec.world_size, topology.node_of, topology.nodes
    m = spec.matrix
    send_at = [spec.send_displs(r) for r in range(p)]
    recv_at = [spec.recv_displs(r) for r in range(p)]
    # Where each proxy packs the data of its node for each remote destination.
    packs: dict[tuple[int, int], Region] = {}
    for rank in range(p):
        for dest in range(p):
            if node_of[dest] != node_of[rank] and _proxy(topology, node_of[rank], dest) == rank:
                size = sum(m[src][dest] for src in nodes[node_of[rank]])
                packs[rank, dest] = scratch.alloc(rank, size)

    def pack_slot(proxy: int, src: int, dest: int) -> Region:
        offset = sum(m[s][dest] for s in nodes[node_of[proxy]] if s < src)
        return packs[proxy, dest].sub(offset, m[src][dest])

    for rank in range(p):
        home = node_of[rank]
        forward: list[Step] = []
        exchange: list[Step] = []
        for dest in range(p):  # what this rank sends
            seg = Region("in", send_at[rank][dest], m[rank][dest])
            if not seg.count:
                continue
            if dest == rank:
                exchange.append(Copy(Region("out", recv_at[rank][rank], seg.count), seg))
            elif node_of[dest] == home:
                exchange.append(Send(dest, seg, TAG_DIRECT))
            else:
                proxy = _proxy(topology, home, dest)
                if proxy == rank:
                    forward.append(Copy(pack_slot(rank, rank, dest), seg))
                else:
                    forward.append(Send(proxy, seg, TAG_FORWARD))
        for dest in range(p):  # what this rank receives as a proxy, in the senders' order
            if (rank, dest) in packs:
                for src in nodes[home]:
                    if src != rank and m[src][dest]:
                        forward.append(Recv(src, pack_slot(rank, src, dest), TAG_FORWARD))
            if dest != rank and (rank, dest) in packs and packs[rank, dest].count:
                exchange.append(Send(dest, packs[rank, dest], TAG_PACK))
        for src in nodes[home]:  # direct deliveries from my own node
            if src != rank and m[src][rank]:
                exchange.append(Recv(src, Region("out", recv_at[rank][src], m[src][rank]),
                                     TAG_DIRECT))
        unpack: list[Step] = []
        for node, ranks in enumerate(nodes):  # one pack from every other node
            if node == home:
                continue
            size = sum(m[src][rank] for src in ranks)
            if not size:
                continue
            proxy = _proxy(topology, node, rank)
            if ranks == tuple(range(ranks[0], ranks[-1] + 1)):
                exchange.append(Recv(proxy, Region("out", recv_at[rank][ranks[0]], size),
                                     TAG_PACK))
            else:
                landing = scratch.alloc(rank, size)
                exchange.append(Recv(proxy, landing, TAG_PACK))
                offset = 0
                for src in ranks:
                    if m[src][rank]:
                        unpack.append(Copy(Region("out", recv_at[rank][src], m[src][rank]),
                                           landing.sub(offset, m[src][rank])))
                        offset += m[src][rank]
        plan.add(rank, forward)
        plan.add(rank, exchange + unpack)


def all_to_all(topology: Topology, spec: CollectiveSpec, params: dict) -> Schedule:
    plan, scratch = Plan(), Scratch()
    hierarchical_2d_plan(plan, scratch, topology, spec)
    return finalize(plan, scratch, spec, topology, "hierarchical_2d", params)
