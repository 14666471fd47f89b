"""The schedule IR: deterministic JSON, round trips, tamper detection, levels and traffic."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from topocoll.comm.algorithms import algorithm_names, build_schedule
from topocoll.comm.collectives import COLLECTIVES, CollectiveSpec
from topocoll.comm.schedule import (
    SCHEMA_VERSION,
    Copy,
    Native,
    RankProgram,
    Recv,
    Reduce,
    Region,
    Scale,
    Schedule,
    Send,
    step_from_json,
    step_to_json,
)
from topocoll.comm.verifier import verify
from topocoll.topology import INTER, INTRA, SELF, Level, Topology

ALGORITHMS = [(c, name) for c in COLLECTIVES for name in algorithm_names(c)]
ALGO_IDS = [f"{c}-{n}" for c, n in ALGORITHMS]


def make_topology(shape: tuple[int, ...] | str, rails: int = 1) -> Topology:
    if isinstance(shape, str):
        return Topology.from_hosts(list(shape), rails=rails)
    return Topology.from_layout(shape, rails=rails)


def make_spec(collective: str, world_size: int, count: int, seed: int = 0,
              op: str = "sum") -> CollectiveSpec:
    """A spec for `collective` with uneven sizes where the collective allows them."""
    rng = np.random.default_rng([seed, world_size, count])
    p = world_size
    if collective == "all_reduce":
        return CollectiveSpec.all_reduce(p, count, op)
    if collective == "broadcast":
        return CollectiveSpec.broadcast(p, count, root=p - 1)
    if collective == "reduce_scatter":
        return CollectiveSpec.reduce_scatter(p, rng.integers(0, 2 * count + 1, p).tolist(), op)
    if collective == "all_gather":
        return CollectiveSpec.all_gather(p, rng.integers(0, 2 * count + 1, p).tolist())
    if collective == "all_to_all":
        return CollectiveSpec.all_to_all(p, count)
    return CollectiveSpec.all_to_all_v(rng.integers(0, 2 * count + 1, (p, p)).tolist())


def build(collective: str, algorithm: str, topology: Topology, count: int = 13,
          **params) -> Schedule:
    spec = make_spec(collective, topology.world_size, count)
    return build_schedule(algorithm, topology, spec, **params)


def comm_steps(schedule: Schedule):
    for program in schedule.programs:
        for phase in program.phases:
            for step in phase:
                if isinstance(step, (Send, Recv, Native)):
                    yield program.rank, step


# ----- serialization ------------------------------------------------------------------
IR_TOPOLOGIES = [(3, 5), (2, 2, 2), "abab"]


@pytest.mark.parametrize("shape", IR_TOPOLOGIES, ids=str)
@pytest.mark.parametrize(("collective", "algorithm"), ALGORITHMS, ids=ALGO_IDS)
def test_json_is_deterministic(collective, algorithm, shape):
    ctx = f"{algorithm} {collective} on {shape}"
    first = build(collective, algorithm, make_topology(shape, 2))
    second = build(collective, algorithm, make_topology(shape, 2))
    assert first.to_json() == second.to_json(), ctx
    assert first.to_json().encode() == second.to_json().encode(), ctx
    assert first.id == second.id, ctx
    assert first.to_dict()["id"] == first.id, ctx
    assert len(first.id) == 20 and int(first.id, 16) >= 0, ctx
    # the text is canonical: compact separators and sorted keys
    text = first.to_json()
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":")), ctx


@pytest.mark.parametrize("shape", IR_TOPOLOGIES, ids=str)
@pytest.mark.parametrize(("collective", "algorithm"), ALGORITHMS, ids=ALGO_IDS)
def test_json_round_trip(collective, algorithm, shape):
    ctx = f"{algorithm} {collective} on {shape}"
    schedule = build(collective, algorithm, make_topology(shape, 2))
    text = schedule.to_json()
    back = Schedule.from_json(text)
    assert back == schedule, ctx
    assert back.to_json() == text, ctx
    assert back.id == schedule.id, ctx
    assert back.topology == schedule.topology, ctx
    assert back.topology.fingerprint == schedule.topology.fingerprint, ctx
    report = verify(back, "float64", seed=3)
    assert report.schedule_id == schedule.id, ctx


def test_round_trip_keeps_every_step_kind():
    """Native (with group, counts, op, root), Scale, Reduce, Copy, Send, Recv and levels."""
    topology = Topology.from_layout([3, 5], rails=2)
    native = build_schedule("hierarchical", topology, CollectiveSpec.all_reduce(8, 40, "avg"),
                            intra="direct", inter="native")
    bruck = build("all_to_all_v", "bruck", topology)
    for schedule in (native, bruck):
        back = Schedule.from_json(schedule.to_json())
        assert back == schedule
        verify(back, "float32")
    kinds = {type(s) for prog in native.programs for s in prog.steps()}
    assert {Send, Recv, Reduce, Native, Scale} <= kinds
    assert Copy in {type(s) for prog in bruck.programs for s in prog.steps()}


@pytest.mark.parametrize("step", [
    Send(3, Region("data", 2, 5), 7, Level(INTER, 1)),
    Recv(0, Region("tmp", 0, 4), 0, Level(INTRA)),
    Recv(1, Region("out", 9, 0)),
    Reduce(Region("data", 0, 4), (Region("data", 0, 4), Region("tmp", 4, 4)), "max"),
    Copy(Region("out", 0, 3), Region("in", 3, 3)),
    Scale(Region("data", 0, 8), 6),
    Native("reduce_scatter", (0, 2, 4), Region("in", 0, 9), Region("out", 0, 3), (3, 3, 3),
           "prod", 1, Level(INTER, None)),
], ids=lambda s: type(s).__name__)
def test_step_json_round_trip(step):
    data = step_to_json(step)
    assert step_from_json(json.loads(json.dumps(data))) == step


def test_unknown_step_and_level_are_rejected():
    with pytest.raises(ValueError, match="unknown schedule step 'teleport'"):
        step_from_json({"op": "teleport"})
    with pytest.raises(ValueError, match="unknown topology level 'outer'"):
        Level.parse("outer")
    for level in (Level(SELF), Level(INTRA), Level(INTER, 0), Level(INTER, 3), Level(INTER)):
        assert Level.parse(str(level)) == level


def tamper(text: str, change) -> str:
    data = json.loads(text)
    change(data)
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


@pytest.mark.parametrize("what", ["peer", "count", "op", "algorithm", "rails", "size_range",
                                  "buffer", "drop_phase"])
def test_tampered_json_is_rejected(what):
    schedule = build("all_reduce", "ring", Topology.from_layout([2, 2])).with_size_range(0, 64)
    text = schedule.to_json()

    def change(data):
        step = data["programs"][1]["phases"][0][0]
        if what == "peer":
            step["peer"] = 3 - step["peer"]
        elif what == "count":
            data["spec"]["count"] += 1
        elif what == "op":
            data["spec"]["op"] = "max"
        elif what == "algorithm":
            data["algorithm"] = "tree"
        elif what == "rails":
            data["topology"]["rails"] = 2
        elif what == "size_range":
            data["size_range"] = [0, 128]
        elif what == "buffer":
            data["programs"][0]["buffers"]["data"] = 99
        else:
            data["programs"][2]["phases"].pop()

    forged = tamper(text, change)
    assert forged != text
    with pytest.raises(ValueError, match="does not match its id"):
        Schedule.from_json(forged)


def test_wrong_schema_is_rejected():
    text = build("all_reduce", "ring", Topology.from_layout([2])).to_json()
    for schema in (SCHEMA_VERSION + 1, None):
        forged = tamper(text, lambda data, s=schema: data.__setitem__("schema", s))
        with pytest.raises(ValueError, match=f"schema {schema!r} is not {SCHEMA_VERSION}"):
            Schedule.from_json(forged)


def test_id_changes_with_content():
    topology = Topology.from_layout([2, 2])
    base = build_schedule("ring", topology, CollectiveSpec.all_reduce(4, 16))
    variants = {
        "count": build_schedule("ring", topology, CollectiveSpec.all_reduce(4, 17)),
        "op": build_schedule("ring", topology, CollectiveSpec.all_reduce(4, 16, "max")),
        "algorithm": build_schedule("tree", topology, CollectiveSpec.all_reduce(4, 16)),
        "topology": build_schedule("ring", Topology.from_layout([1, 3]),
                                   CollectiveSpec.all_reduce(4, 16)),
        "rails": build_schedule("ring", Topology.from_layout([2, 2], rails=2),
                                CollectiveSpec.all_reduce(4, 16)),
        "params": build_schedule("ring", topology, CollectiveSpec.all_reduce(4, 16), note=1),
        "size_range": base.with_size_range(0, 1024),
        "size_range_hi": base.with_size_range(0, 2048),
    }
    ids = {name: s.id for name, s in variants.items()}
    assert base.id not in ids.values()
    assert len(set(ids.values())) == len(ids), ids
    # the id covers the programs too, not only the header
    program = base.programs[0]
    edited = replace(base, programs=(replace(program, phases=program.phases[:-1],
                                             rounds=program.rounds[:-1]),
                                     *base.programs[1:]))
    assert edited.id != base.id


def test_size_range_is_serialized():
    schedule = build("all_to_all", "pairwise", Topology.from_layout([2, 2]))
    assert schedule.size_range is None
    assert schedule.to_dict()["size_range"] is None
    assert Schedule.from_json(schedule.to_json()).size_range is None
    for lo, hi in [(0, 4096), (4096, 1 << 40), (0, 0)]:
        ranged = schedule.with_size_range(lo, hi)
        assert ranged.to_dict()["size_range"] == [lo, hi]
        assert json.loads(ranged.to_json())["size_range"] == [lo, hi]
        back = Schedule.from_json(ranged.to_json())
        assert back.size_range == (lo, hi)
        assert back == ranged
        assert back.id == ranged.id != schedule.id
    assert schedule.size_range is None  # with_size_range returns a copy


# ----- levels -------------------------------------------------------------------------
def expected_level(topology: Topology, src: int, dst: int) -> Level:
    """Computed from node_of alone: local rank = index among the node's ranks."""
    if src == dst:
        return Level(SELF)
    if topology.node_of[src] != topology.node_of[dst]:
        same_node = [r for r in range(topology.world_size)
                     if topology.node_of[r] == topology.node_of[src]]
        return Level(INTER, same_node.index(src) % topology.rails)
    return Level(INTRA)


LEVEL_TOPOLOGIES = [((4, 4), 1), ((4, 4), 2), ((3, 5), 2), ((3, 3, 6), 3), ((8,), 2),
                    ((1, 1, 1), 1), ("abab", 2), ("aabcbca", 2)]


@pytest.mark.parametrize(("shape", "rails"), LEVEL_TOPOLOGIES,
                         ids=[f"{s}:rails={r}" for s, r in LEVEL_TOPOLOGIES])
@pytest.mark.parametrize(("collective", "algorithm"), ALGORITHMS, ids=ALGO_IDS)
def test_every_comm_step_carries_its_level(collective, algorithm, shape, rails):
    topology = make_topology(shape, rails)
    schedule = build(collective, algorithm, topology, count=11)
    check_levels(schedule, f"{algorithm} {collective} on {shape} rails={rails}")


@pytest.mark.parametrize(("shape", "rails"), LEVEL_TOPOLOGIES,
                         ids=[f"{s}:rails={r}" for s, r in LEVEL_TOPOLOGIES])
@pytest.mark.parametrize("algorithm", ["hierarchical", "hierarchical_leader"])
def test_native_steps_carry_the_level_of_their_group(algorithm, shape, rails):
    topology = make_topology(shape, rails)
    schedule = build("all_reduce", algorithm, topology, count=23, inter="native")
    natives = check_levels(schedule, f"{algorithm} inter=native on {shape} rails={rails}")
    if topology.num_nodes > 1:
        assert natives
        assert all(n.level.kind == INTER for n in natives)


def test_native_group_across_rails_has_no_single_rail():
    """On 3+5 with 2 rails, chunk 3's owners are local ranks 0 and 3: rails 0 and 1."""
    topology = Topology.from_layout([3, 5], rails=2)
    schedule = build("all_reduce", "hierarchical", topology, count=50, inter="native")
    levels = {n.group: n.level for _, n in comm_steps(schedule) if isinstance(n, Native)}
    assert levels[(0, 3)] == Level(INTER, 0)
    assert levels[(1, 4)] == Level(INTER, 1)
    assert levels[(0, 6)] == Level(INTER, None)
    assert str(levels[(0, 6)]) == "inter"


def check_levels(schedule: Schedule, ctx: str) -> list[Native]:
    """Every comm step's level, recomputed from the topology; returns the Native steps."""
    topology, rails = schedule.topology, schedule.topology.rails
    natives = []
    seen = Counter()
    for rank, step in comm_steps(schedule):
        assert step.level is not None, f"{ctx}: rank {rank} {step} has no level"
        if isinstance(step, Send):
            want = expected_level(topology, rank, step.peer)
        elif isinstance(step, Recv):
            want = expected_level(topology, step.peer, rank)  # the sender's rail
        else:
            nodes = {topology.node_of[r] for r in step.group}
            assert rank in step.group, ctx
            if len(nodes) == 1:
                want = Level(INTRA) if len(step.group) > 1 else Level(SELF)
            else:
                member_rails = {topology.local_rank_of[r] % rails for r in step.group}
                want = Level(INTER, member_rails.pop() if len(member_rails) == 1 else None)
        assert step.level == want, (f"{ctx}: rank {rank} {step} has level {step.level}, "
                                    f"expected {want}")
        if isinstance(step, Send):
            assert step.level == topology.level(rank, step.peer), ctx
        elif isinstance(step, Recv):
            assert step.level == topology.level(step.peer, rank), ctx
        if step.level.kind == INTER and not isinstance(step, Native):
            assert 0 <= step.level.rail < rails, ctx
        if isinstance(step, Native):
            natives.append(step)
        seen[step.level.kind] += 1
    if topology.num_nodes > 1 and seen:
        assert seen[INTER] > 0, f"{ctx}: a multi-node schedule that never leaves a node"
    if topology.num_nodes == 1:
        assert seen[INTER] == 0, f"{ctx}: inter-node traffic on one node"
    return natives


def test_send_and_recv_of_one_message_agree_on_the_level():
    topology = Topology.from_hosts(list("abcabcab"), rails=2)
    schedule = build("all_to_all_v", "hierarchical_2d", topology, count=5)
    sends, recvs = Counter(), Counter()
    for rank, step in comm_steps(schedule):
        if isinstance(step, Send):
            sends[rank, step.peer, step.tag, step.src.count, str(step.level)] += 1
        elif isinstance(step, Recv):
            recvs[step.peer, rank, step.tag, step.dst.count, str(step.level)] += 1
    assert sends == recvs


# ----- traffic per level --------------------------------------------------------------
def inter_elements_per_node(schedule: Schedule) -> Counter:
    """Elements leaving each node in Send steps whose level is inter."""
    out: Counter = Counter()
    for rank, step in comm_steps(schedule):
        if isinstance(step, Send) and step.level.kind == INTER:
            out[schedule.topology.node_of[rank]] += step.src.count
    return out


def inter_elements_per_rail(schedule: Schedule) -> Counter:
    out: Counter = Counter()
    for _, step in comm_steps(schedule):
        if isinstance(step, Send) and step.level.kind == INTER:
            out[step.level.rail] += step.src.count
    return out


def inter_messages(schedule: Schedule) -> int:
    return sum(1 for _, s in comm_steps(schedule) if isinstance(s, Send) and s.level.kind == INTER)


@pytest.mark.parametrize("count", [1024, 1000, 4099])
def test_hierarchical_crosses_less_than_ring(count):
    topology = Topology.from_layout([4, 4])
    spec = CollectiveSpec.all_reduce(8, count)
    hier = inter_elements_per_node(build_schedule("hierarchical", topology, spec))
    ring = inter_elements_per_node(build_schedule("ring", topology, spec))
    for node in (0, 1):
        assert hier[node] < ring[node], (node, hier, ring)
    # with N = 2 nodes every node's uplink carries 2(N-1)/N of the vector, once
    if count % 8 == 0:
        assert hier == {0: count, 1: count}
    # the flat ring crosses with ~2(p-1)/p of the vector per node boundary
    assert ring[0] >= 2 * 7 * count // 8 - 2


@pytest.mark.parametrize(("layout", "count"), [((4, 4, 4), 1200), ((2, 2, 2, 2), 64),
                                               ((4, 4), 64)])
def test_hierarchical_inter_bytes_are_2_n_minus_1_over_n(layout, count):
    topology = Topology.from_layout(layout)
    n = topology.num_nodes
    schedule = build_schedule("hierarchical", topology,
                              CollectiveSpec.all_reduce(topology.world_size, count))
    per_node = inter_elements_per_node(schedule)
    assert per_node == dict.fromkeys(range(n), 2 * (n - 1) * count // n)


def test_hierarchical_spreads_over_rails_ring_does_not():
    topology = Topology.from_layout([4, 4], rails=2)
    spec = CollectiveSpec.all_reduce(8, 1024)
    hier = inter_elements_per_rail(build_schedule("hierarchical", topology, spec))
    ring = inter_elements_per_rail(build_schedule("ring", topology, spec))
    assert hier[0] == hier[1] > 0
    assert len(ring) == 1  # only the boundary ranks 3 -> 4 and 7 -> 0 cross, both rail 1
    assert set(ring) == {1}


@pytest.mark.parametrize("collective", ["all_to_all", "all_to_all_v"])
def test_hierarchical_2d_sends_fewer_inter_node_messages(collective):
    topology = Topology.from_layout([4, 4])
    spec = (CollectiveSpec.all_to_all(8, 16) if collective == "all_to_all"
            else CollectiveSpec.all_to_all_v([[1 + (i * j) % 5 for j in range(8)]
                                              for i in range(8)]))
    two_d = build_schedule("hierarchical_2d", topology, spec)
    flat = build_schedule("pairwise", topology, spec)
    assert inter_messages(flat) == 2 * 4 * 4  # every rank to every remote rank
    assert inter_messages(two_d) == 2 * 4  # one pack per (proxy, remote destination)
    assert inter_messages(two_d) < inter_messages(flat)
    # the same data crosses either way
    assert sum(inter_elements_per_node(two_d).values()) == \
        sum(inter_elements_per_node(flat).values())
    verify(two_d)
    verify(flat)


def test_rounds_must_increase_one_per_phase():
    send = Send(1, Region("data", 0, 4), 0)
    assert RankProgram(0, {"data": 4}, ((send,), (send,)), (0, 3)).round_of(1) == 3
    assert RankProgram(0, {"data": 4}, ((send,), (send,))).round_of(1) == 1
    for rounds in ((3, 3), (2, 1), (0,)):
        with pytest.raises(ValueError, match="rounds"):
            RankProgram(0, {"data": 4}, ((send,), (send,)), rounds)
