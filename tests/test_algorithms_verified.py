"""The verifier proves every registered algorithm of every collective correct.

Each case builds a real schedule from the registry, runs every rank's program in the
verifier on random (never all-zero) data and compares with the numpy reference.
`verify()` raises on any problem, so a passing call is the main assertion; the report is
checked too (messages only when data must move, at least the data that must move).

Every failure names the algorithm, collective, world size, layout, rails, count, dtype,
op and seed, so a red case can be replayed by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from topocoll.comm.algorithms import algorithm_names, build_schedule
from topocoll.comm.algorithms.hierarchical import INTER_CHOICES, INTRA_CHOICES
from topocoll.comm.collectives import COLLECTIVES, REDUCING, CollectiveSpec
from topocoll.comm.ops import DTYPES, REDUCE_OPS, UnsupportedOpError
from topocoll.comm.schedule import Native, Schedule
from topocoll.comm.verifier import VerificationError, VerifyReport, verify
from topocoll.topology import Topology

# ----- the matrix ---------------------------------------------------------------------
ALGORITHMS = [(c, name) for c in COLLECTIVES for name in algorithm_names(c)]
REDUCING_ALGORITHMS = [(c, n) for c, n in ALGORITHMS if c in REDUCING]
A2A_ALGORITHMS = [(c, n) for c, n in ALGORITHMS if c in ("all_to_all", "all_to_all_v")]

DTYPE_NAMES = tuple(DTYPES)  # float16, bfloat16, float32, float64, int32, int64
DTYPE_OPS = [(d, op) for d in DTYPE_NAMES for op in REDUCE_OPS
             if op != "avg" or DTYPES[d].is_float]

# A "layout" is a tuple of ranks per node (consecutive ranks) or a string of one host
# letter per rank (non-contiguous nodes, e.g. "abab").
Layout = tuple[int, ...] | str

LAYOUTS: list[Layout] = [
    (1,), (2,), (3,), (5,), (7,), (12,), (16,),
    (2, 2), (2, 3), (3, 5), (1, 4), (4, 4), (6, 6), (8, 8), (5, 7),
    (3, 3, 6), (2, 2, 2), (4, 4, 4), (1, 1, 1, 1, 1),
]
# rails=2 on some multi-node shapes, and nodes whose ranks are not consecutive.
TOPOLOGIES: list[tuple[Layout, int]] = [
    *[(layout, 1) for layout in LAYOUTS],
    *[(layout, 2) for layout in [(2, 2), (3, 5), (4, 4), (3, 3, 6), (8, 8), (5, 7)]],
    ("abab", 1), ("aabba", 2), ("abcabc", 1),
]
COUNTS = (0, 1, 7, 13, 101, 1009)
LARGE = 65537
SEEDS = (0, 1, 2)


def make_topology(layout: Layout, rails: int = 1) -> Topology:
    if isinstance(layout, str):
        return Topology.from_hosts(list(layout), rails=rails)
    return Topology.from_layout(layout, rails=rails)


def layout_id(layout: Layout, rails: int = 1) -> str:
    text = f"hosts={layout}" if isinstance(layout, str) else "+".join(map(str, layout))
    return text if rails == 1 else f"{text}:rails={rails}"


# ----- building specs -----------------------------------------------------------------
def make_spec(collective: str, world_size: int, count: int, rng: np.random.Generator,
              op: str = "sum", even: bool = False) -> CollectiveSpec:
    """The spec of one call of `collective` with messages of about `count` elements.

    `count` is the per-rank vector (all_reduce, broadcast), the per-rank block
    (reduce_scatter, all_gather) or the per-peer split (all-to-all). Unless `even`, block
    sizes and split sizes are drawn from `rng` in 0..2*count, with one zero-length block
    and (all-to-all-v) one rank that sends nothing at all; broadcast draws its root.
    """
    p = world_size
    if collective == "all_reduce":
        return CollectiveSpec.all_reduce(p, count, op)
    if collective == "broadcast":
        return CollectiveSpec.broadcast(p, count, root=int(rng.integers(p)))
    if collective == "all_to_all":
        return CollectiveSpec.all_to_all(p, count)
    if collective in ("reduce_scatter", "all_gather"):
        counts = [count] * p if even else uneven_counts(p, count, rng)
        if collective == "reduce_scatter":
            return CollectiveSpec.reduce_scatter(p, counts, op)
        return CollectiveSpec.all_gather(p, counts)
    if collective == "all_to_all_v":
        return CollectiveSpec.all_to_all_v(
            [[count] * p] * p if even else random_matrix(p, count, rng))
    raise AssertionError(f"no spec builder for {collective}")


def uneven_counts(p: int, count: int, rng: np.random.Generator) -> list[int]:
    counts = [int(c) for c in rng.integers(0, 2 * count + 1, size=p)]
    if p > 1 and count > 0:
        counts[int(rng.integers(p))] = 0  # a rank with an empty block
        if not any(counts):
            counts[0] = count
    return counts


def random_matrix(p: int, count: int, rng: np.random.Generator,
                  silent: bool = True) -> list[list[int]]:
    """Split sizes in 0..2*count, a quarter of them zero, one rank (if `silent`) mute."""
    m = rng.integers(0, 2 * count + 1, size=(p, p))
    m[rng.random((p, p)) < 0.25] = 0
    if silent and p > 1:
        m[int(rng.integers(p)), :] = 0  # a rank that sends nothing at all
    return m.tolist()


def required_elements(spec: CollectiveSpec) -> int:
    """A lower bound on the elements that must cross between ranks."""
    p = spec.world_size
    if p == 1:
        return 0
    c = spec.collective
    if c == "all_reduce":
        return p * spec.count  # every rank receives at least one value per element
    if c == "reduce_scatter":
        return sum(spec.counts)  # every rank receives at least its own block
    if c == "all_gather":
        total = sum(spec.counts)
        return sum(total - own for own in spec.counts)
    if c == "broadcast":
        return (p - 1) * spec.count
    return sum(spec.matrix[i][j] for i in range(p) for j in range(p) if i != j)


# ----- running one case ---------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    algorithm: str
    collective: str
    layout: Layout
    rails: int = 1
    params: tuple[tuple[str, object], ...] = ()

    def topology(self) -> Topology:
        return make_topology(self.layout, self.rails)

    def describe(self, spec: CollectiveSpec, count: int, dtype: str, seed: int) -> str:
        extra = "".join(f" {k}={v}" for k, v in self.params)
        shape = ""
        if spec.collective in ("reduce_scatter", "all_gather"):
            shape = f" counts={list(spec.counts)}"
        elif spec.collective == "all_to_all_v":
            shape = f" matrix={[list(r) for r in spec.matrix]}"
        elif spec.collective == "broadcast":
            shape = f" root={spec.root}"
        return (f"algorithm={self.algorithm}{extra} collective={self.collective} "
                f"world_size={spec.world_size} layout={layout_id(self.layout, self.rails)} "
                f"count={count} dtype={dtype} op={spec.op} seed={seed}{shape}")


def build(case: Case, spec: CollectiveSpec, ctx: str) -> Schedule:
    try:
        return build_schedule(case.algorithm, case.topology(), spec, **dict(case.params))
    except Exception as exc:  # a generator that cannot build this shape is a failure too
        pytest.fail(f"{ctx}: building the schedule raised {type(exc).__name__}: {exc}")


def check(case: Case, spec: CollectiveSpec, count: int, dtype: str = "float32",
          seed: int = 0) -> tuple[Schedule, VerifyReport]:
    """Build and verify one case; fail with a message that names all of it."""
    ctx = case.describe(spec, count, dtype, seed)
    schedule = build(case, spec, ctx)
    assert schedule.world_size == spec.world_size, ctx
    assert schedule.algorithm == case.algorithm, ctx
    try:
        report = verify(schedule, dtype, seed=seed)
    except VerificationError as exc:
        pytest.fail(f"{ctx}: {type(exc).__name__}: {exc}")
    assert report.schedule_id == schedule.id, ctx
    assert report.dtype == dtype, ctx
    need = required_elements(spec)
    if need:
        assert report.messages > 0, f"{ctx}: data must move but no message was sent"
    else:
        assert report.messages == 0, (f"{ctx}: nothing to move but {report.messages} "
                                      "message(s) were sent")
    assert report.elements_moved >= need, (f"{ctx}: moved {report.elements_moved} elements, "
                                           f"at least {need} must cross")
    assert np.isfinite(report.max_error) and report.max_error >= 0, ctx
    return schedule, report


def run_seeds(case: Case, count: int, dtype: str = "float32", op: str = "sum",
              seeds: tuple[int, ...] = SEEDS) -> None:
    """Seed 0 with even block sizes, the others with uneven ones drawn from the seed."""
    p = case.topology().world_size
    for seed in seeds:
        rng = np.random.default_rng([seed, p, count])
        spec = make_spec(case.collective, p, count, rng, op=op, even=seed == 0)
        check(case, spec, count, dtype, seed)


# ----- the tests ----------------------------------------------------------------------
def test_registry_covers_every_collective():
    for collective in COLLECTIVES:
        assert algorithm_names(collective), f"no algorithm registered for {collective}"
    assert len(ALGORITHMS) == len(set(ALGORITHMS))


@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize(("layout", "rails"), TOPOLOGIES,
                         ids=[layout_id(lay, r) for lay, r in TOPOLOGIES])
@pytest.mark.parametrize(("collective", "algorithm"), ALGORITHMS,
                         ids=[f"{c}-{n}" for c, n in ALGORITHMS])
def test_algorithm_verified(collective, algorithm, layout, rails, count):
    run_seeds(Case(algorithm, collective, layout, rails), count)


@pytest.mark.parametrize("world_size", range(1, 17))
@pytest.mark.parametrize(("collective", "algorithm"), ALGORITHMS,
                         ids=[f"{c}-{n}" for c, n in ALGORITHMS])
def test_every_world_size(collective, algorithm, world_size):
    """1..16 ranks on one node, on two (uneven) nodes, and on two nodes with 2 rails."""
    half = world_size // 2
    shapes: list[tuple[Layout, int]] = [((world_size,), 1)]
    if half:
        shapes += [((half, world_size - half), 1), ((world_size - half, half), 2)]
    for layout, rails in shapes:
        for count in (0, 1, 13):
            run_seeds(Case(algorithm, collective, layout, rails), count, seeds=(0, 1))


@pytest.mark.parametrize("layout", [(16,), (4, 4), (3, 5), (2, 2, 2), (5, 7)],
                         ids=layout_id)
@pytest.mark.parametrize(("collective", "algorithm"), ALGORITHMS,
                         ids=[f"{c}-{n}" for c, n in ALGORITHMS])
def test_large_message(collective, algorithm, layout):
    """65537 elements per rank (all-reduce, broadcast); about as much per rank otherwise."""
    case = Case(algorithm, collective, layout)
    p = case.topology().world_size
    count = LARGE
    if collective in ("reduce_scatter", "all_gather"):
        count = LARGE // p
    elif collective in ("all_to_all", "all_to_all_v"):
        count = 4099 // p
    dtypes = ("float32", "bfloat16") if collective in REDUCING else ("float32",)
    for dtype in dtypes:
        rng = np.random.default_rng([7, p, count])
        check(case, make_spec(collective, p, count, rng, even=True), count, dtype, seed=7)
        check(case, make_spec(collective, p, count, rng, even=False), count, dtype, seed=8)


@pytest.mark.parametrize(("dtype", "op"), DTYPE_OPS, ids=[f"{d}-{o}" for d, o in DTYPE_OPS])
@pytest.mark.parametrize("layout", [(3, 5), (2, 2, 2), (7,), (1, 4)], ids=layout_id)
@pytest.mark.parametrize(("collective", "algorithm"), REDUCING_ALGORITHMS,
                         ids=[f"{c}-{n}" for c, n in REDUCING_ALGORITHMS])
def test_dtype_op_matrix(collective, algorithm, layout, dtype, op):
    case = Case(algorithm, collective, layout)
    for count in (13, 1009):
        run_seeds(case, count, dtype, op, seeds=(0, 1))


@pytest.mark.parametrize("dtype", [d for d in DTYPE_NAMES if not DTYPES[d].is_float])
@pytest.mark.parametrize(("collective", "algorithm"), REDUCING_ALGORITHMS,
                         ids=[f"{c}-{n}" for c, n in REDUCING_ALGORITHMS])
def test_avg_refused_for_integers(collective, algorithm, dtype):
    spec = make_spec(collective, 4, 8, np.random.default_rng(0), op="avg", even=True)
    schedule = build_schedule(algorithm, Topology.from_layout([2, 2]), spec)
    with pytest.raises(UnsupportedOpError, match="avg"):
        verify(schedule, dtype)


# ----- all-to-all(-v) splits ----------------------------------------------------------
def special_matrices(p: int, rng: np.random.Generator) -> dict[str, list[list[int]]]:
    """Named hard cases: zeros everywhere, one pair, only self, one mute and one deaf rank."""
    out: dict[str, list[list[int]]] = {}
    out["all_zero"] = [[0] * p for _ in range(p)]
    one = np.zeros((p, p), dtype=int)
    one[0, p - 1] = 11
    out["one_pair"] = one.tolist()
    out["diagonal_only"] = np.diag(rng.integers(1, 9, size=p)).tolist()
    m = rng.integers(0, 20, size=(p, p))
    m[rng.random((p, p)) < 0.3] = 0
    if p > 1:
        mute, deaf = int(rng.integers(p)), int(rng.integers(p))
        m[mute, :] = 0  # sends nothing at all
        m[:, deaf] = 0  # receives nothing at all
    out["mute_and_deaf"] = m.tolist()
    skew = np.ones((p, p), dtype=int)
    skew[p - 1, 0] = 997
    out["skewed"] = skew.tolist()
    return out


A2A_LAYOUTS: list[tuple[Layout, int]] = [
    ((1,), 1), ((2,), 1), ((7,), 1), ((2, 3), 1), ((3, 5), 1), ((4, 4), 2), ((1, 4), 1),
    ((3, 3, 6), 1), ((1, 1, 1, 1, 1), 1), ((6, 6), 1), ("abab", 1), ("abcab", 2),
]


@pytest.mark.parametrize(("layout", "rails"), A2A_LAYOUTS,
                         ids=[layout_id(lay, r) for lay, r in A2A_LAYOUTS])
@pytest.mark.parametrize("algorithm", algorithm_names("all_to_all_v"))
def test_all_to_all_v_uneven_splits(algorithm, layout, rails):
    case = Case(algorithm, "all_to_all_v", layout, rails)
    p = case.topology().world_size
    for seed in range(5):
        rng = np.random.default_rng([seed, p])
        for count in (1, 7, 13):
            spec = CollectiveSpec.all_to_all_v(random_matrix(p, count, rng))
            check(case, spec, count, "float32", seed)
        for name, matrix in special_matrices(p, rng).items():
            spec = CollectiveSpec.all_to_all_v(matrix)
            _, report = check(case, spec, max(map(max, matrix)), "int64", seed)
            if name in ("all_zero", "diagonal_only"):
                assert report.messages == 0, f"{case.describe(spec, 0, 'int64', seed)}: {name}"


@pytest.mark.parametrize(("layout", "rails"), A2A_LAYOUTS,
                         ids=[layout_id(lay, r) for lay, r in A2A_LAYOUTS])
@pytest.mark.parametrize("algorithm", algorithm_names("all_to_all"))
def test_all_to_all_even(algorithm, layout, rails):
    case = Case(algorithm, "all_to_all", layout, rails)
    p = case.topology().world_size
    for count in (0, 1, 5, 13, 101):
        for dtype in ("float16", "int32", "float64"):
            check(case, CollectiveSpec.all_to_all(p, count), count, dtype, seed=count)


@pytest.mark.parametrize("layout", [(5,), (3, 5), (2, 2, 2), (8,)], ids=layout_id)
def test_pairwise_window(layout):
    p = make_topology(layout).world_size
    for window in sorted({1, 2, 3, p, p + 4}):
        case = Case("pairwise", "all_to_all_v", layout, params=(("window", window),))
        for seed in range(3):
            rng = np.random.default_rng([seed, p])
            spec = CollectiveSpec.all_to_all_v(random_matrix(p, 9, rng))
            schedule, _ = check(case, spec, 9, "float32", seed)
            assert schedule.params["window"] == window


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(layout=st.lists(st.integers(1, 4), min_size=1, max_size=4),
       data=st.data())
def test_all_to_all_v_property(layout, data):
    """Any layout, any split matrix (zeros included): every all-to-all-v algorithm agrees."""
    p = sum(layout)
    matrix = data.draw(st.lists(st.lists(st.integers(0, 6), min_size=p, max_size=p),
                                min_size=p, max_size=p), label="matrix")
    spec = CollectiveSpec.all_to_all_v(matrix)
    for algorithm in algorithm_names("all_to_all_v"):
        check(Case(algorithm, "all_to_all_v", tuple(layout)), spec, 6, "int32", seed=0)


@pytest.mark.parametrize("world_size", [1, 2, 3, 5, 7, 8, 12])
@pytest.mark.parametrize("algorithm", algorithm_names("broadcast"))
def test_broadcast_every_root(algorithm, world_size):
    case = Case(algorithm, "broadcast", (world_size,))
    for root in range(world_size):
        for count in (1, 13):
            check(case, CollectiveSpec.broadcast(world_size, count, root), count, "int64",
                  seed=root)


# ----- hierarchical inner choices ----------------------------------------------------
HIER_TOPOLOGIES: list[tuple[Layout, int]] = [
    ((4, 4), 1), ((4, 4), 2), ((3, 5), 1), ((3, 5), 2), ((2, 2, 2), 1), ((3, 3, 6), 2),
    ((1, 4), 1), ((5, 7), 1), ((1, 1, 1, 1, 1), 1), ((6, 6), 2), ((8,), 1),
    ("abab", 1), ("aabbbab", 2),
]
HIER_DTYPE_OPS = [("float32", "sum"), ("float16", "avg"), ("int32", "prod"),
                  ("bfloat16", "max"), ("int64", "min")]


@pytest.mark.parametrize(("layout", "rails"), HIER_TOPOLOGIES,
                         ids=[layout_id(lay, r) for lay, r in HIER_TOPOLOGIES])
@pytest.mark.parametrize("inter", INTER_CHOICES)
@pytest.mark.parametrize("intra", INTRA_CHOICES)
def test_hierarchical_choices(intra, inter, layout, rails):
    assert set(INTRA_CHOICES) == {"ring", "direct"}
    assert set(INTER_CHOICES) == {"ring", "recursive_doubling", "rabenseifner", "tree",
                                  "native"}
    case = Case("hierarchical", "all_reduce", layout, rails,
                params=(("intra", intra), ("inter", inter)))
    topology = case.topology()
    p = topology.world_size
    for count in (0, 1, 7, 101, 1009):
        for seed, (dtype, op) in enumerate(HIER_DTYPE_OPS):
            spec = CollectiveSpec.all_reduce(p, count, op)
            schedule, _ = check(case, spec, count, dtype, seed)
            ctx = case.describe(spec, count, dtype, seed)
            assert schedule.params["intra"] == intra, ctx
            assert schedule.params["inter"] == inter, ctx
            natives = [s for prog in schedule.programs for s in prog.steps()
                       if isinstance(s, Native)]
            if inter == "native" and topology.num_nodes > 1 and count:
                assert natives, f"{ctx}: inter=native but no Native step"
            if inter != "native":
                assert not natives, f"{ctx}: Native step without inter=native"


@pytest.mark.parametrize(("layout", "rails"), HIER_TOPOLOGIES,
                         ids=[layout_id(lay, r) for lay, r in HIER_TOPOLOGIES])
@pytest.mark.parametrize("inter", INTER_CHOICES)
def test_hierarchical_leader_choices(inter, layout, rails):
    case = Case("hierarchical_leader", "all_reduce", layout, rails, params=(("inter", inter),))
    p = case.topology().world_size
    for count in (0, 1, 7, 101, 1009):
        for seed, (dtype, op) in enumerate(HIER_DTYPE_OPS):
            schedule, _ = check(case, CollectiveSpec.all_reduce(p, count, op), count, dtype,
                                seed)
            assert schedule.params["inter"] == inter


@pytest.mark.parametrize("algorithm", ["hierarchical", "hierarchical_leader"])
def test_hierarchical_defaults_recorded(algorithm):
    schedule = build_schedule(algorithm, Topology.from_layout([2, 2]),
                              CollectiveSpec.all_reduce(4, 16))
    expected = ({"intra": "ring", "inter": "ring", "segments": 1}
                if algorithm == "hierarchical" else {"inter": "recursive_doubling"})
    assert schedule.params == expected


def test_large_all_reduces_are_pipelined_in_up_to_six_segments():
    """Segments of ~10 MiB, at most 6 (the count measured best at 64 MiB on 2x4), with
    ring chunks of at least 128 KiB (each segment pays the ring's latencies again)."""
    from topocoll.comm.selection import default_params

    topo = Topology.from_layout([4, 4])
    segments = {size: default_params("all_reduce", "hierarchical", size, topo)["segments"]
                for size in (1 << 20, 16 << 20, 32 << 20, 64 << 20, 1 << 30)}
    assert segments == {1 << 20: 1, 16 << 20: 1, 32 << 20: 3, 64 << 20: 6, 1 << 30: 6}
    assert default_params("all_reduce", "ring", 64 << 20, topo) == {}
    big = Topology.from_layout([8] * 128)  # 64 KiB ring chunks at 64 MiB: no pipeline
    assert default_params("all_reduce", "hierarchical", 64 << 20, big)["segments"] == 1
    assert default_params("all_reduce", "hierarchical", 1 << 30, big)["segments"] == 6


@pytest.mark.parametrize("layout", [[4, 4], [3, 5], [2, 2, 2], [1, 3], [3, 3, 6], [2, 3, 4]])
@pytest.mark.parametrize("segments", [2, 3, 6, 8])
@pytest.mark.parametrize("inter", ["ring", "recursive_doubling", "rabenseifner", "tree",
                                   "native"])
@pytest.mark.parametrize("intra", ["ring", "direct"])
def test_pipelined_hierarchical_is_correct_and_deadlock_free(layout, segments, inter, intra):
    """Staggered segments share phases: only phase-aligned generators keep this safe."""
    topo = Topology.from_layout(layout)
    for count in (0, 5, 1001):
        spec = CollectiveSpec.all_reduce(topo.world_size, count, "sum")
        verify(build_schedule("hierarchical", topo, spec, segments=segments, inter=inter,
                              intra=intra), "float32", seed=count)


@pytest.mark.parametrize(("algorithm", "params"), [
    ("hierarchical", {"intra": "tree"}),
    ("hierarchical", {"inter": "bogus"}),
    ("hierarchical", {"intra": "native"}),
    ("hierarchical_leader", {"inter": "bogus"}),
])
def test_hierarchical_rejects_unknown_choice(algorithm, params):
    name, value = next(iter(params.items()))
    with pytest.raises(ValueError, match=f"{name}={value!r}"):
        build_schedule(algorithm, Topology.from_layout([2, 2]),
                       CollectiveSpec.all_reduce(4, 16), **params)


def test_every_dtype_and_op_is_exercised():
    assert {d for d, _ in DTYPE_OPS} == set(DTYPES)
    assert {o for _, o in DTYPE_OPS} == set(REDUCE_OPS)
    assert ("int32", "avg") not in DTYPE_OPS
