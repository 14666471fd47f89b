"""Choosing an algorithm per call: environment override > tuning table > built-in default.

The built-in defaults are deliberately simple rules of thumb from the literature
(latency-bound small messages -> log-step algorithms; bandwidth-bound large ones ->
ring/Rabenseifner; several nodes -> the hierarchical forms). The tuner replaces them with
measured decisions for a given topology.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from topocoll.topology import Topology

from .algorithms import algorithm_names

ENV_PREFIX = "TOPOCOLL_ALGO_"


@dataclass(frozen=True)
class Choice:
    algorithm: str
    reason: str


def env_override(collective: str) -> str | None:
    """`TOPOCOLL_ALGO_ALL_REDUCE=ring` style forcing; validated against the registry."""
    names = (ENV_PREFIX + collective.upper(), ENV_PREFIX + collective.upper().replace("_", ""))
    value = next((os.environ[n].strip() for n in names if os.environ.get(n, "").strip()), "")
    if not value:
        return None
    if value != "native" and value not in algorithm_names(collective):
        raise ValueError(f"{ENV_PREFIX}{collective.upper()}={value!r} is not an algorithm for "
                         f"{collective}; choose from {', '.join(algorithm_names(collective))}, "
                         "native")
    return value


class RememberedChoices:
    """`choose`, remembered per call shape (collective, byte count) for one table.

    Why: on the emulated 2x4 cluster (8 ranks over 2 cores) the tuned path's `choose`
    (two environment reads, the table's bisect) cost 25-35 us of CPU per rank per call,
    +200 us over the ranks of a 2 KiB all-to-all, which made the backend with a table 4%
    slower than the same algorithm forced (45 turns: 9 and 10 of 10 sizes slower in two runs);
    remembered, the two cost the same. So `TOPOCOLL_ALGO_*` is read the first time a
    communicator chooses for a call shape, as NCCL reads its variables once; a new
    table (the communicator's `tuning` replaced) forgets everything. A bad override is
    never remembered: every call with it is refused.
    """

    LIMIT = 4096  # call shapes; MoE all-to-alls change size every step

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self._table: object | None = None
        self._choices: dict[tuple[str, int], Choice] = {}

    def __call__(self, collective: str, nbytes: int, table: object | None) -> Choice:
        if table is not self._table:
            self._table, self._choices = table, {}
        key = (collective, nbytes)
        choice = self._choices.get(key)
        if choice is None:
            choice = choose(collective, nbytes, self.topology, table)
            if len(self._choices) >= self.LIMIT:
                self._choices.clear()
            self._choices[key] = choice
        return choice


def default_choice(collective: str, nbytes: int, topology: Topology) -> Choice:
    multi_node = topology.num_nodes > 1 and topology.world_size > topology.num_nodes
    if collective == "all_reduce":
        if nbytes <= 16 * 1024:
            if multi_node:
                return Choice("hierarchical_leader", "small message across nodes")
            return Choice("recursive_doubling", "small message: fewest latency terms")
        if multi_node:
            return Choice("hierarchical", "large message across nodes: cross uplinks once")
        return Choice("ring" if nbytes >= 4 << 20 else "rabenseifner",
                      "bandwidth-bound on one node")
    if collective in ("all_to_all", "all_to_all_v"):
        per_peer = nbytes // max(topology.world_size, 1)
        if multi_node:
            return Choice("hierarchical_2d", "across nodes: one aggregated message per node pair")
        if per_peer <= 64 << 10:
            return Choice("pairwise", "small blocks: every exchange posted at once")
        return Choice("pairwise", "large blocks: one peer per step, no incast")
    if collective in ("reduce_scatter", "all_gather"):
        return Choice("direct" if topology.world_size <= 8 else "ring", "default")
    return Choice("tree", "default")


# Pipeline segments of a hierarchical all-reduce: about 10 MiB each, at most 6, and few
# enough that every inter-node ring step of a segment still moves MIN_RING_CHUNK_BYTES (a
# segment's ring chunk is its bytes over the world size, and each segment pays the ring's
# step latencies again). On the 2x4 cluster (1 Gbit/s, 256 KiB tbf burst), 64 MiB in 6
# segments beat 4 by 1.9% over Gloo (574 vs 586 ms) and 2.0% over MPI (570 vs 582),
# medians of 16 calls taking turns; 8 and 12 were no better, and on 2 rails 6 and 4 were
# alike. On 128 nodes x 8 (the simulator's 8x-nvlink-400g preset) the chunk floor keeps
# 32-128 MiB unsegmented, priced 1.3-2.1x faster than the 4 segments of before.
PIPELINE_SEGMENT_BYTES = 10 << 20
MAX_DEFAULT_SEGMENTS = 6
MIN_RING_CHUNK_BYTES = 128 << 10


def default_params(collective: str, algorithm: str, nbytes: int, topology: Topology
                   ) -> dict[str, object]:
    """Inner choices of the composite algorithms when the caller gives none.

    Inside a node of up to 8 ranks the direct (one-phase) reduce-scatter/all-gather wins
    over a ring on shared memory; large vectors are cut into pipeline segments so the
    network carries one while the next is reduced inside the node.
    """
    if collective in ("all_to_all", "all_to_all_v") and algorithm == "pairwise":
        # Small blocks: every exchange in one phase (one latency, as native all-to-alls
        # do); large blocks: one peer per step, so no receiver is flooded.
        per_peer = nbytes // max(topology.world_size, 1)
        return {"window": max(topology.world_size - 1, 1) if per_peer <= 64 << 10 else 1}
    if collective != "all_reduce" or algorithm != "hierarchical":
        return {}
    segments = max(1, min(MAX_DEFAULT_SEGMENTS, nbytes // PIPELINE_SEGMENT_BYTES,
                          nbytes // (MIN_RING_CHUNK_BYTES * max(topology.world_size, 1))))
    intra = "direct" if max(topology.layout) <= 8 else "ring"
    return {"intra": intra, "inter": "ring", "segments": segments}


def choose(collective: str, nbytes: int, topology: Topology, table: object | None = None
           ) -> Choice:
    forced = env_override(collective)
    if forced:
        return Choice(forced, f"forced by {ENV_PREFIX}{collective.upper()}")
    if table is not None and hasattr(table, "lookup"):
        picked = table.lookup(collective, nbytes)
        if picked:
            return Choice(picked, "tuning table")
    return default_choice(collective, nbytes, topology)
