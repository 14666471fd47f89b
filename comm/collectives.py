"""What each collective means: its buffers per rank and its input/output layout.

A `CollectiveSpec` is everything a generator needs besides the topology: the collective,
the element counts (a full per-pair matrix for all-to-all-v), the reduce op and the root.
The verifier and numpy references read the same spec, so the two can never disagree on
where a rank's input lives or where its result must land.

Buffer names: all_reduce and broadcast work in place on `data`; all_to_all(_v),
reduce_scatter and all_gather read `in` and write `out` and must leave `in` unchanged.
Scratch space, where an algorithm needs it, is the buffer `tmp`.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .ops import check_op

COLLECTIVES = ("all_reduce", "all_to_all", "all_to_all_v", "reduce_scatter", "all_gather",
               "broadcast")
REDUCING = ("all_reduce", "reduce_scatter")


class SpecError(ValueError):
    """A collective description that cannot be satisfied (bad counts, op, root...)."""


@dataclass(frozen=True)
class CollectiveSpec:
    """One collective call, as every rank agrees on it.

    - all_reduce / broadcast: `count` elements per rank;
    - reduce_scatter: `counts[i]` elements end on rank i (input holds sum(counts));
    - all_gather: rank i contributes `counts[i]` (output holds sum(counts));
    - all_to_all_v: `matrix[i][j]` elements go from rank i to rank j;
    - all_to_all: `count` elements per peer (stored as a uniform matrix).
    """

    collective: str
    world_size: int
    count: int = 0
    counts: tuple[int, ...] = ()
    matrix: tuple[tuple[int, ...], ...] = ()
    op: str = "sum"
    root: int = 0

    def __post_init__(self) -> None:
        if self.collective not in COLLECTIVES:
            raise SpecError(f"unknown collective {self.collective!r}; "
                            f"known: {', '.join(COLLECTIVES)}")
        p = self.world_size
        if p < 1:
            raise SpecError(f"{self.collective}: world size must be >= 1, got {p}")
        if self.count < 0:
            raise SpecError(f"{self.collective}: negative count {self.count}")
        if self.collective in REDUCING:
            check_op(self.op)
        if self.collective in ("reduce_scatter", "all_gather"):
            if len(self.counts) != p:
                raise SpecError(f"{self.collective}: need {p} counts, got {len(self.counts)}")
            if any(c < 0 for c in self.counts):
                raise SpecError(f"{self.collective}: negative count in {list(self.counts)}")
        if self.collective in ("all_to_all", "all_to_all_v"):
            if len(self.matrix) != p or any(len(row) != p for row in self.matrix):
                raise SpecError(f"{self.collective}: need a {p}x{p} count matrix")
            if any(c < 0 for row in self.matrix for c in row):
                raise SpecError(f"{self.collective}: negative split size in the count matrix")
        if self.collective == "broadcast" and not 0 <= self.root < p:
            raise SpecError(f"broadcast: root {self.root} outside 0..{p - 1}")

    # ----- constructors -------------------------------------------------------------
    @classmethod
    def all_reduce(cls, world_size: int, count: int, op: str = "sum") -> CollectiveSpec:
        return cls("all_reduce", world_size, count=count, op=op)

    @classmethod
    def broadcast(cls, world_size: int, count: int, root: int = 0) -> CollectiveSpec:
        return cls("broadcast", world_size, count=count, root=root)

    @classmethod
    def reduce_scatter(cls, world_size: int, counts: Sequence[int] | int,
                       op: str = "sum") -> CollectiveSpec:
        return cls("reduce_scatter", world_size, counts=_per_rank(counts, world_size), op=op)

    @classmethod
    def all_gather(cls, world_size: int, counts: Sequence[int] | int) -> CollectiveSpec:
        return cls("all_gather", world_size, counts=_per_rank(counts, world_size))

    @classmethod
    def all_to_all(cls, world_size: int, count_per_peer: int) -> CollectiveSpec:
        row = (count_per_peer,) * world_size
        return cls("all_to_all", world_size, count=count_per_peer, matrix=(row,) * world_size)

    @classmethod
    def all_to_all_v(cls, matrix: Sequence[Sequence[int]]) -> CollectiveSpec:
        return cls("all_to_all_v", len(matrix), matrix=tuple(tuple(int(c) for c in row)
                                                            for row in matrix))

    # ----- buffer layout ------------------------------------------------------------
    @property
    def in_place(self) -> bool:
        return self.collective in ("all_reduce", "broadcast")

    def input_count(self, rank: int) -> int:
        c = self.collective
        if c in ("all_reduce", "broadcast"):
            return self.count
        if c == "reduce_scatter":
            return sum(self.counts)
        if c == "all_gather":
            return self.counts[rank]
        return sum(self.matrix[rank])

    def output_count(self, rank: int) -> int:
        c = self.collective
        if c in ("all_reduce", "broadcast"):
            return self.count
        if c == "reduce_scatter":
            return self.counts[rank]
        if c == "all_gather":
            return sum(self.counts)
        return sum(row[rank] for row in self.matrix)

    def user_buffers(self, rank: int) -> dict[str, int]:
        if self.in_place:
            return {"data": self.count}
        return {"in": self.input_count(rank), "out": self.output_count(rank)}

    @property
    def input_buffer(self) -> str:
        return "data" if self.in_place else "in"

    @property
    def output_buffer(self) -> str:
        return "data" if self.in_place else "out"

    def send_displs(self, rank: int) -> list[int]:
        """all-to-all(-v): offset in rank's `in` of the block for each destination."""
        return _prefix(self.matrix[rank])

    def recv_displs(self, rank: int) -> list[int]:
        """all-to-all(-v): offset in rank's `out` of the block from each source."""
        return _prefix([row[rank] for row in self.matrix])

    def total_elements(self) -> int:
        """The elements a rank's user buffer holds (max over ranks), for sizing sweeps."""
        return max(max(self.input_count(r), self.output_count(r)) for r in range(self.world_size))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"collective": self.collective, "world_size": self.world_size}
        if self.collective in ("all_reduce", "broadcast", "all_to_all"):
            out["count"] = self.count
        if self.counts:
            out["counts"] = list(self.counts)
        if self.collective == "all_to_all_v":
            out["matrix"] = [list(r) for r in self.matrix]
        if self.collective in REDUCING:
            out["op"] = self.op
        if self.collective == "broadcast":
            out["root"] = self.root
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CollectiveSpec:
        c, p = data["collective"], int(data["world_size"])
        if c == "all_to_all":
            return cls.all_to_all(p, int(data["count"]))
        matrix = tuple(tuple(r) for r in data.get("matrix", ()))
        return cls(c, p, count=int(data.get("count", 0)), counts=tuple(data.get("counts", ())),
                   matrix=matrix, op=data.get("op", "sum"), root=int(data.get("root", 0)))


def _per_rank(counts: Sequence[int] | int, world_size: int) -> tuple[int, ...]:
    if isinstance(counts, numbers.Integral):
        return (int(counts),) * world_size
    return tuple(int(c) for c in counts)


def _prefix(values: Sequence[int]) -> list[int]:
    out, total = [], 0
    for v in values:
        out.append(total)
        total += v
    return out


def split_evenly(total: int, parts: int) -> list[int]:
    """`total` elements in `parts` blocks, the first `total % parts` one larger."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]
