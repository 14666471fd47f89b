"""The shape of a job: ranks grouped into nodes, local ranks, rails and link classes.

Every algorithm, the verifier, the cost model and the executor ask the same object
"which link does a message from rank a to rank b cross?", so that answer lives here
and nowhere else. Nodes may hold different numbers of ranks (e.g. 3 + 5) and a node's
ranks need not be consecutive: nothing below assumes either.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

MAX_RANKS = 1 << 20  # guards files that declare absurd layouts
SELF = "self"
INTRA = "intra"
INTER = "inter"


@dataclass(frozen=True, slots=True)
class Level:
    """Which level of the topology one message crosses.

    `kind` is `self` (a rank to itself), `intra` (inside a node) or `inter` (between
    nodes); `rail` is the NIC rail an inter-node message leaves on (the sender's local
    rank modulo the rail count), None otherwise.
    """

    kind: str
    rail: int | None = None

    def __str__(self) -> str:
        return self.kind if self.rail is None else f"{self.kind}/{self.rail}"

    @classmethod
    def parse(cls, text: str) -> Level:
        """Inverse of `str(level)`: `intra`, `self`, `inter/1`."""
        kind, _, rail = text.partition("/")
        if kind not in (SELF, INTRA, INTER):
            raise ValueError(f"unknown topology level {text!r}")
        return cls(kind, int(rail) if rail else None)


@dataclass(frozen=True)
class Topology:
    """Ranks -> nodes, with rails and the names of the link classes.

    `node_of[r]` is the node index of rank r; node indices are 0..num_nodes-1 in the
    order nodes first appear. `rails` is the number of NICs per node; local rank i of
    every node uses rail i % rails.
    """

    node_of: tuple[int, ...]
    rails: int = 1
    hostnames: tuple[str, ...] = ()
    intra_link: str = "shm"
    inter_link: str = "tcp"
    _meta: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.node_of:
            raise ValueError("a topology needs at least one rank")
        seen: list[int] = []
        for n in self.node_of:
            if n < 0:
                raise ValueError(f"negative node index {n} in topology")
            if n not in seen:
                seen.append(n)
        if sorted(seen) != list(range(len(seen))):
            raise ValueError(f"node indices must be 0..N-1, got {sorted(seen)}")
        if self.rails < 1:
            raise ValueError(f"rails must be >= 1, got {self.rails}")
        if self.hostnames and len(self.hostnames) != len(seen):
            raise ValueError(
                f"{len(self.hostnames)} hostnames given for {len(seen)} nodes"
            )

    # ----- constructors -------------------------------------------------------------
    @classmethod
    def from_layout(cls, layout: Sequence[int], rails: int = 1, **kw: Any) -> Topology:
        """Consecutive ranks per node: layout (2, 3) = ranks 0-1 on node 0, 2-4 on node 1."""
        if not layout or any(int(n) <= 0 for n in layout):
            raise ValueError(f"layout needs positive ranks per node, got {list(layout)}")
        ranks = sum(int(n) for n in layout)
        if ranks > MAX_RANKS:
            raise ValueError(f"layout of {ranks} ranks is beyond "
                             f"{MAX_RANKS} (not a job this library can describe)")
        node_of = tuple(i for i, n in enumerate(layout) for _ in range(int(n)))
        return cls(node_of=node_of, rails=rails, **kw)

    @classmethod
    def from_hosts(cls, hosts: Sequence[str], rails: int = 1, **kw: Any) -> Topology:
        """One hostname per rank, as a rendezvous gathers them; nodes in first-seen order."""
        order: dict[str, int] = {}
        node_of = tuple(order.setdefault(h, len(order)) for h in hosts)
        return cls(node_of=node_of, rails=rails, hostnames=tuple(order), **kw)

    @classmethod
    def single_node(cls, world_size: int) -> Topology:
        return cls.from_layout([world_size])

    # ----- derived shape ------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return len(self.node_of)

    @cached_property
    def nodes(self) -> tuple[tuple[int, ...], ...]:
        """The ranks of each node, ascending."""
        groups: list[list[int]] = [[] for _ in range(max(self.node_of) + 1)]
        for rank, node in enumerate(self.node_of):
            groups[node].append(rank)
        return tuple(tuple(g) for g in groups)

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    @cached_property
    def local_rank_of(self) -> tuple[int, ...]:
        local = [0] * self.world_size
        for ranks in self.nodes:
            for i, r in enumerate(ranks):
                local[r] = i
        return tuple(local)

    @property
    def layout(self) -> tuple[int, ...]:
        return tuple(len(n) for n in self.nodes)

    @property
    def is_uniform(self) -> bool:
        return len(set(self.layout)) == 1

    @property
    def nodes_are_contiguous(self) -> bool:
        """True when every node's ranks form one consecutive block."""
        return all(ranks == tuple(range(ranks[0], ranks[-1] + 1)) for ranks in self.nodes)

    def node_ranks(self, rank: int) -> tuple[int, ...]:
        return self.nodes[self.node_of[rank]]

    def rail_of(self, rank: int) -> int:
        return self.local_rank_of[rank] % self.rails

    def level(self, src: int, dst: int) -> Level:
        """The link class a message from `src` to `dst` crosses."""
        if src == dst:
            return Level(SELF)
        if self.node_of[src] == self.node_of[dst]:
            return Level(INTRA)
        return Level(INTER, self.rail_of(src))

    # ----- identity -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "layout": list(self.layout),
            "node_of": list(self.node_of),
            "rails": self.rails,
            "hostnames": list(self.hostnames),
            "intra_link": self.intra_link,
            "inter_link": self.inter_link,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Topology:
        if "node_of" in data:
            node_of = tuple(int(n) for n in data["node_of"])
        elif "layout" in data:
            node_of = cls.from_layout(data["layout"]).node_of
        else:
            raise ValueError("topology needs 'node_of' or 'layout'")
        return cls(
            node_of=node_of,
            rails=int(data.get("rails", 1)),
            hostnames=tuple(str(h) for h in data.get("hostnames", ())),
            intra_link=str(data.get("intra_link", "shm")),
            inter_link=str(data.get("inter_link", "tcp")),
        )

    @cached_property
    def fingerprint(self) -> str:
        """A short hash of the shape (not the hostnames): tuning tables are keyed by it."""
        shape = {"node_of": list(self.node_of), "rails": self.rails,
                 "intra": self.intra_link, "inter": self.inter_link}
        digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()
        return digest[:16]

    def describe(self) -> str:
        layout = "+".join(str(n) for n in self.layout)
        if self.is_uniform and self.num_nodes > 4:
            layout = f"{self.num_nodes} x {self.layout[0]}"
        return (f"{self.world_size} ranks on {self.num_nodes} node(s) [{layout}], "
                f"{self.rails} rail(s), intra={self.intra_link}, inter={self.inter_link}")
