"""Reduction operators and element types that topocoll supports, decided in one place."""

from __future__ import annotations

from dataclasses import dataclass

REDUCE_OPS = ("sum", "prod", "min", "max", "avg")
"""`avg` is lowered to `sum` followed by a `Scale` step by the algorithm generators."""

ELEMENTWISE_OPS = ("sum", "prod", "min", "max")


@dataclass(frozen=True)
class DType:
    name: str
    itemsize: int
    is_float: bool


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("float16", 2, True),
        DType("bfloat16", 2, True),
        DType("float32", 4, True),
        DType("float64", 8, True),
        DType("int32", 4, False),
        DType("int64", 8, False),
    )
}


class UnsupportedOpError(ValueError):
    """An operator/dtype pair topocoll refuses (before touching any data)."""


def dtype_info(name: str) -> DType:
    try:
        return DTYPES[name]
    except KeyError:
        raise UnsupportedOpError(
            f"unsupported dtype {name!r}; supported: {', '.join(DTYPES)}"
        ) from None


def check_op(op: str, dtype: str | None = None) -> None:
    """Raise `UnsupportedOpError` for an unknown op or an op the dtype cannot take."""
    info = dtype_info(dtype) if dtype is not None else None
    if op not in REDUCE_OPS:
        raise UnsupportedOpError(
            f"unsupported reduce op {op!r}; supported: {', '.join(REDUCE_OPS)}")
    if info is not None and op == "avg" and not info.is_float:
        raise UnsupportedOpError(
            f"op 'avg' is not defined for integer dtype {dtype!r} (it would truncate); "
            "use 'sum' and divide"
        )
