"""The verifier can fail: real schedules, broken on purpose, raise the exact error class.

Every test first checks that the unbroken schedule verifies, so the error really comes
from the one change made to it, and that the message names the rank and the phase.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from topocoll.comm.algorithms import build_schedule
from topocoll.comm.algorithms.ring import ring_reduce_scatter
from topocoll.comm.collectives import CollectiveSpec
from topocoll.comm.plan import Plan, Scratch, finalize, regions_by_counts
from topocoll.comm.reference import random_inputs
from topocoll.comm.schedule import (
    Copy,
    Native,
    RankProgram,
    Recv,
    Reduce,
    Region,
    Scale,
    Schedule,
    Send,
    Step,
)
from topocoll.comm.verifier import (
    BoundsError,
    DeadlockError,
    RaceError,
    SizeMismatchError,
    VerificationError,
    WrongResultError,
    check_static,
    simulate,
    verify,
)
from topocoll.topology import Topology


# ----- helpers ------------------------------------------------------------------------
def locate(schedule: Schedule, kind: type, rank: int | None = None,
           where=lambda step: True) -> tuple[int, int, int, Step]:
    """(rank, phase, index, step) of the first step of `kind` matching `where`."""
    for program in schedule.programs:
        if rank is not None and program.rank != rank:
            continue
        for p, phase in enumerate(program.phases):
            for i, step in enumerate(phase):
                if isinstance(step, kind) and where(step):
                    return program.rank, p, i, step
    raise AssertionError(f"no {kind.__name__} in {schedule.algorithm}")


def all_steps(schedule: Schedule, kind: type) -> list[tuple[int, int, int, Step]]:
    return [(prog.rank, p, i, step) for prog in schedule.programs
            for p, phase in enumerate(prog.phases)
            for i, step in enumerate(phase) if isinstance(step, kind)]


def edit(schedule: Schedule, rank: int, phase: int, index: int,
         new: Step | None) -> Schedule:
    """The schedule with one step replaced (or dropped when `new` is None)."""
    program = schedule.programs[rank]
    steps = list(program.phases[phase])
    if new is None:
        del steps[index]
    else:
        steps[index] = new
    phases = list(program.phases)
    phases[phase] = tuple(steps)
    return with_program(schedule, replace(program, phases=tuple(phases)))


def append_phase(schedule: Schedule, rank: int, steps: list[Step]) -> Schedule:
    program = schedule.programs[rank]
    rounds = (*program.rounds, program.rounds[-1] + 1) if program.rounds else ()
    return with_program(schedule, replace(program, phases=(*program.phases, tuple(steps)),
                                          rounds=rounds))


def with_program(schedule: Schedule, program: RankProgram) -> Schedule:
    programs = list(schedule.programs)
    programs[program.rank] = program
    return replace(schedule, programs=tuple(programs))


def by_hand(spec: CollectiveSpec, phases: list[list[list[Step]]],
            buffers: dict[str, int] | None = None) -> Schedule:
    """A schedule written step by step: phases[rank] is that rank's list of phases."""
    programs = []
    for rank, rank_phases in enumerate(phases):
        declared = {**spec.user_buffers(rank), **(buffers or {})}
        programs.append(RankProgram(rank, declared, tuple(tuple(p) for p in rank_phases)))
    return Schedule(spec.collective, "by_hand", tuple(programs),
                    Topology.from_layout([spec.world_size]), spec.to_dict())


def ring_all_reduce(layout=(2, 2), count=16, op="sum") -> Schedule:
    topology = Topology.from_layout(layout)
    return build_schedule("ring", topology,
                          CollectiveSpec.all_reduce(topology.world_size, count, op))


def test_error_classes_share_a_base():
    for cls in (BoundsError, DeadlockError, RaceError, SizeMismatchError, WrongResultError):
        assert issubclass(cls, VerificationError)
    assert len({BoundsError, DeadlockError, RaceError, SizeMismatchError,
                WrongResultError}) == 5


# ----- WrongResultError ---------------------------------------------------------------
REDUCING_CASES = [
    ("all_reduce", "ring", (2, 2)), ("all_reduce", "recursive_doubling", (3, 3)),
    ("all_reduce", "rabenseifner", (5,)), ("all_reduce", "tree", (2, 3)),
    ("all_reduce", "hierarchical", (2, 3)), ("all_reduce", "hierarchical_leader", (3, 3)),
    ("reduce_scatter", "ring", (4,)), ("reduce_scatter", "direct", (2, 2)),
]


def reducing_schedule(collective: str, algorithm: str, layout) -> Schedule:
    topology = Topology.from_layout(layout)
    p = topology.world_size
    spec = (CollectiveSpec.all_reduce(p, 24) if collective == "all_reduce"
            else CollectiveSpec.reduce_scatter(p, [5, 0, 7, 3, 4, 6][:p] + [3] * (p - 6)))
    return build_schedule(algorithm, topology, spec)


@pytest.mark.parametrize(("collective", "algorithm", "layout"), REDUCING_CASES,
                         ids=[f"{c}-{a}-{'+'.join(map(str, lay))}"
                              for c, a, lay in REDUCING_CASES])
def test_every_dropped_reduce_is_caught(collective, algorithm, layout):
    """Each single Reduce of the schedule is needed: dropping any one is a wrong result."""
    schedule = reducing_schedule(collective, algorithm, layout)
    verify(schedule, "float64", seed=1)
    reduces = all_steps(schedule, Reduce)
    assert reduces, f"{algorithm} {collective} {layout}: no Reduce step"
    for rank, phase, index, _ in reduces:
        broken = edit(schedule, rank, phase, index, None)
        with pytest.raises(WrongResultError,
                           match=rf"{algorithm} {collective} \(float64, sum, "
                                 rf"{schedule.world_size} ranks\): rank \d+ has \d+ wrong"):
            verify(broken, "float64", seed=1)


def test_reduce_with_wrong_op_is_caught():
    schedule = ring_all_reduce()
    rank, phase, index, step = locate(schedule, Reduce)
    broken = edit(schedule, rank, phase, index, replace(step, op="max"))
    with pytest.raises(WrongResultError, match=r"rank \d+ has \d+ wrong element"):
        verify(broken, seed=3)


def test_missing_scale_for_avg_is_caught():
    topology = Topology.from_layout([2, 2])
    schedule = build_schedule("ring", topology, CollectiveSpec.all_reduce(4, 16, "avg"))
    verify(schedule, "float32")
    rank, phase, index, _ = locate(schedule, Scale, rank=2)
    with pytest.raises(WrongResultError, match="rank 2 has"):
        verify(edit(schedule, rank, phase, index, None), "float32")


def test_all_to_all_that_modifies_its_input_is_caught():
    spec = CollectiveSpec.all_to_all(4, 3)
    schedule = build_schedule("pairwise", Topology.from_layout([2, 2]), spec)
    verify(schedule)
    # After the exchange is complete, scribble the first received block over the input:
    # every output is still right, only the input changed.
    broken = append_phase(schedule, 1, [Copy(Region("in", 0, 3), Region("out", 0, 3))])
    with pytest.raises(WrongResultError, match="rank 1's input buffer was modified"):
        verify(broken)


def test_reduce_scatter_in_place_on_its_input_is_caught():
    """Reducing inside `in` then copying out gives the right output but clobbers `in`."""
    counts = [3, 5, 4]
    spec = CollectiveSpec.reduce_scatter(3, counts)
    plan, scratch = Plan(), Scratch()
    parts = [[r] for r in regions_by_counts("in", counts)]
    ring_reduce_scatter(plan, scratch, [0, 1, 2], parts, "sum")  # in place: out=None
    offsets = [0, 3, 8]
    for rank in range(3):
        plan.add(rank, [Copy(Region("out", 0, counts[rank]),
                             Region("in", offsets[rank], counts[rank]))])
    schedule = finalize(plan, scratch, spec, Topology.from_layout([3]), "in_place_rs")
    with pytest.raises(WrongResultError, match=r"rank \d's input buffer was modified"):
        verify(schedule, "int64")


def test_off_by_one_reduce_scatter_block_is_caught():
    """Block 1 starting one element late is in bounds, race-free, and wrong."""
    counts = [5, 5, 5, 5]
    spec = CollectiveSpec.reduce_scatter(4, counts)

    def build(shift: int) -> Schedule:
        plan, scratch = Plan(), Scratch()
        parts = [[r] for r in regions_by_counts("in", counts)]
        parts[1] = [Region("in", parts[1][0].offset + shift, counts[1])]
        ring_reduce_scatter(plan, scratch, [0, 1, 2, 3], parts, "sum",
                            out=lambda i: [Region("out", 0, counts[i])])
        return finalize(plan, scratch, spec, Topology.from_layout([2, 2]), "ring_shifted")

    verify(build(0), "int32")
    with pytest.raises(WrongResultError, match=r"rank 1 has 5 wrong element\(s\)"):
        verify(build(1), "int32")


def test_unwritten_scratch_is_caught():
    """Reading `tmp` before anything landed there reads the verifier's garbage."""
    spec = CollectiveSpec.all_reduce(2, 4)
    recv_then_reduce = [
        [[Send(1, Region("data", 0, 4)), Recv(1, Region("tmp", 0, 4))],
         [Reduce(Region("data", 0, 4), (Region("data", 0, 4), Region("tmp", 4, 4)), "sum")]],
        [[Send(0, Region("data", 0, 4)), Recv(0, Region("tmp", 0, 4))],
         [Reduce(Region("data", 0, 4), (Region("data", 0, 4), Region("tmp", 0, 4)), "sum")]],
    ]
    with pytest.raises(WrongResultError, match="rank 0 has 4 wrong"):
        verify(by_hand(spec, recv_then_reduce, {"tmp": 8}))


# ----- DeadlockError ------------------------------------------------------------------
def exchange(order: str) -> list[list[list[Step]]]:
    """Two ranks swapping 4 elements and summing; `order` per rank: 'rs', 'sr' or 'both'."""
    programs = []
    for rank in range(2):
        peer = 1 - rank
        send = Send(peer, Region("data", 0, 4))
        recv = Recv(peer, Region("tmp", 0, 4))
        reduce = Reduce(Region("data", 0, 4), (Region("data", 0, 4), Region("tmp", 0, 4)),
                        "sum")
        kind = order[rank] if len(order) == 2 else order
        if kind == "r":  # recv first, then send, in separate phases
            programs.append([[recv], [send, reduce]])
        elif kind == "s":
            programs.append([[send], [recv, reduce]])
        else:
            programs.append([[send, recv, reduce]])
    return programs


@pytest.mark.parametrize("order", ["rr", "ss"])
def test_both_wait_before_they_act_deadlocks(order):
    """Recv-then-send on both ranks never matches; with rendezvous semantics neither does
    send-then-recv (a blocking transport would hang on large messages)."""
    schedule = by_hand(CollectiveSpec.all_reduce(2, 4), exchange(order), {"tmp": 4})
    verb = "recv of 4 from" if order == "rr" else "send of 4 to"
    with pytest.raises(DeadlockError, match=rf"rank 0 phase 0: {verb} rank 1") as info:
        verify(schedule)
    assert f"rank 1 phase 0: {verb} rank 0" in str(info.value)


@pytest.mark.parametrize("order", ["sr", "rs", "both"])
def test_matching_orders_do_not_deadlock(order):
    schedule = by_hand(CollectiveSpec.all_reduce(2, 4), exchange(order), {"tmp": 4})
    report = verify(schedule)
    assert report.messages == 2


@pytest.mark.parametrize("algorithm", ["ring", "tree", "hierarchical", "recursive_doubling"])
def test_dropped_send_leaves_a_peer_waiting(algorithm):
    topology = Topology.from_layout([2, 3])
    schedule = build_schedule(algorithm, topology, CollectiveSpec.all_reduce(5, 10))
    verify(schedule)
    # The last send of rank 2 is the last on its channel: nothing after it shifts.
    rank, phase, index, send = [s for s in all_steps(schedule, Send) if s[0] == 2][-1]
    with pytest.raises(DeadlockError,
                       match=rf"rank {send.peer} phase \d+: recv of \d+ from rank {rank} "
                             rf"tag {send.tag} has no matching send"):
        verify(edit(schedule, rank, phase, index, None))


def test_dropped_recv_leaves_a_sender_waiting():
    schedule = ring_all_reduce((4,), 8)
    rank, phase, index, recv = [s for s in all_steps(schedule, Recv) if s[0] == 3][-1]
    with pytest.raises(DeadlockError,
                       match=rf"rank {recv.peer} phase \d+: send of 2 to rank 3 tag 0 "
                             "has no matching recv"):
        verify(edit(schedule, rank, phase, index, None))


def test_wrong_tag_deadlocks():
    schedule = ring_all_reduce((3,), 9)
    rank, phase, index, recv = locate(schedule, Recv, rank=1)
    with pytest.raises(DeadlockError, match="tag 5 has no matching send"):
        verify(edit(schedule, rank, phase, index, replace(recv, tag=5)))


def test_native_collective_missing_a_member_deadlocks():
    topology = Topology.from_layout([2, 2])
    schedule = build_schedule("hierarchical", topology, CollectiveSpec.all_reduce(4, 8),
                              inter="native")
    verify(schedule)
    rank, phase, index, native = locate(schedule, Native, rank=2)
    with pytest.raises(DeadlockError, match=rf"native collective on \[\d, \d\]: ranks "
                                            rf"\[\d\] wait for \[{rank}\]"):
        verify(edit(schedule, rank, phase, index, None))
    assert rank in native.group


# ----- SizeMismatchError --------------------------------------------------------------
def test_recv_of_the_wrong_size():
    spec = CollectiveSpec.all_to_all(3, 5)
    schedule = build_schedule("pairwise", Topology.from_layout([3]), spec)
    verify(schedule)
    rank, phase, index, recv = locate(schedule, Recv, rank=2)
    short = replace(recv, dst=Region(recv.dst.buf, recv.dst.offset, recv.dst.count - 1))
    with pytest.raises(SizeMismatchError,
                       match=rf"rank {recv.peer} phase {phase} sends 5 elements .* to rank 2 "
                             rf"tag 0, whose phase {phase} receives 4"):
        verify(edit(schedule, rank, phase, index, short))


def test_reduce_of_different_sizes_is_caught_statically():
    schedule = ring_all_reduce()
    rank, phase, index, step = locate(schedule, Reduce, rank=1)
    src = step.srcs[1]
    broken = edit(schedule, rank, phase, index,
                  replace(step, srcs=(step.srcs[0], Region(src.buf, src.offset, src.count - 1))))
    with pytest.raises(SizeMismatchError, match=rf"rank 1 phase {phase}: reduce into"):
        check_static(broken)


def test_copy_that_changes_size():
    spec = CollectiveSpec.all_to_all(2, 3)
    schedule = build_schedule("pairwise", Topology.from_layout([2]), spec)
    rank, phase, index, copy = locate(schedule, Copy, rank=0)
    broken = edit(schedule, rank, phase, index, Copy(copy.dst, Region("in", 0, 2)))
    with pytest.raises(SizeMismatchError, match="rank 0 phase 0: copy in"):
        verify(broken)


def test_native_members_that_disagree():
    topology = Topology.from_layout([2, 2])
    schedule = build_schedule("hierarchical_leader", topology,
                              CollectiveSpec.all_reduce(4, 8), inter="native")
    rank, phase, index, native = locate(schedule, Native, rank=2)
    with pytest.raises(SizeMismatchError, match="rank 2 joined with different arguments"):
        verify(edit(schedule, rank, phase, index, replace(native, op="max")))


# ----- BoundsError --------------------------------------------------------------------
def test_region_past_the_end_of_its_buffer():
    schedule = ring_all_reduce((2, 2), 16)
    rank, phase, index, send = locate(schedule, Send, rank=1)
    past = replace(send, src=Region("data", 16 - send.src.count + 1, send.src.count))
    with pytest.raises(BoundsError,
                       match=rf"rank 1 phase {phase}: Send region data\[\d+:17\] outside "
                             r"'data' of 16 elements"):
        verify(edit(schedule, rank, phase, index, past))


def test_scratch_region_past_its_declared_size():
    schedule = ring_all_reduce((3,), 9)
    size = schedule.programs[0].buffers["tmp"]
    rank, phase, index, recv = locate(schedule, Recv, rank=0)
    past = replace(recv, dst=Region("tmp", size, recv.dst.count))
    with pytest.raises(BoundsError, match=rf"rank 0 phase {phase}: Recv region tmp\["):
        verify(edit(schedule, rank, phase, index, past))


def test_negative_offset_and_undeclared_buffer():
    schedule = ring_all_reduce((2,), 4)
    rank, phase, index, send = locate(schedule, Send, rank=0)
    with pytest.raises(BoundsError, match="outside 'data'"):
        check_static(edit(schedule, rank, phase, index,
                          replace(send, src=Region("data", -1, 2))))
    with pytest.raises(BoundsError, match="undeclared buffer 'scratch'"):
        check_static(edit(schedule, rank, phase, index,
                          replace(send, src=Region("scratch", 0, 2))))


def test_inputs_of_the_wrong_size():
    schedule = ring_all_reduce((2,), 4)
    inputs = [np.ones(4, np.float32), np.ones(5, np.float32)]
    with pytest.raises(BoundsError, match="rank 1: 'data' buffer declared for 4 elements, "
                                          "input has 5"):
        simulate(schedule, inputs, "float32")


# ----- RaceError ----------------------------------------------------------------------
def test_recv_overlapping_a_send_in_the_same_phase():
    topology = Topology.from_layout([4])
    schedule = build_schedule("recursive_doubling", topology, CollectiveSpec.all_reduce(4, 8))
    verify(schedule)
    rank, phase, index, recv = locate(schedule, Recv, rank=2)
    into_data = replace(recv, dst=Region("data", 0, recv.dst.count))
    with pytest.raises(RaceError, match=rf"rank 2 phase {phase}: recv into data\[0:8\] from "
                                        rf"rank {recv.peer} overlaps data\[0:8\]"):
        verify(edit(schedule, rank, phase, index, into_data))


def test_recv_listed_before_the_send_it_overlaps():
    spec = CollectiveSpec.all_reduce(2, 4)
    phases = []
    for rank in range(2):
        phases.append([[Recv(1 - rank, Region("data", 2, 2)),
                        Send(1 - rank, Region("data", 0, 4))]])
    with pytest.raises(RaceError, match=r"rank 0 phase 0: send of data\[0:4\] races with a "
                                        r"recv into data\[2:4\]"):
        verify(by_hand(spec, phases))


def test_two_recvs_into_the_same_place():
    spec = CollectiveSpec.all_reduce(3, 4)
    phases = [
        [[Recv(1, Region("tmp", 0, 4)), Recv(2, Region("tmp", 2, 4))]],
        [[Send(0, Region("data", 0, 4))]],
        [[Send(0, Region("data", 0, 4))]],
    ]
    with pytest.raises(RaceError, match=r"rank 0 phase 0: recv into tmp\[2:6\] from rank 2 "
                                        r"overlaps tmp\[0:4\]"):
        verify(by_hand(spec, phases, {"tmp": 6}))


def test_partially_overlapping_reduce_and_copy():
    spec = CollectiveSpec.all_reduce(1, 8)
    reduce = Reduce(Region("data", 0, 4), (Region("data", 2, 4),), "sum")
    with pytest.raises(RaceError, match="rank 0 phase 0: reduce into data"):
        check_static(by_hand(spec, [[[reduce]]]))
    copy = Copy(Region("data", 0, 4), Region("data", 3, 4))
    with pytest.raises(RaceError, match=r"rank 0 phase 0: copy data\[3:7\] -> data\[0:4\]"):
        check_static(by_hand(spec, [[[copy]]]))


def test_native_sharing_a_phase_with_a_send():
    topology = Topology.from_layout([2, 2])
    schedule = build_schedule("hierarchical", topology, CollectiveSpec.all_reduce(4, 8),
                              inter="native")
    rank, phase, _, _ = locate(schedule, Native, rank=0)
    program = schedule.programs[rank]
    phases = list(program.phases)
    phases[phase] = (*phases[phase], Send(1, Region("data", 0, 1)))
    broken = with_program(schedule, replace(program, phases=tuple(phases)))
    with pytest.raises(RaceError, match=rf"rank 0 phase {phase}: a native collective must be"):
        verify(broken)


# ----- other refusals -----------------------------------------------------------------
def test_peer_outside_the_world():
    schedule = ring_all_reduce((2,), 4)
    rank, phase, index, send = locate(schedule, Send, rank=0)
    with pytest.raises(VerificationError, match=r"rank 0: Send names peer 7 outside 0..1"):
        verify(edit(schedule, rank, phase, index, replace(send, peer=7)))


def test_explicit_inputs_are_used_and_compared():
    schedule = ring_all_reduce((3,), 6)
    spec = CollectiveSpec.all_reduce(3, 6)
    inputs = random_inputs(spec, "float64", seed=5)
    report = verify(schedule, "float64", inputs=inputs)
    assert report.messages == 2 * 2 * 3
    sim = simulate(schedule, inputs, "float64")
    np.testing.assert_allclose(sim.buffers[0]["data"], sum(inputs), rtol=1e-12)
    for rank in range(3):
        np.testing.assert_array_equal(sim.buffers[rank]["data"], sim.buffers[0]["data"])
