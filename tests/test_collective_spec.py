"""CollectiveSpec: validation, buffer sizes, displacements and its dict form; ops and dtypes."""

from __future__ import annotations

import numpy as np
import pytest

from topocoll.comm.collectives import (
    COLLECTIVES,
    REDUCING,
    CollectiveSpec,
    SpecError,
    split_evenly,
)
from topocoll.comm.ops import (
    DTYPES,
    ELEMENTWISE_OPS,
    REDUCE_OPS,
    UnsupportedOpError,
    check_op,
    dtype_info,
)


# ----- validation ---------------------------------------------------------------------
@pytest.mark.parametrize(("build", "message"), [
    (lambda: CollectiveSpec("gather", 2), "unknown collective 'gather'"),
    (lambda: CollectiveSpec.all_reduce(0, 4), "world size must be >= 1, got 0"),
    (lambda: CollectiveSpec.all_to_all_v([]), "world size must be >= 1, got 0"),
    (lambda: CollectiveSpec.all_reduce(2, -1), "all_reduce: negative count -1"),
    (lambda: CollectiveSpec.broadcast(2, -5), "broadcast: negative count -5"),
    (lambda: CollectiveSpec.all_to_all(3, -1), "all_to_all: negative count -1"),
    (lambda: CollectiveSpec.reduce_scatter(3, [1, -1, 2]),
     r"reduce_scatter: negative count in \[1, -1, 2\]"),
    (lambda: CollectiveSpec.all_gather(2, [-3, 0]), r"all_gather: negative count in \[-3, 0\]"),
    (lambda: CollectiveSpec.reduce_scatter(2, -1), "negative count in"),
    (lambda: CollectiveSpec.reduce_scatter(3, [1, 2]), "reduce_scatter: need 3 counts, got 2"),
    (lambda: CollectiveSpec.all_gather(2, [1, 2, 3]), "all_gather: need 2 counts, got 3"),
    (lambda: CollectiveSpec("all_gather", 2), "all_gather: need 2 counts, got 0"),
    (lambda: CollectiveSpec.all_to_all_v([[1, 2], [3]]), "all_to_all_v: need a 2x2 count matrix"),
    (lambda: CollectiveSpec.all_to_all_v([[1, 2, 3], [1, 2, 3]]), "need a 2x2 count matrix"),
    (lambda: CollectiveSpec("all_to_all_v", 3, matrix=((1, 1, 1),) * 2),
     "need a 3x3 count matrix"),
    (lambda: CollectiveSpec("all_to_all", 2, count=3), "all_to_all: need a 2x2 count matrix"),
    (lambda: CollectiveSpec.all_to_all_v([[0, 1], [-2, 0]]),
     "all_to_all_v: negative split size in the count matrix"),
    (lambda: CollectiveSpec.broadcast(3, 4, root=3), r"broadcast: root 3 outside 0..2"),
    (lambda: CollectiveSpec.broadcast(3, 4, root=-1), r"broadcast: root -1 outside 0..2"),
    (lambda: CollectiveSpec.broadcast(1, 4, root=1), r"broadcast: root 1 outside 0..0"),
])
def test_spec_errors(build, message):
    with pytest.raises(SpecError, match=message):
        build()


def test_spec_error_is_a_value_error():
    assert issubclass(SpecError, ValueError)
    assert issubclass(UnsupportedOpError, ValueError)


@pytest.mark.parametrize("collective", REDUCING)
@pytest.mark.parametrize("op", ["bogus", "SUM", "mean", ""])
def test_bad_op_is_refused_for_reducing_collectives(collective, op):
    with pytest.raises(UnsupportedOpError, match=f"unsupported reduce op {op!r}"):
        if collective == "all_reduce":
            CollectiveSpec.all_reduce(2, 4, op)
        else:
            CollectiveSpec.reduce_scatter(2, 4, op)


@pytest.mark.parametrize("op", REDUCE_OPS)
def test_every_op_builds_a_reducing_spec(op):
    assert CollectiveSpec.all_reduce(3, 5, op).op == op
    assert CollectiveSpec.reduce_scatter(3, [1, 2, 3], op).op == op


def test_root_is_only_checked_for_broadcast():
    # the other collectives have no root: the field is ignored, not validated
    assert CollectiveSpec("all_reduce", 2, count=1, root=7).root == 7


def test_edge_sizes_are_valid():
    CollectiveSpec.all_reduce(1, 0)
    CollectiveSpec.broadcast(1, 0, root=0)
    CollectiveSpec.all_to_all(5, 0)
    CollectiveSpec.all_to_all_v([[0]])
    CollectiveSpec.reduce_scatter(4, 0)
    CollectiveSpec.all_gather(3, [0, 0, 0])


def test_numpy_integer_counts_are_accepted():
    spec = CollectiveSpec.reduce_scatter(4, np.int64(3))
    assert spec.counts == (3, 3, 3, 3)


def test_numpy_integer_sequences_are_accepted():
    spec = CollectiveSpec.all_gather(3, np.array([1, 2, 3]))
    assert spec.counts == (1, 2, 3)
    assert all(type(c) is int for c in spec.counts)
    v = CollectiveSpec.all_to_all_v(np.arange(4).reshape(2, 2))
    assert v.matrix == ((0, 1), (2, 3))
    assert all(type(c) is int for row in v.matrix for c in row)


# ----- ops and dtypes -----------------------------------------------------------------
@pytest.mark.parametrize("dtype", [d for d in DTYPES if not DTYPES[d].is_float])
def test_avg_on_integers_is_refused(dtype):
    with pytest.raises(UnsupportedOpError, match=f"'avg' is not defined for integer dtype "
                                                 f"{dtype!r}"):
        check_op("avg", dtype)


@pytest.mark.parametrize(("op", "dtype"), [(op, d) for op in REDUCE_OPS for d in DTYPES
                                           if op != "avg" or DTYPES[d].is_float])
def test_check_op_accepts_the_supported_matrix(op, dtype):
    check_op(op, dtype)
    check_op(op)


def test_check_op_rejects_unknown_ops_and_dtypes():
    with pytest.raises(UnsupportedOpError, match="unsupported reduce op 'xor'"):
        check_op("xor", "int32")
    with pytest.raises(UnsupportedOpError, match="unsupported dtype 'int8'"):
        check_op("avg", "int8")
    with pytest.raises(UnsupportedOpError, match="unsupported dtype 'complex64'"):
        dtype_info("complex64")


def test_dtype_table():
    assert list(DTYPES) == ["float16", "bfloat16", "float32", "float64", "int32", "int64"]
    sizes = {name: d.itemsize for name, d in DTYPES.items()}
    assert sizes == {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "int32": 4,
                     "int64": 8}
    assert [n for n, d in DTYPES.items() if d.is_float] == ["float16", "bfloat16", "float32",
                                                            "float64"]
    assert set(ELEMENTWISE_OPS) == set(REDUCE_OPS) - {"avg"}


# ----- buffers and displacements ------------------------------------------------------
def test_all_reduce_buffers():
    spec = CollectiveSpec.all_reduce(3, 7)
    assert spec.in_place
    assert spec.input_buffer == spec.output_buffer == "data"
    for rank in range(3):
        assert spec.user_buffers(rank) == {"data": 7}
        assert spec.input_count(rank) == spec.output_count(rank) == 7
    assert spec.total_elements() == 7


def test_broadcast_buffers():
    spec = CollectiveSpec.broadcast(4, 9, root=3)
    assert spec.in_place
    assert spec.user_buffers(0) == {"data": 9}
    assert spec.root == 3


def test_reduce_scatter_buffers():
    spec = CollectiveSpec.reduce_scatter(3, [2, 0, 5])
    assert not spec.in_place
    assert (spec.input_buffer, spec.output_buffer) == ("in", "out")
    assert [spec.user_buffers(r) for r in range(3)] == [
        {"in": 7, "out": 2}, {"in": 7, "out": 0}, {"in": 7, "out": 5}]
    assert spec.total_elements() == 7
    assert CollectiveSpec.reduce_scatter(4, 3).counts == (3, 3, 3, 3)


def test_all_gather_buffers():
    spec = CollectiveSpec.all_gather(3, [4, 1, 0])
    assert [spec.user_buffers(r) for r in range(3)] == [
        {"in": 4, "out": 5}, {"in": 1, "out": 5}, {"in": 0, "out": 5}]
    assert spec.total_elements() == 5


def test_all_to_all_is_a_uniform_matrix():
    spec = CollectiveSpec.all_to_all(3, 4)
    assert spec.count == 4
    assert spec.matrix == ((4, 4, 4),) * 3
    for rank in range(3):
        assert spec.user_buffers(rank) == {"in": 12, "out": 12}
        assert spec.send_displs(rank) == [0, 4, 8]
        assert spec.recv_displs(rank) == [0, 4, 8]


def test_all_to_all_v_buffers_and_displacements():
    matrix = [[1, 0, 2],
              [3, 4, 0],
              [0, 0, 0]]  # rank 2 sends nothing at all
    spec = CollectiveSpec.all_to_all_v(matrix)
    assert spec.world_size == 3
    assert [spec.input_count(r) for r in range(3)] == [3, 7, 0]
    assert [spec.output_count(r) for r in range(3)] == [4, 4, 2]
    assert spec.send_displs(0) == [0, 1, 1]
    assert spec.send_displs(1) == [0, 3, 7]
    assert spec.send_displs(2) == [0, 0, 0]
    assert spec.recv_displs(0) == [0, 1, 4]  # column 0 is 1, 3, 0
    assert spec.recv_displs(1) == [0, 0, 4]
    assert spec.recv_displs(2) == [0, 2, 2]
    assert spec.total_elements() == 7
    assert spec.user_buffers(2) == {"in": 0, "out": 2}


def test_displacements_partition_the_buffers():
    rng = np.random.default_rng(4)
    matrix = rng.integers(0, 9, (6, 6))
    matrix[2, :] = 0
    spec = CollectiveSpec.all_to_all_v(matrix.tolist())
    for rank in range(6):
        send, recv = spec.send_displs(rank), spec.recv_displs(rank)
        row, col = matrix[rank], matrix[:, rank]
        assert send == list(np.concatenate([[0], np.cumsum(row)[:-1]]))
        assert recv == list(np.concatenate([[0], np.cumsum(col)[:-1]]))
        assert send[-1] + row[-1] == spec.input_count(rank)
        assert recv[-1] + col[-1] == spec.output_count(rank)


@pytest.mark.parametrize(("total", "parts", "expected"), [
    (10, 3, [4, 3, 3]), (2, 4, [1, 1, 0, 0]), (0, 3, [0, 0, 0]), (9, 3, [3, 3, 3]),
    (7, 1, [7]),
])
def test_split_evenly(total, parts, expected):
    assert split_evenly(total, parts) == expected
    assert sum(expected) == total


# ----- dict form ----------------------------------------------------------------------
ROUND_TRIP = [
    CollectiveSpec.all_reduce(4, 13, "avg"),
    CollectiveSpec.all_reduce(1, 0),
    CollectiveSpec.broadcast(5, 9, root=4),
    CollectiveSpec.reduce_scatter(3, [2, 0, 5], "max"),
    CollectiveSpec.all_gather(2, [3, 1]),
    CollectiveSpec.all_to_all(3, 6),
    CollectiveSpec.all_to_all_v([[1, 0], [2, 3]]),
]


@pytest.mark.parametrize("spec", ROUND_TRIP, ids=lambda s: s.collective)
def test_to_dict_from_dict_round_trip(spec):
    data = spec.to_dict()
    assert data["collective"] == spec.collective
    assert data["world_size"] == spec.world_size
    assert CollectiveSpec.from_dict(data) == spec


def test_to_dict_keeps_only_what_the_collective_uses():
    assert CollectiveSpec.all_reduce(2, 3, "min").to_dict() == {
        "collective": "all_reduce", "world_size": 2, "count": 3, "op": "min"}
    assert CollectiveSpec.broadcast(2, 3, root=1).to_dict() == {
        "collective": "broadcast", "world_size": 2, "count": 3, "root": 1}
    assert CollectiveSpec.all_gather(2, [1, 2]).to_dict() == {
        "collective": "all_gather", "world_size": 2, "counts": [1, 2]}
    assert CollectiveSpec.all_to_all(2, 5).to_dict() == {
        "collective": "all_to_all", "world_size": 2, "count": 5}
    assert CollectiveSpec.all_to_all_v([[1, 2], [3, 4]]).to_dict() == {
        "collective": "all_to_all_v", "world_size": 2, "matrix": [[1, 2], [3, 4]]}


def test_every_collective_is_covered():
    assert {s.collective for s in ROUND_TRIP} == set(COLLECTIVES)
