"""The cost model against the textbook alpha-beta-gamma costs, and its refinements.

Reference: Thakur, Rabenseifner and Gropp, "Optimization of Collective Communication
Operations in MPICH" (IJHPCA 2005). With one rank per node every message crosses the one
inter-node link class, so each algorithm's price must equal the closed form of the paper
(alpha = latency, beta = time per byte, gamma = reduce time per byte; n = bytes per rank).
Then the refinements the paper does not have: link sharing, rendezvous, per-step
overhead, pricing a size sweep as one vector, and refusing a schedule that deadlocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest

from topocoll.comm.algorithms import build_schedule
from topocoll.comm.collectives import CollectiveSpec
from topocoll.comm.cost_model import CostModelError, price
from topocoll.comm.schedule import Copy, RankProgram, Recv, Reduce, Region, Schedule, Send
from topocoll.topology import Topology
from topocoll.topology.profile import LinkProfile, Profile

ITEMSIZE = 4  # float32
REL = 1e-6


@dataclass(frozen=True)
class Figures:
    """alpha (us), beta (us/byte), gamma (us/byte): distinct on purpose."""

    name: str
    alpha: float
    beta: float
    gamma: float


FIGURES = [
    Figures("net-bound", alpha=7.0, beta=3e-3, gamma=5e-4),
    Figures("reduce-bound", alpha=0.5, beta=2e-4, gamma=1.3e-3),
]


def flat_profile(f: Figures, overhead_us: float = 0.0, copy_us_per_byte: float = 0.0
                 ) -> Profile:
    # One rank per node: a node's uplink is its rank's own, so shared beta = flow beta.
    # The textbook costs are those of steps run one after the other, as our executor runs
    # them over MPI (phase by phase); other transports post a phase ahead (tested below).
    return Profile(links={"inter": LinkProfile(f.alpha, f.beta, f.beta)},
                   reduce_us_per_byte=f.gamma, copy_us_per_byte=copy_us_per_byte,
                   overhead_us=overhead_us, transport="mpi", source="test flat profile")


def flat(p: int) -> Topology:
    return Topology.from_layout([1] * p)


def priced(algorithm: str, topology: Topology, spec: CollectiveSpec, profile: Profile,
           **params: object) -> float:
    schedule = build_schedule(algorithm, topology, spec, **params)
    return float(price(schedule, profile, ITEMSIZE)[0])


# ----- the closed forms ------------------------------------------------------------------
def ring_cost(p: int, n: float, f: Figures) -> float:
    return 2 * (p - 1) * f.alpha + 2 * (p - 1) / p * n * f.beta + (p - 1) / p * n * f.gamma


def recursive_doubling_cost(p: int, n: float, f: Figures) -> float:
    return math.log2(p) * (f.alpha + n * f.beta + n * f.gamma)


def rabenseifner_cost(p: int, n: float, f: Figures) -> float:
    return (2 * math.log2(p) * f.alpha + 2 * (p - 1) / p * n * f.beta
            + (p - 1) / p * n * f.gamma)


def tree_cost(p: int, n: float, f: Figures) -> float:
    return 2 * math.log2(p) * (f.alpha + n * f.beta) + math.log2(p) * n * f.gamma


ALL_REDUCE_FORMULAS = {
    "ring": ring_cost,
    "recursive_doubling": recursive_doubling_cost,
    "rabenseifner": rabenseifner_cost,
    "tree": tree_cost,
}

POW2 = [2, 4, 8, 16]
NON_POW2 = [3, 5, 6, 7]


def _all_reduce_cases() -> list:
    cases = []
    for algo in ALL_REDUCE_FORMULAS:
        ps = POW2 + NON_POW2 if algo == "ring" else POW2
        for p in ps:
            # Counts that split into p equal blocks; the whole-vector algorithms also get
            # odd counts (their messages never split the vector).
            counts = [p, 64 * p, 1000 * p]
            if algo in ("recursive_doubling", "tree"):
                counts += [1, 1001, 65537]
            for count in counts:
                for f in FIGURES:
                    cases.append(pytest.param(algo, p, count, f,
                                              id=f"{algo}-p{p}-{count * ITEMSIZE}B-{f.name}"))
    return cases


@pytest.mark.parametrize(("algorithm", "p", "count", "figures"), _all_reduce_cases())
def test_all_reduce_matches_the_literature(algorithm: str, p: int, count: int,
                                           figures: Figures) -> None:
    n = count * ITEMSIZE
    got = priced(algorithm, flat(p), CollectiveSpec.all_reduce(p, count),
                 flat_profile(figures))
    want = ALL_REDUCE_FORMULAS[algorithm](p, n, figures)
    assert got == pytest.approx(want, rel=REL), (
        f"{algorithm} p={p} n={n}B {figures}: model {got:.6f} us, literature {want:.6f} us")


def _uneven_cases() -> list:
    return [pytest.param(algo, p, count, id=f"{algo}-p{p}-{count}el")
            for algo in ("ring", "rabenseifner")
            for p in (POW2 + NON_POW2 if algo == "ring" else POW2)
            for count in (p * 100 + 1, p * 100 + p - 1, p * 1000 + p // 2)]


@pytest.mark.parametrize(("algorithm", "p", "count"), _uneven_cases())
def test_uneven_blocks_are_paced_by_the_largest(algorithm: str, p: int, count: int) -> None:
    """When p does not divide the vector, blocks differ by one element.

    The ring's rendezvous chain makes every step wait for the largest block, so its cost
    is exactly the formula with every block ceil(count / p) elements. Rabenseifner's
    halves differ by at most a block, so its cost lies between the formula at n and at
    p * ceil(count / p) elements.
    """
    f = FIGURES[0]
    got = priced(algorithm, flat(p), CollectiveSpec.all_reduce(p, count), flat_profile(f))
    exact = ALL_REDUCE_FORMULAS[algorithm](p, count * ITEMSIZE, f)
    padded = ALL_REDUCE_FORMULAS[algorithm](p, -(-count // p) * p * ITEMSIZE, f)
    case = f"{algorithm} p={p} count={count}: model {got:.6f}, exact {exact:.6f}, " \
           f"padded {padded:.6f}"
    if algorithm == "ring":
        assert got == pytest.approx(padded, rel=REL), case
    else:
        assert exact * (1 - REL) <= got <= padded * (1 + REL), case


def _all_to_all_cases() -> list:
    cases = []
    for p in POW2 + NON_POW2:
        for per_peer in (1, 3, 64, 1001):
            for window in ("1", "all"):
                cases.append(pytest.param("pairwise", p, per_peer, window,
                                          id=f"pairwise-w{window}-p{p}-{per_peer}el"))
            if p in POW2:
                cases.append(pytest.param("bruck", p, per_peer, None,
                                          id=f"bruck-p{p}-{per_peer}el"))
    return cases


@pytest.mark.parametrize(("algorithm", "p", "per_peer", "window"), _all_to_all_cases())
@pytest.mark.parametrize("figures", FIGURES, ids=lambda f: f.name)
def test_all_to_all_matches_the_literature(algorithm: str, p: int, per_peer: int,
                                           window: str | None, figures: Figures) -> None:
    """n is what a rank sends in total (its block to itself included, as nccl-tests).

    Bruck moves n/2 bytes in each of log2(p) rounds (its local packing copies cost 0
    here); pairwise with window 1 exchanges n/p with one peer per step; with every step
    posted in one phase the rank's injection bandwidth carries all (p-1) n/p at once.
    """
    n = p * per_peer * ITEMSIZE
    a, b = figures.alpha, figures.beta
    params: dict[str, object] = {}
    if algorithm == "bruck":
        want = math.log2(p) * a + n / 2 * math.log2(p) * b
    elif window == "1":
        params["window"] = 1
        want = (p - 1) * (a + n / p * b)
    else:
        params["window"] = p - 1
        want = a + (p - 1) * n / p * b
    got = priced(algorithm, flat(p), CollectiveSpec.all_to_all(p, per_peer),
                 flat_profile(figures), **params)
    assert got == pytest.approx(want, rel=REL), (
        f"{algorithm} {params} p={p} n={n}B {figures}: model {got:.6f}, literature {want:.6f}")


# ----- hand-made schedules ---------------------------------------------------------------
def hand_schedule(topology: Topology, phases: dict[int, list[list]], count: int
                  ) -> Schedule:
    """A schedule from per-rank phase lists; every rank has `data` and `tmp` of `count`."""
    programs = tuple(
        RankProgram(r, {"data": count, "tmp": count},
                    tuple(tuple(ph) for ph in phases.get(r, [])))
        for r in range(topology.world_size))
    return Schedule("all_reduce", "hand-made", programs, topology,
                    {"collective": "all_reduce", "world_size": topology.world_size,
                     "count": count})


def net_profile(alpha: float = 0.0, beta: float = 1e-3, overhead_us: float = 0.0,
                reduce_us_per_byte: float = 0.0, transport: str = "") -> Profile:
    links = {"inter": LinkProfile(alpha, beta, beta), "intra": LinkProfile(alpha, beta, beta)}
    return Profile(links=links, reduce_us_per_byte=reduce_us_per_byte, copy_us_per_byte=0.0,
                   overhead_us=overhead_us, transport=transport)


DATA = Region("data", 0, 1000)
TMP = Region("tmp", 0, 1000)


@pytest.mark.parametrize("alpha", [0.0, 5.0], ids=lambda a: f"alpha{a:g}")
@pytest.mark.parametrize(("rails", "factor"), [(1, 2.0), (2, 1.0)],
                         ids=["1-rail-shared", "2-rails-apart"])
def test_messages_of_one_phase_share_the_node_uplink(rails: int, factor: float,
                                                     alpha: float) -> None:
    """Ranks 0 and 1 (node 0) send to ranks 2 and 3 (node 1) in the same phase.

    On one rail both cross node 0's uplink: each takes twice one message's wire time. On
    two rails local ranks 0 and 1 leave on different NICs and do not slow each other.
    """
    topo = Topology.from_layout([2, 2], rails=rails)
    profile = net_profile(alpha=alpha)
    one = hand_schedule(topo, {0: [[Send(2, DATA)]], 2: [[Recv(0, DATA)]]}, 1000)
    two = hand_schedule(topo, {0: [[Send(2, DATA)]], 2: [[Recv(0, DATA)]],
                               1: [[Send(3, DATA)]], 3: [[Recv(1, DATA)]]}, 1000)
    t_one = float(price(one, profile, ITEMSIZE)[0])
    t_two = float(price(two, profile, ITEMSIZE)[0])
    wire = 1000 * ITEMSIZE * 1e-3
    assert t_one == pytest.approx(alpha + wire, rel=REL), f"rails={rails}: one message {t_one}"
    assert t_two == pytest.approx(alpha + factor * wire, rel=REL), (
        f"rails={rails}: two messages {t_two}, want alpha + {factor} x {wire}")


def price_sends(sends: list[tuple[int, int, int]], topo: Topology, profile: Profile) -> float:
    """Price hand-made single-message phases on four ranks: (src, dst, round) each sends
    1000 floats, in list order per rank, tagged and timed by its round."""
    buffers = {"data": 1000, "tmp": 1000}
    spec = {"collective": "all_reduce", "world_size": 4, "count": 1000}
    phases: dict[int, list] = {}
    rounds: dict[int, list[int]] = {}
    for src, dst, rnd in sends:
        phases.setdefault(src, []).append((Send(dst, DATA, rnd),))
        phases.setdefault(dst, []).append((Recv(src, TMP, rnd),))
        rounds.setdefault(src, []).append(rnd)
        rounds.setdefault(dst, []).append(rnd)
    programs = tuple(RankProgram(r, buffers, tuple(phases.get(r, ())),
                                 tuple(rounds.get(r, ()))) for r in range(4))
    return float(price(Schedule("all_reduce", "hand-made", programs, topo, spec),
                       profile, ITEMSIZE)[0])


def test_traffic_both_ways_through_an_uplink_runs_at_the_duplex_rate() -> None:
    """Rank 1 (node 0) sends to rank 2 (node 1) while rank 3 sends to rank 0: no pair
    swaps, but node 0's uplink carries a flow each way, as in a ring across two nodes,
    so both run at the profile's two-way rate. Alone, with the return flow in another
    round, or on another rail, a message runs at the one-way rate."""
    topo = Topology.from_layout([2, 2])
    links = {"inter": LinkProfile(0.0, 1e-3, 1e-3, duplex_beta_us_per_byte=2e-3),
             "intra": LinkProfile(0.0, 1e-3, 1e-3, duplex_beta_us_per_byte=2e-3)}
    profile = Profile(links=links, reduce_us_per_byte=0.0, copy_us_per_byte=0.0,
                      overhead_us=0.0)
    wire = 1000 * ITEMSIZE * 1e-3

    def cost(sends: list[tuple[int, int, int]], topo: Topology = topo) -> float:
        return price_sends(sends, topo, profile)

    assert cost([(1, 2, 0)]) == pytest.approx(wire)
    assert cost([(1, 2, 0), (3, 0, 0)]) == pytest.approx(2 * wire)  # both ways at once
    assert cost([(1, 2, 0), (3, 0, 1)]) == pytest.approx(wire)  # other rounds: one-way
    two_rails = Topology.from_layout([2, 2], rails=2)  # 1->3 on rail 1, 2->0 on rail 0
    assert cost([(1, 3, 0), (2, 0, 0)], two_rails) == pytest.approx(wire)
    assert cost([(1, 3, 0), (2, 0, 0)]) == pytest.approx(2 * wire)  # one rail: both ways


def test_a_shaper_burst_passes_free_only_after_the_uplinks_rested() -> None:
    """A link behind a token bucket lets `burst_bytes` through at once after its uplinks
    carried nothing for a round; the messages of a round share that bucket. 1000 floats
    are 4000 bytes, 4 us on the wire; the burst is 1000 bytes, 1 us."""
    topo = Topology.from_layout([2, 2])
    wire, free = 4.0, 1.0

    def cost(sends: list[tuple[int, int, int]], burst: float = 1000.0,
             inter_level: bool = True) -> float:
        links = {"inter": LinkProfile(0.0, 1e-3, 1e-3, burst_bytes=burst if inter_level else 0),
                 "intra": LinkProfile(0.0, 1e-3, 1e-3,
                                      burst_bytes=0 if inter_level else burst)}
        return price_sends(sends, topo, Profile(links=links, reduce_us_per_byte=0.0,
                                                copy_us_per_byte=0.0, overhead_us=0.0))

    # A crossing after a round inside the node: the bucket is full.
    assert cost([(0, 1, 0), (1, 2, 1)]) == pytest.approx(wire + wire - free)
    assert cost([(0, 1, 0), (1, 2, 1)], burst=0.0) == pytest.approx(2 * wire)
    # Node 0's uplink busy in round 1 as well: only round 1 gets the burst.
    assert cost([(0, 1, 0), (1, 2, 1), (1, 3, 2)]) == pytest.approx(3 * wire - free)
    # Two crossings of one round share the bucket (and the uplink: 8 us together).
    assert cost([(0, 1, 0), (0, 2, 1), (1, 3, 1)]) == pytest.approx(wire + 2 * wire - free)
    # The only round crosses: back-to-back calls keep the uplink busy, no burst.
    assert cost([(1, 2, 0)]) == pytest.approx(wire)
    # Inside a node there is no shaper: a burst there is never applied.
    assert cost([(0, 1, 0), (1, 2, 1), (2, 3, 2)], inter_level=False) == pytest.approx(3 * wire)


@pytest.mark.parametrize(("algorithm", "crossings"), [("ring", 0), ("tree", 2)])
def test_a_burst_spares_a_tree_two_crossings_and_a_ring_nothing(algorithm: str,
                                                                crossings: int) -> None:
    """On 2x4 a binomial tree crosses once each way, each after the uplink rested; a
    ring's uplinks carry a step every round, so its price does not move."""
    topo = Topology.from_layout([4, 4])
    spec = CollectiveSpec.all_reduce(8, 250_000)
    burst, beta = 65536.0, 8e-3

    def profile(b: float) -> Profile:
        return Profile(links={"intra": LinkProfile(30.0, 3e-4, 2e-4),
                              "inter": LinkProfile(400.0, beta, beta, burst_bytes=b)},
                       reduce_us_per_byte=2e-4, copy_us_per_byte=1e-4, overhead_us=5.0)

    saved = priced(algorithm, topo, spec, profile(0.0)) - priced(algorithm, topo, spec,
                                                                  profile(burst))
    assert saved == pytest.approx(crossings * burst * beta, rel=1e-6, abs=1e-6)


def test_messages_share_a_link_by_round_not_by_phase_index() -> None:
    """Ranks 0 and 1 (node 0) both send to rank 2 (node 1), rank 1 one round later: it
    waits a round with nothing to do, a phase `finalize` drops. Both sends are then
    their rank's first phase, but only the rounds say when they run: one after the other,
    each alone on the uplink. Keyed by phase index they were priced as sharing it."""
    topo = Topology.from_layout([2, 1])
    profile = net_profile()
    buffers = {"data": 1000, "tmp": 1000}
    spec = {"collective": "all_reduce", "world_size": 3, "count": 1000}

    def schedule(rounds: bool) -> Schedule:
        return Schedule("all_reduce", "hand-made", (
            RankProgram(0, buffers, ((Send(2, DATA),),), (0,) if rounds else ()),
            RankProgram(1, buffers, ((Send(2, DATA, 1),),), (1,) if rounds else ()),
            RankProgram(2, buffers, ((Recv(0, DATA),), (Recv(1, TMP, 1),)),
                        (0, 1) if rounds else ())), topo, spec)

    wire = 1000 * ITEMSIZE * 1e-3
    assert float(price(schedule(True), profile, ITEMSIZE)[0]) == pytest.approx(2 * wire)
    assert float(price(schedule(False), profile, ITEMSIZE)[0]) == pytest.approx(4 * wire)


def test_finalize_records_each_phase_round_for_uneven_trees() -> None:
    """The binomial broadcast on 3+5 nodes: 0->4 and 2->3 cross nodes in different
    rounds, so neither is priced at the shared rate (it was +49..71% against measured)."""
    topo = Topology.from_layout([3, 5])
    schedule = build_schedule("tree", topo, CollectiveSpec.all_reduce(8, 1 << 20))
    assert schedule.programs[2].rounds != tuple(range(len(schedule.programs[2].phases)))
    beta = 1e-3
    profile = Profile(links={"inter": LinkProfile(0.0, beta, beta * 0.9),
                             "intra": LinkProfile(0.0, 0.0, 0.0)},
                      reduce_us_per_byte=0.0, copy_us_per_byte=0.0, overhead_us=0.0)
    four_crossings = 4 * (1 << 20) * ITEMSIZE * beta  # each alone on its link
    assert float(price(schedule, profile, ITEMSIZE)[0]) == pytest.approx(four_crossings)


OTHER = Region("data", 1000, 1000)


@pytest.mark.parametrize(("transport", "hidden"), [("gloo", True), ("mpi", False)])
def test_latency_of_a_phase_that_touches_nothing_before_it_is_hidden(transport: str,
                                                                     hidden: bool) -> None:
    """Rank 0 sends two blocks to rank 1, one per phase. They touch different regions,
    so the dataflow executor posts the second while the first is on the wire: its
    latency runs under the first's bytes (alpha + 2 wire times). Over MPI the executor
    runs phase by phase: 2 (alpha + wire). When the second phase reuses what the first
    touched (rank 0 receives into the block it sent), nothing is hidden either way."""
    topo = flat(2)
    alpha, wire = 3.0, 1000 * ITEMSIZE * 1e-3
    profile = Profile(links={"inter": LinkProfile(alpha, 1e-3, 1e-3)}, reduce_us_per_byte=0.0,
                      copy_us_per_byte=0.0, overhead_us=0.0, transport=transport)
    apart = hand_schedule(topo, {0: [[Send(1, DATA)], [Send(1, OTHER)]],
                                 1: [[Recv(0, DATA)], [Recv(0, OTHER)]]}, 2000)
    reused = hand_schedule(topo, {0: [[Send(1, DATA)], [Recv(1, DATA)]],
                                  1: [[Recv(0, DATA)], [Send(0, OTHER)]]}, 2000)
    want = alpha + 2 * wire if hidden else 2 * (alpha + wire)
    assert float(price(apart, profile, ITEMSIZE)[0]) == pytest.approx(want, rel=REL)
    assert float(price(reused, profile, ITEMSIZE)[0]) == pytest.approx(2 * (alpha + wire),
                                                                        rel=REL)


@pytest.mark.parametrize("p", [3, 4, 6])
def test_pairwise_steps_pay_one_latency_when_posted_ahead(p: int) -> None:
    """Pairwise, one peer per step, on a transport whose executor posts ahead: with the
    wire time of a block above the latency, p - 1 steps cost one latency and p - 1 wire
    times (the textbook (p - 1)(alpha + wire) is the phase-by-phase case, above)."""
    alpha, beta, per_peer = 2.0, 1e-3, 1000
    profile = Profile(links={"inter": LinkProfile(alpha, beta, beta)}, reduce_us_per_byte=0.0,
                      copy_us_per_byte=0.0, overhead_us=0.0, transport="gloo")
    got = priced("pairwise", flat(p), CollectiveSpec.all_to_all(p, per_peer), profile,
                 window=1)
    assert got == pytest.approx(alpha + (p - 1) * per_peer * ITEMSIZE * beta, rel=REL)


def test_a_late_sender_delays_its_receiver() -> None:
    """Rank 0 reduces locally before it sends: rank 1's receive cannot start earlier."""
    topo = flat(2)
    gamma = 2e-3
    profile = net_profile(alpha=3.0, reduce_us_per_byte=gamma)
    busy = hand_schedule(topo, {0: [[Reduce(DATA, (DATA, TMP), "sum")], [Send(1, DATA)]],
                                1: [[Recv(0, DATA)]]}, 1000)
    idle = hand_schedule(topo, {0: [[Send(1, DATA)]], 1: [[Recv(0, DATA)]]}, 1000)
    nbytes = 1000 * ITEMSIZE
    t_idle = float(price(idle, profile, ITEMSIZE)[0])
    t_busy = float(price(busy, profile, ITEMSIZE)[0])
    assert t_idle == pytest.approx(3.0 + nbytes * 1e-3, rel=REL)
    assert t_busy == pytest.approx(nbytes * gamma + t_idle, rel=REL), (
        f"late sender: {t_busy}, want reduce {nbytes * gamma} + message {t_idle}")


def test_a_busy_sender_delays_a_later_partner() -> None:
    """Rank 0 first sends a large message to rank 1, then a small one to rank 2: rank 2,
    ready at time 0, still waits for rank 0 to reach that phase. Phase by phase (MPI) it
    pays the small message's latency after that; where the executor posts ahead, the
    latency ran under the large message and only the bytes wait."""
    topo = flat(3)
    small = Region("data", 0, 10)
    sched = hand_schedule(topo, {0: [[Send(1, DATA)], [Send(2, small)]],
                                 1: [[Recv(0, DATA)]], 2: [[Recv(0, small)]]}, 1000)
    big_t = 2.0 + 1000 * ITEMSIZE * 1e-3
    small_wire = 10 * ITEMSIZE * 1e-3
    phased = float(price(sched, net_profile(alpha=2.0, transport="mpi"), ITEMSIZE)[0])
    assert phased == pytest.approx(big_t + 2.0 + small_wire, rel=REL), (
        f"rank 2 finishes at {phased}, want {big_t} + {2.0 + small_wire} (rendezvous)")
    ahead = float(price(sched, net_profile(alpha=2.0, transport="gloo"), ITEMSIZE)[0])
    assert ahead == pytest.approx(big_t + small_wire, rel=REL)


@pytest.mark.parametrize("p", [2, 4, 7], ids=lambda p: f"p{p}")
@pytest.mark.parametrize(("algorithm", "window", "phases", "steps_per_phase"), [
    ("pairwise", 1, lambda p: p - 1, lambda p: 2),
    ("pairwise", "all", lambda p: 1, lambda p: 2 * (p - 1)),
    ("ring", None, lambda p: 2 * (p - 1), lambda p: 2),
], ids=["pairwise-w1", "pairwise-wall", "ring-all-reduce"])
def test_overhead_is_paid_per_communication_step(p, algorithm, window, phases,
                                                 steps_per_phase) -> None:
    """With free links, a phase costs its communication steps times the overhead."""
    overhead = 1.5
    profile = Profile(links={"inter": LinkProfile(0.0, 0.0, 0.0)}, reduce_us_per_byte=0.0,
                      copy_us_per_byte=0.0, overhead_us=overhead)
    if algorithm == "pairwise":
        spec = CollectiveSpec.all_to_all(p, 16)
        params = {"window": 1 if window == 1 else p - 1}
    else:
        spec, params = CollectiveSpec.all_reduce(p, 16 * p), {}
    got = priced(algorithm, flat(p), spec, profile, **params)
    want = phases(p) * steps_per_phase(p) * overhead
    assert got == pytest.approx(want, rel=REL), f"{algorithm} {params} p={p}: {got} != {want}"


@pytest.mark.parametrize(("cores", "algorithm", "want"), [
    (2, "pairwise", 8 * 14 * 1.5 / 2),    # 8 ranks x 14 steps over 2 cores
    (3, "pairwise", 8 * 14 * 1.5 / 3),
    (2, "node_leader", (2 * 8 + 6 * 2) * 1.5 / 2),  # leaders 8 steps, members 2
    (8, "pairwise", 14 * 1.5),            # a core per rank: the path (14 steps) rules
])
def test_ranks_sharing_cores_pay_their_steps_together(cores, algorithm, want) -> None:
    """One machine runs all 8 ranks of a 2x4 job (an emulated cluster): with free links
    a small all-to-all costs every rank's steps over the machine's cores, not one rank's
    path. Profiles of a job of another size, or without machines, charge no floor."""
    from dataclasses import replace

    from topocoll.topology.profile import Machine

    topology = Topology.from_layout([4, 4])
    free = LinkProfile(0.0, 0.0, 0.0)
    profile = Profile(links={"intra": free, "inter": free}, reduce_us_per_byte=0.0,
                      copy_us_per_byte=0.0, overhead_us=1.5, topology=topology,
                      machines=(Machine(tuple(range(8)), cores),))
    spec = CollectiveSpec.all_to_all(8, 16)
    params = {"window": 7} if algorithm == "pairwise" else {}
    got = priced(algorithm, topology, spec, profile, **params)
    assert got == pytest.approx(want, rel=REL)
    path_only = priced(algorithm, topology, spec, replace(profile, machines=()), **params)
    assert path_only <= got
    other_size = replace(profile, topology=Topology.from_layout([4, 4, 4]))
    assert priced(algorithm, topology, spec, other_size, **params) == pytest.approx(path_only)
    same_hosts = replace(profile, topology=Topology.from_layout([3, 5]))  # 8 ranks too
    assert priced(algorithm, topology, spec, same_hosts, **params) == pytest.approx(got)


@pytest.mark.parametrize(("cores", "rounds"), [(1, 1), (1, 2), (2, 2), (4, 2)])
def test_a_round_where_every_rank_works_is_paced_by_the_cores(cores: int, rounds: int
                                                               ) -> None:
    """2x2 on one machine: in each round both pairs swap 4000 bytes in shared memory.
    The machine's work in a round is 8 steps of 10 us and 8 copies of 4 us (each message
    copied in and out), 112 us, so with C < 4 cores a round takes at least 112 / C us,
    however fast one pair's link is; with a core per rank there is no floor."""
    from topocoll.topology.profile import Machine

    topo = Topology.from_layout([2, 2])
    fast = LinkProfile(0.0, 1e-5, 1e-5)
    profile = Profile(links={"intra": fast, "inter": fast}, reduce_us_per_byte=0.0,
                      copy_us_per_byte=1e-3, overhead_us=10.0, topology=topo,
                      machines=(Machine((0, 1, 2, 3), cores),))
    sends = [(a, b, rnd) for rnd in range(rounds) for a, b in ((0, 1), (1, 0), (2, 3), (3, 2))]
    phases: dict[int, list] = {}
    for src, dst, rnd in sends:  # one phase per round: a swap with the node partner
        phases.setdefault((src, rnd), []).append(Send(dst, DATA, rnd))
        phases.setdefault((dst, rnd), []).append(Recv(src, TMP, rnd))
    programs = tuple(RankProgram(r, {"data": 1000, "tmp": 1000},
                                 tuple(tuple(phases[r, k]) for k in range(rounds)),
                                 tuple(range(rounds))) for r in range(4))
    spec = {"collective": "all_reduce", "world_size": 4, "count": 1000}
    got = float(price(Schedule("all_reduce", "hand-made", programs, topo, spec), profile,
                      ITEMSIZE)[0])
    one_rank = rounds * 2 * 10.0  # its own two steps (the message overlaps them)
    if cores >= 4:
        assert got == pytest.approx(one_rank)
    else:
        assert got == pytest.approx(rounds * 112.0 / cores)


def test_only_a_machine_with_more_ranks_than_cores_is_paced_by_them() -> None:
    """A mixed cluster: ranks 0 and 1 swap on a machine with a core each, ranks 2 and 3
    (idle in this schedule) share one core on another. The crowded machine makes the
    profile one of shared cores, but the roomy machine's rounds keep their own price,
    two steps of 10 us; with its round's work (4 steps, 4 copies of 4 us) over its two
    cores they would cost 28 us."""
    from dataclasses import replace

    from topocoll.topology.profile import Machine

    rounds = 3
    topo = Topology.from_layout([2, 2])
    fast = LinkProfile(0.0, 1e-5, 1e-5)
    profile = Profile(links={"intra": fast, "inter": fast}, reduce_us_per_byte=0.0,
                      copy_us_per_byte=1e-3, overhead_us=10.0, topology=topo,
                      machines=(Machine((0, 1), 2), Machine((2, 3), 1)))
    programs = tuple(
        RankProgram(r, {"data": 1000, "tmp": 1000},
                    tuple((Send(1 - r, DATA, k), Recv(1 - r, TMP, k)) for k in range(rounds)),
                    tuple(range(rounds))) for r in (0, 1))
    programs += tuple(RankProgram(r, {"data": 1000, "tmp": 1000}, (), ()) for r in (2, 3))
    spec = {"collective": "all_reduce", "world_size": 4, "count": 1000}
    schedule = Schedule("all_reduce", "hand-made", programs, topo, spec)
    assert float(price(schedule, profile, ITEMSIZE)[0]) == pytest.approx(rounds * 20.0)
    crowded = replace(profile, machines=(Machine((0, 1), 1), Machine((2, 3), 1)))
    assert float(price(schedule, crowded, ITEMSIZE)[0]) == pytest.approx(rounds * 56.0)


def test_latency_under_load_is_not_charged_twice_on_shared_cores() -> None:
    """On a machine with more ranks than cores the concurrent probe's latency growth is
    ranks waiting for a core, which the floor charges: messages then pay the one-flow
    alpha. With a core per rank, or no machines known, the growth is the link's."""
    from dataclasses import replace

    from topocoll.topology.profile import Machine

    topology = Topology.from_layout([4, 4])
    link = LinkProfile(10.0, 0.0, 0.0, flows=4, shared_alpha_us=100.0)
    base = Profile(links={"intra": link, "inter": link}, reduce_us_per_byte=0.0,
                   copy_us_per_byte=0.0, overhead_us=0.0, topology=topology)
    spec = CollectiveSpec.all_to_all(8, 16)
    unknown = priced("pairwise", topology, spec, base, window=7)
    roomy = priced("pairwise", topology, spec,
                   replace(base, machines=(Machine(tuple(range(8)), 8),)), window=7)
    crowded = priced("pairwise", topology, spec,
                     replace(base, machines=(Machine(tuple(range(8)), 2),)), window=7)
    assert crowded == pytest.approx(10.0, rel=REL)  # one phase, every message alpha 10
    assert unknown == roomy > 10.0 * 1.5


def test_overhead_overlaps_the_wire_time() -> None:
    """The executor posts a phase's steps while earlier ones are in flight: a phase costs
    the larger of its posting time and its slowest message, not their sum."""
    p, per_peer = 4, 1000
    wire = LinkProfile(50.0, 1e-3, 1e-3)
    spec = CollectiveSpec.all_to_all(p, per_peer)
    slow_post = Profile(links={"inter": wire}, reduce_us_per_byte=0.0, copy_us_per_byte=0.0,
                        overhead_us=1.0)
    free_post = Profile(links={"inter": wire}, reduce_us_per_byte=0.0, copy_us_per_byte=0.0,
                        overhead_us=0.0)
    with_overhead = priced("pairwise", flat(p), spec, slow_post, window=1)
    without = priced("pairwise", flat(p), spec, free_post, window=1)
    assert with_overhead == pytest.approx(without, rel=REL), (
        f"2 steps x 1 us per phase hide under a 50 us alpha: {with_overhead} vs {without}")


# ----- vectors over scales ---------------------------------------------------------------
SCALES = [1.0, 2.0, 3.0, 16.0]


@pytest.mark.parametrize(("algorithm", "layout", "spec_of"), [
    ("ring", (1, 1, 1, 1), lambda p, k: CollectiveSpec.all_reduce(p, 64 * p * k)),
    ("rabenseifner", (1,) * 8, lambda p, k: CollectiveSpec.all_reduce(p, 64 * p * k)),
    ("tree", (1,) * 5, lambda p, k: CollectiveSpec.all_reduce(p, 101 * k)),
    ("hierarchical", (4, 4), lambda p, k: CollectiveSpec.all_reduce(p, 64 * p * k)),
    ("hierarchical_leader", (3, 5), lambda p, k: CollectiveSpec.all_reduce(p, 77 * k)),
    ("pairwise", (2, 2), lambda p, k: CollectiveSpec.all_to_all(p, 33 * k)),
    ("bruck", (1,) * 8, lambda p, k: CollectiveSpec.all_to_all(p, 33 * k)),
], ids=["ring", "rabenseifner", "tree", "hierarchical-4+4", "leader-3+5", "pairwise-2+2",
        "bruck"])
def test_a_price_vector_equals_pricing_each_scale(algorithm, layout, spec_of) -> None:
    """One schedule priced over scales == the schedules built at each size (counts that
    scale exactly, so the scaled schedule is the real one), a shaper's burst included: its
    bytes pass free at every size, so the vector is not linear in the scale."""
    topo = Topology.from_layout(list(layout))
    p = topo.world_size
    profile = Profile(links={"intra": LinkProfile(2.0, 1e-4, 3e-5),
                             "inter": LinkProfile(20.0, 1e-3, 1e-3, burst_bytes=3000.0)},
                      reduce_us_per_byte=2e-4, copy_us_per_byte=1e-4, overhead_us=0.7)
    base = build_schedule(algorithm, topo, spec_of(p, 1))
    vector = price(base, profile, ITEMSIZE, SCALES)
    one_by_one = [priced(algorithm, topo, spec_of(p, int(k)), profile) for k in SCALES]
    assert vector.shape == (len(SCALES),)
    np.testing.assert_allclose(vector, one_by_one, rtol=REL,
                               err_msg=f"{algorithm} on {layout} over scales {SCALES}")


# ----- topology awareness ----------------------------------------------------------------
@pytest.mark.parametrize("nbytes", [1 << 16, 1 << 20, 16 << 20], ids=["64K", "1M", "16M"])
def test_hierarchical_beats_flat_ring_when_the_network_is_slow(nbytes: int) -> None:
    """2 nodes x 4 ranks, the inter-node link 10x slower than inside a node: the flat ring
    pays the slow link in all 2(p-1) steps; hierarchical crosses it with 1/4 of the data
    per owner, once per direction."""
    topo = Topology.from_layout([4, 4])
    profile = Profile(links={"intra": LinkProfile(5.0, 1e-4, 1e-4 / 4),
                             "inter": LinkProfile(50.0, 1e-3, 1e-3)},
                      reduce_us_per_byte=1e-5, copy_us_per_byte=1e-5, overhead_us=0.0)
    spec = CollectiveSpec.all_reduce(8, nbytes // ITEMSIZE)
    ring = priced("ring", topo, spec, profile)
    hier = priced("hierarchical", topo, spec, profile)
    assert hier < 0.8 * ring, f"{nbytes}B: hierarchical {hier:.1f} us vs flat ring {ring:.1f} us"


# ----- refusals --------------------------------------------------------------------------
def test_a_deadlocking_schedule_is_refused() -> None:
    """Both ranks receive first and send afterwards: under rendezvous nobody can start."""
    topo = flat(2)
    sched = hand_schedule(topo, {0: [[Recv(1, TMP)], [Send(1, DATA)]],
                                 1: [[Recv(0, TMP)], [Send(0, DATA)]]}, 1000)
    with pytest.raises(CostModelError, match="deadlock"):
        price(sched, net_profile(alpha=1.0), ITEMSIZE)


def test_an_unmatched_send_is_refused() -> None:
    topo = flat(2)
    sched = hand_schedule(topo, {0: [[Send(1, DATA)]], 1: [[Copy(TMP, DATA)]]}, 1000)
    with pytest.raises(CostModelError, match="1 sends but 0 receives"):
        price(sched, net_profile(alpha=1.0), ITEMSIZE)
