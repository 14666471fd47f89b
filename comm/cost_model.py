"""The cost model: what a schedule costs on a topology with a measured profile.

It reads the schedule IR and nothing else (no knowledge of specific algorithms), so every
generator is priced the moment it exists. The model is alpha-beta per link class with
three refinements that matter on real clusters:

- **rendezvous**: a message starts when both its sender and its receiver have reached
  the phase that holds it, so a slow rank delays its partners (per-rank clocks, priced
  in dependency order, as the executor runs them);
- **link sharing**: messages of one phase (the unit of concurrency in the IR) that cross
  the same shared resource share its bandwidth: a node's uplink per rail and direction,
  a node's memory system for intra-node copies, and each rank's own injection and
  ejection bandwidth. A message then takes `alpha + max(bytes * beta, load(resource) *
  shared_beta for each resource it shares with others)`: the busiest resource sets the
  pace (a message alone on a resource runs at the one-flow rate, `beta`, or at the
  measured `duplex_beta` when its pair sends the other way in the same round, or its
  uplink carries traffic the other way in that round: `_duplex`);
- **latency under load**: a message's alpha grows with the messages that share its
  busiest resource in the phase, as measured by the profiler's concurrent probe (not on
  a machine with more ranks than cores, where that growth is the ranks' wait for a core,
  which the shared-core floor below charges instead);
- **latency hidden under the previous phase**: the dataflow executor posts a phase's
  messages while the phase before is still in flight (`TOPOCOLL_LOOKAHEAD`, one phase
  ahead), so when a phase touches nothing its predecessor touches (pairwise's steps,
  each to another peer from other blocks), its messages' latency runs during the
  predecessor's transfer and only their bytes wait for it. Over MPI the executor runs
  phase by phase (`MPITransport.preferred_executor`), so there every phase pays its own
  latency. Without this, a pairwise all-to-all of 128 KiB blocks on 2x4 was priced
  seven latencies (4.8 ms) above the 17.3 ms measured (+26%);
- **a shaper's burst**: a link behind a token bucket (`LinkProfile.burst_bytes`, fitted
  by the profiler; tc's tbf on the emulated cluster) passes its bucket at once after its
  uplinks rested for a round, so a lone crossing of a binomial tree at 1 MiB costs 2 ms
  less than its bytes at the line rate say (`_burst_free`); a ring's busy uplinks get none;
- **CPU costs**: a per-step overhead of the executor/transport and the local reduce and
  copy steps (gamma per byte), measured by the profiler;
- **shared cores**: ranks that share a machine (the profile's `machines`: an emulated
  cluster's nodes on one host, more ranks than cores) cannot finish before the machine
  has done all their per-step work, so no price is below that work over its cores.
  Per rank the path rules at large sizes; at small ones, on 8 ranks over 2 cores, this
  floor does (a flat all-to-all of 1 KiB blocks is 112 steps of Python, not 14 latencies).
  The same holds round by round: no phase ends before its machine has done that round's
  steps, reduces, copies and shared-memory copies of all its ranks (`_round_floors`):
  `hierarchical`'s intra-node phases, every rank moving three blocks at once, are paced
  by the cores (measured 2.9 and 4.8 ms at 1 MiB, priced 1.5 and 1.3 without it).

Prices are vectors over `scales`: every byte count of the schedule multiplied by each
scale, so one schedule built at a reference size prices a whole size sweep at once (the
simulator uses this; the tuner builds the exact schedule per size).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from topocoll.topology import Level, Topology
from topocoll.topology.profile import Profile

from .schedule import Copy, Native, Recv, Reduce, Region, Scale, Schedule, Send

# Transports whose executor runs phase by phase (`preferred_executor = "phased"`): no
# phase is posted before the previous one completes, so no latency is hidden.
PHASED_TRANSPORTS = frozenset({"mpi"})


class CostModelError(ValueError):
    pass


@dataclass(frozen=True)
class _Message:
    src: int
    src_phase: int
    dst: int
    dst_phase: int
    nbytes: float
    level: Level
    round: int  # the sender phase's round: messages of one round are in flight together


@dataclass
class _NativeCall:
    group: tuple[int, ...]
    phases: dict[int, int]  # member -> its phase index
    alpha_us: float
    per_scale_us: float


def price(schedule: Schedule, profile: Profile, itemsize: int,
          scales: Sequence[float] | np.ndarray = (1.0,)) -> np.ndarray:
    """Predicted time in microseconds of the slowest rank, one value per scale."""
    scale = np.asarray(scales, dtype=float)
    topology = schedule.topology
    messages = _match_messages(schedule, itemsize)
    natives = _native_calls(schedule, profile, itemsize)
    durations = _message_costs(messages, topology, profile)
    by_rank_phase: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, m in enumerate(messages):
        by_rank_phase[m.src, m.src_phase].append(index)
        if m.dst != m.src:
            by_rank_phase[m.dst, m.dst_phase].append(index)
    native_at: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, call in enumerate(natives):
        for member, phase in call.phases.items():
            native_at[member, phase].append(index)
    local = _local_costs(schedule, profile, itemsize)
    comm_steps = [[sum(1 for s in ph if isinstance(s, (Send, Recv, Native)))
                   for ph in prog.phases] for prog in schedule.programs]
    ahead = [_posted_ahead(prog.phases) if posts_ahead(profile) else [False] * len(prog.phases)
             for prog in schedule.programs]
    floors = _round_floors(schedule, profile, messages, local, comm_steps)
    path = _simulate(schedule, messages, durations, natives, by_rank_phase, native_at,
                     local, comm_steps, ahead, profile.overhead_us, scale, floors)
    return np.maximum(path, _shared_core_floor(schedule, profile, comm_steps, scale))


def _shared_core_floor(schedule: Schedule, profile: Profile, comm_steps: list[list[int]],
                       scale: np.ndarray) -> np.ndarray:
    """The busiest machine's per-step CPU work (every step of its ranks, at the overhead
    measured on one idle pair) over its cores. Local copies and reduces are left out:
    their gamma is measured with every rank computing at once, so the per-rank path
    already holds their share of the cores. Zero unless `shares_cores`."""
    floor = np.zeros_like(scale)
    for ranks, cores in _crowded_machines(schedule, profile):
        steps = sum(sum(comm_steps[r]) for r in ranks)
        floor = np.maximum(floor, steps * profile.overhead_us / cores)
    return floor


def _crowded_machines(schedule: Schedule, profile: Profile) -> list[tuple[list[int], int]]:
    """(ranks, cores) of each machine with more of the schedule's ranks than cores, the
    only machines both CPU floors charge: on one with a core per rank the per-rank path
    already holds that work. None unless `shares_cores`. One test for both floors, so
    they cannot drift apart again (the round floor once charged roomy machines too)."""
    if not shares_cores(profile, schedule.topology):
        return []
    crowded = []
    for machine in profile.machines:
        ranks = [r for r in machine.ranks if r < schedule.world_size]
        if len(ranks) > machine.cores:
            crowded.append((ranks, machine.cores))
    return crowded


def _round_floors(schedule: Schedule, profile: Profile, messages: list[_Message],
                  local: list[list[float]], comm_steps: list[list[int]]
                  ) -> list[list[tuple[float, float]]] | None:
    """Per rank and phase, (fixed us, us per unit scale) below which the phase cannot end:
    all the CPU work that the ranks of its machine do in that round (each step's
    overhead, each reduce and copy, each intra-node message copied in and out) over the
    machine's cores. None unless `shares_cores`; zero on a machine with a core per rank
    (as in `_shared_core_floor`: there the per-rank path already holds that work).

    Why: with eight ranks on two cores a round in which every rank works at once is paced
    by the cores, which the per-message figures (probed one pair or one block at a time)
    do not see. Timing each phase of a 1 MiB `hierarchical` all-reduce on 2x4, its
    intra-node `direct` phases (three 256 KiB blocks out and in per rank, all ranks at
    once) took 2.9 and 4.8 ms where the model said 1.5 and 1.3, so the whole call was
    priced 26-46% under in five full runs. Re-priced with this floor (and the shaper's
    burst), the rows from 1 MiB within 25% went 132->134, 130->133, 130->132, 126->127
    and 129->129 of 136 in those runs (the last turned two `hierarchical` misses into two
    `node_leader` ones)."""
    if not shares_cores(profile, schedule.topology):
        return None
    machine_of: dict[int, int] = {}
    cores: dict[int, int] = {}
    for k, (ranks, machine_cores) in enumerate(_crowded_machines(schedule, profile)):
        for r in ranks:
            machine_of[r] = k
        cores[k] = machine_cores

    def key(rank: int, phase: int) -> tuple[int, int]:
        return machine_of[rank], schedule.programs[rank].round_of(phase)

    fixed: dict[tuple[int, int], float] = defaultdict(float)
    scaled: dict[tuple[int, int], float] = defaultdict(float)
    for prog in schedule.programs:
        if prog.rank not in machine_of:  # a roomy machine's ranks: no floor to sum up
            continue
        for j in range(len(prog.phases)):
            fixed[key(prog.rank, j)] += comm_steps[prog.rank][j] * profile.overhead_us
            scaled[key(prog.rank, j)] += local[prog.rank][j]
    for m in messages:
        if m.level.kind == "intra":  # a shared-memory message is a copy on each side
            for rank, phase in ((m.src, m.src_phase), (m.dst, m.dst_phase)):
                if rank in machine_of:
                    scaled[key(rank, phase)] += m.nbytes * profile.copy_us_per_byte
    out = []
    for prog in schedule.programs:
        if prog.rank not in machine_of:
            out.append([(0.0, 0.0)] * len(prog.phases))
            continue
        share = cores[machine_of[prog.rank]]
        out.append([(fixed[key(prog.rank, j)] / share, scaled[key(prog.rank, j)] / share)
                    for j in range(len(prog.phases))])
    return out


def _simulate(schedule: Schedule, messages: list[_Message],
              durations: list[tuple[float, float, float]], natives: list[_NativeCall],
              by_rank_phase: dict[tuple[int, int], list[int]],
              native_at: dict[tuple[int, int], list[int]],
              local: list[list[float]], comm_steps: list[list[int]],
              ahead: list[list[bool]], overhead_us: float, scale: np.ndarray,
              floors: list[list[tuple[float, float]]] | None = None) -> np.ndarray:
    """Advance every rank's clock phase by phase, in an order that respects rendezvous.

    A message's bytes flow once both ends have reached its phase; its latency runs from
    when both ends posted it, which is the start of their previous phase where the
    executor posts ahead (`ahead`), and that phase's start otherwise."""
    p = schedule.world_size
    n_phases = [len(prog.phases) for prog in schedule.programs]
    starts: list[dict[int, np.ndarray]] = [{} for _ in range(p)]

    def posted(rank: int, phase: int) -> np.ndarray:
        return starts[rank][phase - 1 if ahead[rank][phase] else phase]

    clock = [np.zeros_like(scale) for _ in range(p)]
    position = [0] * p
    for r in range(p):
        if n_phases[r]:
            starts[r][0] = clock[r]
    remaining = sum(1 for r in range(p) if n_phases[r])
    while remaining:
        progressed = False
        for r in range(p):
            while position[r] < n_phases[r]:
                i = position[r]
                msgs = by_rank_phase.get((r, i), ())
                calls = native_at.get((r, i), ())
                if not _partners_ready(r, msgs, calls, messages, natives, starts):
                    break
                start = starts[r][i]
                end = start + comm_steps[r][i] * overhead_us
                for index in msgs:
                    m = messages[index]
                    alpha, per_scale, free = durations[index]
                    begin = np.maximum(starts[m.src][m.src_phase], starts[m.dst][m.dst_phase])
                    latency_from = np.maximum(posted(m.src, m.src_phase),
                                              posted(m.dst, m.dst_phase))
                    end = np.maximum(end, np.maximum(begin, latency_from + alpha)
                                     + per_scale * np.maximum(scale - free, 0.0))
                for index in calls:
                    call = natives[index]
                    begin = np.max([starts[q][ph] for q, ph in call.phases.items()], axis=0)
                    end = np.maximum(end, begin + call.alpha_us + call.per_scale_us * scale)
                if floors is not None:
                    fixed, per_scale_floor = floors[r][i]
                    end = np.maximum(end, start + fixed + per_scale_floor * scale)
                clock[r] = end + local[r][i] * scale
                position[r] = i + 1
                progressed = True
                if position[r] < n_phases[r]:
                    starts[r][position[r]] = clock[r]
                else:
                    remaining -= 1
        if not progressed:
            stuck = [r for r in range(p) if position[r] < n_phases[r]]
            raise CostModelError(f"{schedule.algorithm}: ranks {stuck[:8]} wait on each "
                                 "other (the schedule deadlocks under rendezvous)")
    return np.max(clock, axis=0)


def posts_ahead(profile: Profile) -> bool:
    """Whether the executor over the profile's transport posts a phase before the
    previous one completes (the dataflow executor does; the phased one, over MPI, not)."""
    return profile.transport not in PHASED_TRANSPORTS


def _posted_ahead(phases: Sequence[Sequence[object]]) -> list[bool]:
    """Per phase: whether it touches nothing the phase before touches (no region one
    writes and the other reads or writes, no native collective in either), so the
    executor can post it while that phase is in flight. Only the previous phase
    matters: earlier ones are done by the time it starts."""
    out = [False] * len(phases)
    for i in range(1, len(phases)):
        before, now = _accesses(phases[i - 1]), _accesses(phases[i])
        out[i] = before is not None and now is not None and not _conflicts(before, now)
    return out


def _accesses(phase: Sequence[object]) -> tuple[list[Region], list[Region]] | None:
    """(regions read, regions written) by a phase's steps; None if it holds a native
    collective (which orders everything around it)."""
    reads: list[Region] = []
    writes: list[Region] = []
    for step in phase:
        if isinstance(step, Native):
            return None
        if isinstance(step, Send):
            reads.append(step.src)
        elif isinstance(step, Recv):
            writes.append(step.dst)
        elif isinstance(step, Reduce):
            reads.extend(step.srcs)
            writes.append(step.dst)
        elif isinstance(step, Copy):
            reads.append(step.src)
            writes.append(step.dst)
        elif isinstance(step, Scale):
            reads.append(step.dst)
            writes.append(step.dst)
    return reads, writes


def _conflicts(a: tuple[list[Region], list[Region]],
               b: tuple[list[Region], list[Region]]) -> bool:
    (a_reads, a_writes), (b_reads, b_writes) = a, b
    return (any(w.overlaps(r) for w in a_writes for r in (*b_reads, *b_writes))
            or any(r.overlaps(w) for r in a_reads for w in b_writes))


def _partners_ready(rank: int, msgs: Sequence[int], calls: Sequence[int],
                    messages: list[_Message], natives: list[_NativeCall],
                    starts: list[dict[int, np.ndarray]]) -> bool:
    for index in msgs:
        m = messages[index]
        other, phase = (m.dst, m.dst_phase) if m.src == rank else (m.src, m.src_phase)
        if phase not in starts[other]:
            return False
    for index in calls:
        if any(ph not in starts[q] for q, ph in natives[index].phases.items()):
            return False
    return True


# ----- what the schedule moves --------------------------------------------------------
def _match_messages(schedule: Schedule, itemsize: int) -> list[_Message]:
    """Pair sends with receives in order per (sender, receiver, tag) channel."""
    sends: dict[tuple[int, int, int], list[tuple[int, Send]]] = defaultdict(list)
    recvs: dict[tuple[int, int, int], list[tuple[int, Recv]]] = defaultdict(list)
    for prog in schedule.programs:
        for i, phase in enumerate(prog.phases):
            for step in phase:
                if isinstance(step, Send):
                    sends[prog.rank, step.peer, step.tag].append((i, step))
                elif isinstance(step, Recv):
                    recvs[step.peer, prog.rank, step.tag].append((i, step))
    out: list[_Message] = []
    topology = schedule.topology
    for key, posted in sends.items():
        wanted = recvs.get(key, [])
        if len(wanted) != len(posted):
            raise CostModelError(f"{schedule.algorithm}: channel {key} has {len(posted)} sends "
                                 f"but {len(wanted)} receives")
        src, dst, _ = key
        for (si, send), (ri, _recv) in zip(posted, wanted):
            level = send.level or topology.level(src, dst)
            out.append(_Message(src, si, dst, ri, float(send.src.count * itemsize), level,
                                schedule.programs[src].round_of(si)))
    return out


def _resources(m: _Message, topology: Topology) -> list[tuple[str, ...]]:
    """The shared resources a message occupies besides its own endpoints."""
    if m.level.kind == "inter":
        rail = str(m.level.rail or 0)
        return [("up", str(topology.node_of[m.src]), rail),
                ("down", str(topology.node_of[m.dst]), rail)]
    if m.level.kind == "intra":
        return [("mem", str(topology.node_of[m.src]))]
    return []


def _duplex(m: _Message, topology: Topology, both_ways: set[tuple[int, int, int]],
            load: dict[tuple[int, tuple[str, ...]], float]) -> bool:
    """Whether `m` runs at the two-way rate (`duplex_beta`): its pair sends the other way
    in the same round, or, between nodes, either end's uplink (per rail) also carries
    traffic the other way in that round, as in a ring across nodes (node 0's uplink
    sends 3->4 while it receives 7->0, though no pair swaps).

    Why the second case: priced one-way, ring all-reduces of 16-256 MiB on 2x4 were
    11-27% under the measured time in three full runs, and at the two-way rate 0-19%.
    Before the profiler fitted the shaper's burst, the one-way figure came out above the
    line rate (the burst flattered single messages after an idle link), and a ring's
    steps stream back to back. Which effect rules is not settled (the profiler saw two
    connections, one per direction, reach the line rate); the price is what the
    measurements support. Ring rows at 1-4 MiB moved the other way (to +2..+18%)."""
    if (m.round, m.dst, m.src) in both_ways:
        return True
    if m.level.kind != "inter":
        return False
    # The same uplinks `_resources` names, the other way: node src's "down", node dst's "up".
    return any((m.round, (_OTHER_WAY[way], *where)) in load
               for way, *where in _resources(m, topology))


_OTHER_WAY = {"up": "down", "down": "up"}


def _message_costs(messages: list[_Message], topology: Topology, profile: Profile
                   ) -> list[tuple[float, float, float]]:
    """(alpha, microseconds per unit scale, the scale that passes free) of every message,
    link sharing and a shaper's burst (`_burst_free`) included.

    Concurrency is judged per round of the sender's phase: the messages of one round are
    in flight together (the executor posts a phase's communication at once, and ranks
    are in step round by round). Not per phase index: a rank's empty phases are dropped,
    so on 3+5 nodes a binomial broadcast's 0->4 and, two rounds later, 2->3 were both
    its senders' fourth phase and were priced as sharing the uplink (tree +49..71%).
    """
    cores_shared = shares_cores(profile, topology)
    load: dict[tuple[int, tuple[str, ...]], float] = defaultdict(float)
    crowd: dict[tuple[int, tuple[str, ...]], int] = defaultdict(int)
    # A rank's own injection/ejection, per link class: its NIC and its memory copies are
    # different engines (a rank sending inter-node while copying intra-node does both).
    inject: dict[tuple[int, int, str, str], float] = defaultdict(float)
    for m in messages:
        if m.level.kind == "self":
            continue
        for res in _resources(m, topology):
            load[m.round, res] += m.nbytes
            crowd[m.round, res] += 1
        inject[m.round, m.src, "out", m.level.kind] += m.nbytes
        inject[m.round, m.dst, "in", m.level.kind] += m.nbytes
    both_ways = {(m.round, m.src, m.dst) for m in messages}
    last_round = max((m.round for m in messages), default=0)
    out: list[tuple[float, float, float]] = []
    for m in messages:
        link = profile.link(m.level)
        if m.level.kind == "self":
            out.append((0.0, m.nbytes * profile.copy_us_per_byte, 0.0))
            continue
        beta = (link.duplex_beta if _duplex(m, topology, both_ways, load)
                else link.beta_us_per_byte)
        per_scale = max(inject[m.round, m.src, "out", m.level.kind],
                        inject[m.round, m.dst, "in", m.level.kind]) * beta
        for res in _resources(m, topology):
            shared = load[m.round, res]
            if shared > m.nbytes:  # not alone on it: the resource's aggregate rate rules
                per_scale = max(per_scale, shared * link.shared_beta_us_per_byte)
        busiest = max((crowd[m.round, res] for res in _resources(m, topology)),
                      default=1)
        out.append((link.alpha_with(1 if cores_shared else busiest), per_scale,
                    _burst_free(m, topology, link.burst_bytes, load, last_round)))
    return out


def _burst_free(m: _Message, topology: Topology, burst: float,
                load: dict[tuple[int, tuple[str, ...]], float], last_round: int) -> float:
    """How much of the message's reference size passes at once through a rate shaper's
    bucket (`LinkProfile.burst_bytes`), as a scale: 0 when the link has no burst.

    Only between nodes (the shaper sits on the uplinks), and only after the uplinks it
    crosses rested: neither carried anything in the round before (for round 0, the last
    round: back-to-back calls). The bucket is shared in proportion to bytes by the
    messages of the round on the busiest of them. Why: a binomial tree's two lone 1 MiB
    crossings were priced 21-32% above the measured all-reduce in five full runs; a
    ring, whose uplinks never rest, gets nothing. The round is the unit, not the time
    the link rested: a short round between two crossings is counted as a full refill."""
    if burst <= 0 or m.level.kind != "inter" or m.nbytes <= 0:
        return 0.0
    before = m.round - 1 if m.round > 0 else last_round
    resources = _resources(m, topology)
    if any((before, res) in load for res in resources):
        return 0.0
    busiest = max(load[m.round, res] for res in resources)
    return burst / max(busiest, m.nbytes)


def shares_cores(profile: Profile, topology: Topology) -> bool:
    """Whether the profile saw more ranks than cores on a machine, for a job of this
    size (its `machines` name the measured job's ranks, so they describe a job of the
    same rank count on the same hosts: a 3+5 layout beside the measured 4+4): then the
    shared-core floor charges CPU contention, and the latency its concurrent probe saw
    grow (ranks waiting for a core, not for the link) is not charged again per message."""
    measured = profile.topology.world_size if profile.topology is not None else None
    return measured == topology.world_size and any(len(m.ranks) > m.cores
                                                    for m in profile.machines)


def _local_costs(schedule: Schedule, profile: Profile, itemsize: int) -> list[list[float]]:
    """Microseconds per unit scale of each phase's local steps, per rank."""
    costs: list[list[float]] = []
    for prog in schedule.programs:
        row = []
        for phase in prog.phases:
            total = 0.0
            for step in phase:
                if isinstance(step, Reduce):
                    operands = max(len(step.srcs) - 1, 1)
                    total += step.dst.count * itemsize * operands * profile.reduce_us_per_byte
                elif isinstance(step, Copy):
                    total += step.dst.count * itemsize * profile.copy_us_per_byte
                elif isinstance(step, Scale):
                    total += step.dst.count * itemsize * profile.reduce_us_per_byte
            row.append(total)
        costs.append(row)
    return costs


def _native_calls(schedule: Schedule, profile: Profile, itemsize: int) -> list[_NativeCall]:
    """Native sub-group collectives, matched by order per group, priced as a ring.

    A library's own collective is a black box to us; a ring on the group's link class is
    what Gloo and MPI run for large vectors, and an honest first guess for small ones.
    """
    calls: dict[tuple[tuple[int, ...], int], _NativeCall] = {}
    seen: dict[tuple[int, tuple[int, ...]], int] = defaultdict(int)
    for prog in schedule.programs:
        for i, phase in enumerate(prog.phases):
            for step in phase:
                if not isinstance(step, Native):
                    continue
                k = seen[prog.rank, step.group]
                seen[prog.rank, step.group] += 1
                call = calls.get((step.group, k))
                if call is None:
                    call = _price_native(step, schedule.topology, profile, itemsize)
                    calls[step.group, k] = call
                call.phases[prog.rank] = i
    return list(calls.values())


def _price_native(step: Native, topology: Topology, profile: Profile, itemsize: int
                  ) -> _NativeCall:
    g = len(step.group)
    level = step.level or Level("intra")
    link = profile.link(level)
    total = max(step.src.count, step.dst.count) * itemsize
    if step.collective == "all_reduce":
        steps, factor = 2 * (g - 1), 2.0 * (g - 1) / g
    elif step.collective == "broadcast":
        steps, factor = max(g - 1, 0).bit_length(), 1.0
    else:  # reduce_scatter / all_gather: (g-1)/g of the whole vector
        steps, factor = g - 1, (g - 1) / g
    beta = max(link.beta_us_per_byte, link.shared_beta_us_per_byte)
    reduce = (total * (g - 1) / g * profile.reduce_us_per_byte
              if step.collective in ("all_reduce", "reduce_scatter") else 0.0)
    return _NativeCall(step.group, {}, steps * link.alpha_us,
                       factor * total * beta + reduce)
