"""Numpy references for every collective, random test data, and result comparison.

The references compute in float64 (or int64) from the same `CollectiveSpec` the
generators read; `compare` knows how far each dtype's rounding may legitimately move a
reduction (exact for integers, min and max; a summation-error bound for the rest).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .collectives import CollectiveSpec
from .ops import DTYPES, dtype_info

EPS = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-24, "float64": 2.0**-53}


def numpy_dtype(name: str) -> np.dtype:
    """Storage dtype in numpy; bfloat16 is emulated in float32 (see `round_to_dtype`)."""
    dtype_info(name)
    return np.dtype("float32" if name == "bfloat16" else name)


def round_to_dtype(values: np.ndarray, name: str) -> np.ndarray:
    """Round float32 values to bfloat16 precision (nearest even); identity otherwise."""
    if name != "bfloat16":
        return values
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    bias = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    return ((bits + bias) & np.uint32(0xFFFF0000)).view(np.float32)


def random_inputs(spec: CollectiveSpec, dtype: str, seed: int = 0) -> list[np.ndarray]:
    """One random input per rank, never all zero, scaled so no dtype overflows."""
    rng = np.random.default_rng(seed)
    info = DTYPES[dtype]
    out = []
    for rank in range(spec.world_size):
        n = spec.input_count(rank)
        if info.is_float:
            if spec.op == "prod":
                sign = rng.choice([-1.0, 1.0], size=n)
                values = sign * rng.uniform(0.9, 1.1, size=n)
            else:
                values = rng.uniform(-1.0, 1.0, size=n)
            values = round_to_dtype(values.astype(numpy_dtype(dtype)), dtype)
        elif spec.op == "prod":
            values = rng.choice([-2, -1, 1, 2], size=n)
        else:
            values = rng.integers(-1000, 1000, size=n)
        out.append(np.asarray(values).astype(numpy_dtype(dtype)))
    return out


_NP_OPS = {"sum": np.add, "prod": np.multiply, "min": np.minimum, "max": np.maximum,
           "avg": np.add}


def _reduce_all(arrays: list[np.ndarray], op: str) -> np.ndarray:
    wide = [a.astype(np.float64 if a.dtype.kind == "f" else np.int64) for a in arrays]
    result = wide[0].copy()
    for a in wide[1:]:
        result = _NP_OPS[op](result, a)
    if op == "avg":
        result = result / len(arrays)
    return result


def reference(spec: CollectiveSpec, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """Expected output of every rank, in float64/int64."""
    p, c = spec.world_size, spec.collective
    if c == "all_reduce":
        full = _reduce_all(inputs, spec.op)
        return [full.copy() for _ in range(p)]
    if c == "reduce_scatter":
        full = _reduce_all(inputs, spec.op)
        offsets = np.cumsum([0, *spec.counts])
        return [full[offsets[r]:offsets[r + 1]] for r in range(p)]
    if c == "all_gather":
        return [np.concatenate([a.astype(np.float64 if a.dtype.kind == "f" else np.int64)
                                for a in inputs]) for _ in range(p)]
    if c == "broadcast":
        return [inputs[spec.root].copy() for _ in range(p)]
    outs = []
    for dst in range(p):
        parts = []
        for src in range(p):
            start = spec.send_displs(src)[dst]
            parts.append(inputs[src][start:start + spec.matrix[src][dst]])
        outs.append(np.concatenate(parts) if parts else np.zeros(0, inputs[0].dtype))
    return outs


def abs_bound(spec: CollectiveSpec, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """Per output element, the sum of |inputs| reduced into it (for error bounds)."""
    if spec.collective not in ("all_reduce", "reduce_scatter"):
        return [np.zeros(spec.output_count(r)) for r in range(spec.world_size)]
    mags = [np.abs(a.astype(np.float64)) for a in inputs]
    abs_spec = CollectiveSpec(spec.collective, spec.world_size, count=spec.count,
                              counts=spec.counts, op="sum")
    return reference(abs_spec, mags)


@dataclass(frozen=True)
class Mismatch:
    wrong: int
    first_index: int | None
    max_error: float


def compare(actual: np.ndarray, expected: np.ndarray, bound: np.ndarray, dtype: str,
            op: str, world_size: int) -> Mismatch:
    """Count elements outside the tolerance the dtype and op allow."""
    if actual.shape != expected.shape:
        return Mismatch(max(actual.size, expected.size), 0, float("inf"))
    if actual.size == 0:
        return Mismatch(0, None, 0.0)
    if not DTYPES[dtype].is_float or op in ("min", "max"):
        bad = actual.astype(expected.dtype) != expected
        err = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    else:
        eps = EPS[dtype]
        got = actual.astype(np.float64)
        err = np.abs(got - expected)
        if op == "prod":
            tol = 2.0 * world_size * eps * np.abs(expected)
        else:
            scale = bound / world_size if op == "avg" else bound
            tol = 2.0 * world_size * eps * scale + eps * np.abs(expected)
        tol = tol + np.finfo(np.float64).tiny
        if dtype == "float16":
            tol = tol + 2.0**-24 * world_size  # float16 subnormal spacing
        bad = err > tol
    wrong = int(np.count_nonzero(bad))
    first = int(np.argmax(bad)) if wrong else None
    return Mismatch(wrong, first, float(err.max()))
