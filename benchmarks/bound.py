"""The physical bound of a row: the least time the slowest link class needs.

Between nodes every byte crosses a node's uplink (each direction shaped on its own, as a
full-duplex NIC). The best possible algorithm must move, per node and direction:
- all-reduce: 2(N-1)/N of the vector (reduce-scatter out + all-gather out, N nodes);
- reduce-scatter and all-gather: (N-1)/N of the vector;
- all-to-all(-v): the node's off-node share of what its ranks send (or receive).
K rails carry it K times faster. tbf lets its `burst` bytes through at once per link, so
those are free. Inside a node we assume the link is not the bottleneck (that is what the
emulated cluster models), so single-node jobs have no bound (None).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from topocoll.topology import Topology


@dataclass(frozen=True)
class LinkBudget:
    rate_bytes_per_s: float  # one inter-node link, one direction
    burst_bytes: int = 0
    source: str = ""


def link_budget(topology: Topology) -> LinkBudget | None:
    """From TOPOCOLL_INTER_RATE (e.g. `1gbit`) or the emulated cluster's state file."""
    from topocoll.topology.cluster import load_state, parse_burst, parse_rate

    rate = os.environ.get("TOPOCOLL_INTER_RATE", "").strip()
    if rate:
        burst = os.environ.get("TOPOCOLL_INTER_BURST", "0").strip()
        return LinkBudget(parse_rate(rate), parse_burst(burst) if burst != "0" else 0,
                          "TOPOCOLL_INTER_RATE")
    try:
        state = load_state()
    except Exception:  # an unreadable state file is not this row's problem
        return None
    if state is None or list(state.layout) != list(topology.layout):
        return None
    return LinkBudget(state.rate_bytes_per_s, state.burst_bytes, "emulated cluster")


def node_outbound_bytes(collective: str, bytes_per_rank: int, topology: Topology,
                        splits: list[list[int]] | None = None, itemsize: int = 1) -> float:
    """Bytes the busiest node must send off-node in one call, under the best algorithm."""
    n = topology.num_nodes
    if n <= 1:
        return 0.0
    if collective == "all_reduce":
        return 2.0 * (n - 1) / n * bytes_per_rank
    if collective in ("reduce_scatter", "all_gather"):
        return (n - 1) / n * bytes_per_rank
    p = topology.world_size
    worst = 0.0
    for ranks in topology.nodes:
        inside = set(ranks)
        if splits is None:
            out = sum(bytes_per_rank * (p - len(ranks)) / p for _ in ranks)
        else:
            out = sum(splits[r][d] * itemsize for r in ranks for d in range(p)
                      if d not in inside)
        worst = max(worst, out)
    return worst


def bound_us(collective: str, bytes_per_rank: int, topology: Topology,
             budget: LinkBudget | None, splits: list[list[int]] | None = None,
             itemsize: int = 1) -> float | None:
    if budget is None or topology.num_nodes <= 1:
        return None
    out = node_outbound_bytes(collective, bytes_per_rank, topology, splits, itemsize)
    links = topology.rails
    payload = max(out - budget.burst_bytes * links, 0.0)
    return payload / (budget.rate_bytes_per_s * links) * 1e6
