"""The schedule IR: an algorithm as data.

A `Schedule` holds one `RankProgram` per rank. A program declares its buffers (name ->
element count) and a list of phases; a phase is a tuple of steps over buffer regions.

Phase semantics (shared by the executor, the verifier and the cost model):
1. the communication steps of a phase (`Send`, `Recv`, `Native`) are issued together
   and may run concurrently; a phase is the unit in which links are shared;
2. all of them complete before the phase's local steps (`Reduce`, `Copy`, `Scale`) run,
   in the order listed;
3. messages between two ranks match in order per (sender, receiver, tag) channel.

Counts and offsets are in elements, so one schedule serves every dtype. Every
communication step records the topology level it crosses (`self`, `intra`, `inter/k`)
so that each level can run on its own transport and be priced on its own link.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from topocoll.topology import Level, Topology

SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True)
class Region:
    """`count` elements of buffer `buf` starting at element `offset`."""

    buf: str
    offset: int
    count: int

    @property
    def end(self) -> int:
        return self.offset + self.count

    def sub(self, offset: int, count: int) -> Region:
        """A region relative to this one; must stay inside it."""
        if offset < 0 or count < 0 or offset + count > self.count:
            raise ValueError(f"sub-region [{offset}, {offset + count}) outside {self}")
        return Region(self.buf, self.offset + offset, count)

    def overlaps(self, other: Region) -> bool:
        return (self.buf == other.buf and self.count > 0 and other.count > 0
                and self.offset < other.end and other.offset < self.end)

    def to_json(self) -> list[Any]:
        return [self.buf, self.offset, self.count]

    @classmethod
    def from_json(cls, data: Any) -> Region:
        buf, offset, count = data
        return cls(str(buf), int(offset), int(count))

    def __str__(self) -> str:
        return f"{self.buf}[{self.offset}:{self.end}]"


@dataclass(frozen=True, slots=True)
class Send:
    peer: int
    src: Region
    tag: int = 0
    level: Level | None = None


@dataclass(frozen=True, slots=True)
class Recv:
    peer: int
    dst: Region
    tag: int = 0
    level: Level | None = None


@dataclass(frozen=True, slots=True)
class Reduce:
    """dst = srcs[0] op srcs[1] op ...; dst may be srcs[0] itself (in place)."""

    dst: Region
    srcs: tuple[Region, ...]
    op: str


@dataclass(frozen=True, slots=True)
class Copy:
    dst: Region
    src: Region


@dataclass(frozen=True, slots=True)
class Scale:
    """dst /= divisor: how `avg` finishes after a `sum`."""

    dst: Region
    divisor: int


NATIVE_COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather", "broadcast")


@dataclass(frozen=True, slots=True)
class Native:
    """A collective of the transport itself, over the ranks in `group` (global ranks).

    - all_reduce: `src` is reduced in place (`dst` == `src`);
    - reduce_scatter: `src` holds sum(counts) elements, `dst` receives counts[i];
    - all_gather: `src` holds counts[i], `dst` receives sum(counts) in group order;
    - broadcast: `src` == `dst`, from group member `root` (an index into `group`).
    """

    collective: str
    group: tuple[int, ...]
    src: Region
    dst: Region
    counts: tuple[int, ...] = ()
    op: str = "sum"
    root: int = 0
    level: Level | None = None


Step = Send | Recv | Reduce | Copy | Scale | Native
Phase = tuple[Step, ...]
COMM_STEPS = (Send, Recv, Native)
LOCAL_STEPS = (Reduce, Copy, Scale)


@dataclass(frozen=True)
class RankProgram:
    """One rank's phases. `rounds`: each phase's round in the plan it came from (its
    index before the rank's empty phases were dropped); phases of different ranks with
    the same round are the ones that run side by side, which the cost model needs to
    know which messages share a link. Empty: the phases' positions."""

    rank: int
    buffers: dict[str, int]
    phases: tuple[Phase, ...]
    rounds: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.rounds and (len(self.rounds) != len(self.phases)
                            or any(b <= a for a, b in zip(self.rounds, self.rounds[1:]))):
            raise ValueError(f"rank {self.rank}: rounds {self.rounds} must increase, one per "
                             f"phase ({len(self.phases)})")

    def round_of(self, phase: int) -> int:
        return self.rounds[phase] if self.rounds else phase

    def steps(self) -> Iterator[Step]:
        for phase in self.phases:
            yield from phase


@dataclass(frozen=True)
class Schedule:
    """Every rank's program plus what it was built for."""

    collective: str
    algorithm: str
    programs: tuple[RankProgram, ...]
    topology: Topology
    spec: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)
    size_range: tuple[int, int] | None = None  # [lo, hi) in bytes this plan is meant for

    @property
    def world_size(self) -> int:
        return len(self.programs)

    def to_dict(self) -> dict[str, Any]:
        body = {
            "schema": SCHEMA_VERSION,
            "collective": self.collective,
            "algorithm": self.algorithm,
            "world_size": self.world_size,
            "topology": self.topology.to_dict(),
            "spec": self.spec,
            "params": self.params,
            "size_range": list(self.size_range) if self.size_range else None,
            "programs": [_program_to_json(p) for p in self.programs],
        }
        body["id"] = _content_hash(body)
        return body

    def to_json(self) -> str:
        """Deterministic JSON: same schedule, same bytes, same id."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def id(self) -> str:
        return self.to_dict()["id"]

    @classmethod
    def from_json(cls, text: str) -> Schedule:
        data = json.loads(text)
        if data.get("schema") != SCHEMA_VERSION:
            raise ValueError(f"schedule schema {data.get('schema')!r} is not {SCHEMA_VERSION}")
        expected = data.pop("id", None)
        if expected is None or _content_hash(data) != expected:
            raise ValueError("schedule content does not match its id (modified or corrupt)")
        return cls(
            collective=data["collective"],
            algorithm=data["algorithm"],
            programs=tuple(_program_from_json(p) for p in data["programs"]),
            topology=Topology.from_dict(data["topology"]),
            spec=data["spec"],
            params=data["params"],
            size_range=tuple(data["size_range"]) if data["size_range"] else None,
        )

    def with_size_range(self, lo: int, hi: int) -> Schedule:
        return replace(self, size_range=(lo, hi))


def _content_hash(body: dict[str, Any]) -> str:
    content = {k: v for k, v in body.items() if k != "id"}
    blob = json.dumps(content, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


# ----- step (de)serialization ---------------------------------------------------------
def step_to_json(step: Step) -> dict[str, Any]:
    level = getattr(step, "level", None)
    out: dict[str, Any]
    if isinstance(step, Send):
        out = {"op": "send", "peer": step.peer, "src": step.src.to_json(), "tag": step.tag}
    elif isinstance(step, Recv):
        out = {"op": "recv", "peer": step.peer, "dst": step.dst.to_json(), "tag": step.tag}
    elif isinstance(step, Reduce):
        out = {"op": "reduce", "dst": step.dst.to_json(),
               "srcs": [s.to_json() for s in step.srcs], "redop": step.op}
    elif isinstance(step, Copy):
        out = {"op": "copy", "dst": step.dst.to_json(), "src": step.src.to_json()}
    elif isinstance(step, Scale):
        out = {"op": "scale", "dst": step.dst.to_json(), "divisor": step.divisor}
    elif isinstance(step, Native):
        out = {"op": "native", "collective": step.collective, "group": list(step.group),
               "src": step.src.to_json(), "dst": step.dst.to_json(),
               "counts": list(step.counts), "redop": step.op, "root": step.root}
    else:  # pragma: no cover - exhaustive over Step
        raise TypeError(f"not a schedule step: {step!r}")
    if level is not None:
        out["level"] = str(level)
    return out


def step_from_json(data: dict[str, Any]) -> Step:
    kind = data["op"]
    level = Level.parse(data["level"]) if "level" in data else None
    if kind == "send":
        return Send(int(data["peer"]), Region.from_json(data["src"]), int(data["tag"]), level)
    if kind == "recv":
        return Recv(int(data["peer"]), Region.from_json(data["dst"]), int(data["tag"]), level)
    if kind == "reduce":
        return Reduce(Region.from_json(data["dst"]),
                      tuple(Region.from_json(s) for s in data["srcs"]), str(data["redop"]))
    if kind == "copy":
        return Copy(Region.from_json(data["dst"]), Region.from_json(data["src"]))
    if kind == "scale":
        return Scale(Region.from_json(data["dst"]), int(data["divisor"]))
    if kind == "native":
        return Native(str(data["collective"]), tuple(int(r) for r in data["group"]),
                      Region.from_json(data["src"]), Region.from_json(data["dst"]),
                      tuple(int(c) for c in data["counts"]), str(data["redop"]),
                      int(data["root"]), level)
    raise ValueError(f"unknown schedule step {kind!r}")


def _program_to_json(program: RankProgram) -> dict[str, Any]:
    out = {
        "rank": program.rank,
        "buffers": dict(sorted(program.buffers.items())),
        "phases": [[step_to_json(s) for s in phase] for phase in program.phases],
    }
    if program.rounds:
        out["rounds"] = list(program.rounds)
    return out


def _program_from_json(data: dict[str, Any]) -> RankProgram:
    return RankProgram(
        rank=int(data["rank"]),
        buffers={str(k): int(v) for k, v in data["buffers"].items()},
        phases=tuple(tuple(step_from_json(s) for s in phase) for phase in data["phases"]),
        rounds=tuple(int(r) for r in data.get("rounds", ())),
    )


def with_levels(steps: Iterable[Step], rank: int, topology: Topology) -> Phase:
    """Record on each communication step the topology level it crosses."""
    out: list[Step] = []
    for step in steps:
        if isinstance(step, (Send, Recv)):
            src, dst = (rank, step.peer) if isinstance(step, Send) else (step.peer, rank)
            step = replace(step, level=topology.level(src, dst))
        elif isinstance(step, Native):
            step = replace(step, level=_group_level(step.group, topology))
        out.append(step)
    return tuple(out)


def _group_level(group: tuple[int, ...], topology: Topology) -> Level:
    """The widest level a group spans: inter (on the first member's rail) if it crosses nodes."""
    nodes = {topology.node_of[r] for r in group}
    if len(group) <= 1:
        return Level("self")
    if len(nodes) == 1:
        return Level("intra")
    rails = {topology.rail_of(r) for r in group}
    return Level("inter", rails.pop() if len(rails) == 1 else None)
