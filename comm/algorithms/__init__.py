"""The algorithm library: one schedule generator per (collective, algorithm name).

Adding an algorithm = writing a function `(topology, spec, params) -> Schedule` in a
family file and registering it below; the executor, verifier, cost model, tuner,
benchmark and report pick it up from here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from topocoll.topology import Topology

from ..collectives import COLLECTIVES, CollectiveSpec
from ..schedule import Schedule
from . import (
    bruck,
    direct,
    hierarchical,
    hierarchical_2d,
    node_leader,
    pairwise,
    rabenseifner,
    recursive_doubling,
    ring,
    tree,
)

Generator = Callable[[Topology, CollectiveSpec, dict], Schedule]

# Names that are not generators: the transport's own collective and the tuner's pick.
NATIVE = "native"
TUNED = "tuned"


@dataclass(frozen=True)
class Algorithm:
    collective: str
    name: str
    build: Generator
    summary: str
    needs_full_matrix: bool = False  # all-to-all-v: must know every rank's split sizes
    topology_aware: bool = False


_A2A = ("all_to_all", "all_to_all_v")

_REGISTRY: list[Algorithm] = [
    Algorithm("all_reduce", "ring", ring.all_reduce, "ring reduce-scatter + all-gather"),
    Algorithm("all_reduce", "recursive_doubling", recursive_doubling.all_reduce,
              "log2(p) whole-vector exchanges"),
    Algorithm("all_reduce", "rabenseifner", rabenseifner.all_reduce,
              "recursive-halving reduce-scatter + recursive-doubling all-gather"),
    Algorithm("all_reduce", "tree", tree.all_reduce, "binomial reduce + broadcast"),
    Algorithm("all_reduce", "hierarchical", hierarchical.all_reduce,
              "intra-node reduce-scatter, inter-node all-reduce per rail, intra all-gather",
              topology_aware=True),
    Algorithm("all_reduce", "hierarchical_leader", hierarchical.all_reduce_leader,
              "reduce to node leader, leaders all-reduce, broadcast", topology_aware=True),
    *[Algorithm(c, "pairwise", pairwise.all_to_all, "p-1 shifted exchanges") for c in _A2A],
    *[Algorithm(c, "bruck", bruck.all_to_all, "log2(p) packed rounds",
                needs_full_matrix=True) for c in _A2A],
    *[Algorithm(c, "hierarchical_2d", hierarchical_2d.all_to_all,
                "aggregate in node, one pack per node pair", needs_full_matrix=True,
                topology_aware=True) for c in _A2A],
    *[Algorithm(c, "node_leader", node_leader.all_to_all,
                "one message to and from the node leader, one pack per node pair",
                needs_full_matrix=True, topology_aware=True) for c in _A2A],
    Algorithm("reduce_scatter", "ring", ring.reduce_scatter, "ring"),
    Algorithm("reduce_scatter", "direct", direct.reduce_scatter, "all owners at once"),
    Algorithm("all_gather", "ring", ring.all_gather, "ring"),
    Algorithm("all_gather", "direct", direct.all_gather, "all peers at once"),
    Algorithm("broadcast", "tree", tree.broadcast, "binomial tree"),
]

ALGORITHMS: dict[tuple[str, str], Algorithm] = {(a.collective, a.name): a for a in _REGISTRY}


class UnknownAlgorithmError(ValueError):
    pass


def algorithm_names(collective: str) -> list[str]:
    """Every generator registered for `collective`, in registry order."""
    if collective not in COLLECTIVES:
        raise UnknownAlgorithmError(f"unknown collective {collective!r}")
    return [a.name for a in _REGISTRY if a.collective == collective]


def get_algorithm(collective: str, name: str) -> Algorithm:
    try:
        return ALGORITHMS[collective, name]
    except KeyError:
        known = ", ".join(algorithm_names(collective))
        raise UnknownAlgorithmError(
            f"no algorithm {name!r} for {collective}; known: {known}"
        ) from None


def build_schedule(name: str, topology: Topology, spec: CollectiveSpec,
                   **params: object) -> Schedule:
    """The schedule of algorithm `name` for this collective call on this topology."""
    return get_algorithm(spec.collective, name).build(topology, spec, dict(params))
