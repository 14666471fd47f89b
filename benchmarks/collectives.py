"""One registry entry per collective: byte accounting, test data, expected result, bus factor.

The harness knows nothing collective-specific; everything it needs is here (as in
nccl-tests, whose bus-bandwidth factors we use so numbers compare). Test data are small
integers stored in the tested dtype, so sums, products, minima and maxima are exact in
every dtype at our rank counts and `#wrong` can demand equality; only `avg` rounds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

TORCH_DTYPE = {
    "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
    "float64": torch.float64, "int32": torch.int32, "int64": torch.int64,
}


def pattern(rank: int, count: int, op: str, seed: int = 0) -> torch.Tensor:
    """Deterministic, rank-dependent, non-constant small integers (as int64)."""
    i = torch.arange(count, dtype=torch.int64)
    mixed = (i * 7 + rank * 13 + seed * 5 + (i // 3) * rank) % 9
    if op == "prod":
        return torch.tensor([-1, 1, 2, 1, -1, 1, 1, -2, 1], dtype=torch.int64)[mixed]
    return mixed - 4


def uneven_splits(world_size: int, rank: int, elements: int) -> list[int]:
    """MoE-like skewed split sizes of `elements` for one sender (some zero), deterministic."""
    weights = [0 if (rank + j) % 5 == 4 else 1 + (rank * 7 + j * 3) % 4
               for j in range(world_size)]
    if not any(weights):
        weights[0] = 1
    total = sum(weights)
    splits = [elements * w // total for w in weights]
    splits[max(range(world_size), key=lambda j: weights[j])] += elements - sum(splits)
    return splits


@dataclass
class Case:
    """Tensors for one rank at one size, and how to run and check them."""

    inputs: list[torch.Tensor]           # pristine copies
    work: list[torch.Tensor]             # what the collective reads/writes
    expected: Callable[[], torch.Tensor]  # lazy: only computed with --check
    result: Callable[[], torch.Tensor]   # the tensor to compare after the call
    reset: Callable[[], None]            # restore `work` from `inputs`
    count: int                           # elements (nccl-tests "count")
    extra: dict


@dataclass(frozen=True)
class Entry:
    name: str
    bus_factor: Callable[[int], float]
    make: Callable[[int, int, int, str, str], Case]  # (bytes, rank, world, dtype, op)
    reduces: bool


def _all_reduce(nbytes: int, rank: int, world: int, dtype: str, op: str) -> Case:
    t = TORCH_DTYPE[dtype]
    count = max(nbytes // t.itemsize, 1)
    data = pattern(rank, count, op).to(t)
    work = data.clone()
    def expected() -> torch.Tensor:
        return _reduce([pattern(r, count, op) for r in range(world)], op, world, t)

    return Case([data], [work], expected, lambda: work, lambda: work.copy_(data), count, {})


def _reduce(parts: list[torch.Tensor], op: str, world: int, t: torch.dtype) -> torch.Tensor:
    acc = parts[0].clone()
    for part in parts[1:]:
        if op in ("sum", "avg"):
            acc += part
        elif op == "prod":
            acc *= part
        elif op == "min":
            acc = torch.minimum(acc, part)
        else:
            acc = torch.maximum(acc, part)
    if op == "avg":
        return (acc.to(torch.float64) / world).to(t)
    return acc.to(t)


def _reduce_scatter(nbytes: int, rank: int, world: int, dtype: str, op: str) -> Case:
    t = TORCH_DTYPE[dtype]
    per = max(nbytes // t.itemsize // world, 1)
    data = pattern(rank, per * world, op).to(t)
    out = torch.empty(per, dtype=t)

    def expected() -> torch.Tensor:
        full = _reduce([pattern(r, per * world, op) for r in range(world)], op, world, t)
        return full[rank * per:(rank + 1) * per].clone()

    return Case([data], [out, data.clone()], expected, lambda: out, lambda: None, per * world,
                {})


def _all_gather(nbytes: int, rank: int, world: int, dtype: str, op: str) -> Case:
    t = TORCH_DTYPE[dtype]
    per = max(nbytes // t.itemsize // world, 1)
    data = pattern(rank, per, "sum", seed=1).to(t)
    out = torch.empty(per * world, dtype=t)

    def expected() -> torch.Tensor:
        return torch.cat([pattern(r, per, "sum", seed=1) for r in range(world)]).to(t)

    return Case([data], [out, data], expected, lambda: out, lambda: None, per * world, {})


def _all_to_all(nbytes: int, rank: int, world: int, dtype: str, op: str,
                uneven: bool = False) -> Case:
    t = TORCH_DTYPE[dtype]
    elements = max(nbytes // t.itemsize // world, 1) * world
    rows = [uneven_splits(world, r, elements) if uneven else [elements // world] * world
            for r in range(world)]
    send = rows[rank]
    recv = [rows[src][rank] for src in range(world)]
    data = pattern(rank, elements, "sum", seed=2).to(t)
    out = torch.empty(sum(recv), dtype=t)

    def expected() -> torch.Tensor:
        parts = []
        for src in range(world):
            start = sum(rows[src][:rank])
            parts.append(pattern(src, elements, "sum", seed=2)[start:start + rows[src][rank]])
        return torch.cat(parts).to(t)

    extra = {"in_splits": send, "out_splits": recv}
    return Case([data], [out, data], expected, lambda: out, lambda: None, elements, extra)


def _ring_factor(n: int) -> float:
    return 2 * (n - 1) / n if n else 0.0


def _spread_factor(n: int) -> float:
    return (n - 1) / n if n else 0.0


ENTRIES: dict[str, Entry] = {
    "all_reduce": Entry("all_reduce", _ring_factor, _all_reduce, True),
    "reduce_scatter": Entry("reduce_scatter", _spread_factor, _reduce_scatter, True),
    "all_gather": Entry("all_gather", _spread_factor, _all_gather, False),
    "all_to_all": Entry("all_to_all", _spread_factor, _all_to_all, False),
    "all_to_all_v": Entry("all_to_all_v", _spread_factor,
                          lambda b, r, w, d, o: _all_to_all(b, r, w, d, o, uneven=True), False),
}


def count_wrong(actual: torch.Tensor, expected: torch.Tensor, dtype: str, op: str) -> int:
    """Mismatching elements: exact, except avg (one rounding of a division)."""
    if actual.shape != expected.shape:
        return max(actual.numel(), expected.numel())
    if op == "avg":
        a, e = actual.to(torch.float64), expected.to(torch.float64)
        tol = {"float16": 2e-3, "bfloat16": 1.6e-2}.get(dtype, 1e-6) * (1 + e.abs())
        return int(((a - e).abs() > tol).sum())
    return int((actual != expected).sum())
