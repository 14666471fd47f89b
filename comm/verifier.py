"""Run every rank's schedule inside one process on numpy arrays, and check it.

The verifier is the executor's semantics without a network: phases post their
communication, messages match in order per (sender, receiver, tag) channel, a phase
completes only when all its messages have matched (rendezvous semantics, so a schedule
that passes here cannot deadlock on a transport that blocks large sends), then its
local steps run. It reports, naming ranks, phases and steps:

- `DeadlockError`: ranks wait on messages nobody will send (or collectives not all join);
- `SizeMismatchError`: a matched send and receive disagree on the element count;
- `BoundsError`: a region outside its declared buffer;
- `RaceError`: within one phase a receive overwrites what a send or receive also uses;
- `WrongResultError`: the output differs from the numpy reference beyond tolerance, or
  an input that must stay unchanged was modified.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass

import numpy as np

from .collectives import CollectiveSpec
from .ops import DTYPES, check_op
from .reference import abs_bound, compare, numpy_dtype, random_inputs, reference, round_to_dtype
from .schedule import Copy, Native, RankProgram, Recv, Reduce, Region, Scale, Schedule, Send


class VerificationError(Exception):
    """A schedule that is wrong; the message says where."""


class DeadlockError(VerificationError):
    pass


class SizeMismatchError(VerificationError):
    pass


class BoundsError(VerificationError):
    pass


class RaceError(VerificationError):
    pass


class WrongResultError(VerificationError):
    pass


@dataclass(frozen=True)
class VerifyReport:
    schedule_id: str
    dtype: str
    messages: int
    elements_moved: int
    max_error: float


_UFUNC = {"sum": np.add, "prod": np.multiply, "min": np.minimum, "max": np.maximum}


# ----- static checks ------------------------------------------------------------------
def check_static(schedule: Schedule) -> None:
    """Bounds, reduce shapes and intra-phase races, before anything runs."""
    for program in schedule.programs:
        for index, phase in enumerate(program.phases):
            where = f"rank {program.rank} phase {index}"
            comm_reads: list[Region] = []
            comm_writes: list[Region] = []
            natives = [s for s in phase if isinstance(s, Native)]
            if natives and len([s for s in phase if isinstance(s, (Send, Recv, Native))]) > 1:
                raise RaceError(f"{where}: a native collective must be the phase's only "
                                "communication step")
            for step in phase:
                for region in _regions(step):
                    _check_bounds(region, program, where, step)
                if isinstance(step, Send):
                    comm_reads.append(step.src)
                elif isinstance(step, Recv):
                    for other in comm_reads + comm_writes:
                        if step.dst.overlaps(other):
                            raise RaceError(f"{where}: recv into {step.dst} from rank "
                                            f"{step.peer} overlaps {other} used in the same phase")
                    comm_writes.append(step.dst)
                elif isinstance(step, Reduce):
                    for src in step.srcs:
                        if src.count != step.dst.count:
                            raise SizeMismatchError(f"{where}: reduce into {step.dst} from "
                                                    f"{src} of a different size")
                        if src != step.dst and src.overlaps(step.dst):
                            raise RaceError(f"{where}: reduce into {step.dst} partially "
                                            f"overlaps its source {src}")
                elif isinstance(step, Copy):
                    if step.src.count != step.dst.count:
                        raise SizeMismatchError(f"{where}: copy {step.src} -> {step.dst} "
                                                "changes size")
                    if step.src.overlaps(step.dst):
                        raise RaceError(f"{where}: copy {step.src} -> {step.dst} overlaps")
            for read in comm_reads:
                for write in comm_writes:
                    if read.overlaps(write):
                        raise RaceError(f"{where}: send of {read} races with a recv into {write}")


def _regions(step: object) -> list[Region]:
    if isinstance(step, Send):
        return [step.src]
    if isinstance(step, Recv):
        return [step.dst]
    if isinstance(step, Reduce):
        return [step.dst, *step.srcs]
    if isinstance(step, Copy):
        return [step.dst, step.src]
    if isinstance(step, Scale):
        return [step.dst]
    if isinstance(step, Native):
        return [step.src, step.dst]
    raise TypeError(f"not a schedule step: {step!r}")


def _check_bounds(region: Region, program: RankProgram, where: str, step: object) -> None:
    if region.count == 0:
        return
    size = program.buffers.get(region.buf)
    if size is None:
        raise BoundsError(f"{where}: {type(step).__name__} uses undeclared buffer "
                          f"{region.buf!r} (declared: {sorted(program.buffers)})")
    if region.offset < 0 or region.count < 0 or region.end > size:
        raise BoundsError(f"{where}: {type(step).__name__} region {region} outside "
                          f"{region.buf!r} of {size} elements")


# ----- simulation ---------------------------------------------------------------------
class _Sim:
    def __init__(self, schedule: Schedule, buffers: list[dict[str, np.ndarray]], dtype: str):
        self.schedule = schedule
        self.buffers = buffers
        self.dtype = dtype
        self.messages = 0
        self.elements = 0

    def view(self, rank: int, region: Region) -> np.ndarray:
        return self.buffers[rank][region.buf][region.offset:region.end]

    def run_local(self, rank: int, step: object) -> None:
        if isinstance(step, Reduce):
            if step.op not in _UFUNC:
                raise VerificationError(f"rank {rank}: reduce op {step.op!r} is not elementwise")
            acc = self.view(rank, step.srcs[0]).copy()
            for src in step.srcs[1:]:
                acc = round_to_dtype(_UFUNC[step.op](acc, self.view(rank, src)), self.dtype)
            self.view(rank, step.dst)[:] = acc
        elif isinstance(step, Copy):
            self.view(rank, step.dst)[:] = self.view(rank, step.src)
        elif isinstance(step, Scale):
            if not DTYPES[self.dtype].is_float:
                raise VerificationError(f"rank {rank}: scale (avg) on integer dtype {self.dtype}")
            target = self.view(rank, step.dst)
            target[:] = round_to_dtype(target / target.dtype.type(step.divisor), self.dtype)

    def run_native(self, steps: dict[int, Native]) -> None:
        first = next(iter(steps.values()))
        group = first.group
        for rank, step in steps.items():
            if (step.collective, step.group, step.counts, step.op, step.root) != (
                    first.collective, group, first.counts, first.op, first.root):
                raise SizeMismatchError(
                    f"native {first.collective} on group {list(group)}: rank {rank} joined "
                    f"with different arguments ({step.collective}, counts {list(step.counts)})")
        srcs = [self.view(r, steps[r].src).copy() for r in group]
        kind = first.collective
        if kind == "all_reduce":
            _same_counts(kind, group, [s.size for s in srcs])
            acc = srcs[0]
            for s in srcs[1:]:
                acc = round_to_dtype(_UFUNC[first.op](acc, s), self.dtype)
            results = [acc] * len(group)
        elif kind == "reduce_scatter":
            _same_counts(kind, group, [s.size for s in srcs] + [sum(first.counts)])
            acc = srcs[0]
            for s in srcs[1:]:
                acc = round_to_dtype(_UFUNC[first.op](acc, s), self.dtype)
            offsets = np.cumsum([0, *first.counts])
            results = [acc[offsets[i]:offsets[i + 1]] for i in range(len(group))]
        elif kind == "all_gather":
            results = [np.concatenate(srcs)] * len(group)
        elif kind == "broadcast":
            results = [srcs[first.root]] * len(group)
        else:
            raise VerificationError(f"unknown native collective {kind!r}")
        for rank, result in zip(group, results):
            dst = self.view(rank, steps[rank].dst)
            if dst.size != result.size:
                raise SizeMismatchError(f"native {kind}: rank {rank} provides {dst.size} "
                                        f"elements for a result of {result.size}")
            dst[:] = result
        self.messages += len(group)
        self.elements += sum(s.size for s in srcs)

    def run(self) -> None:
        programs = self.schedule.programs
        p = len(programs)
        pc = [0] * p
        pending = [0] * p
        posted = [False] * p
        sends: dict[tuple[int, int, int], deque] = defaultdict(deque)
        recvs: dict[tuple[int, int, int], deque] = defaultdict(deque)
        natives: dict[tuple[int, ...], dict[int, deque]] = defaultdict(lambda: defaultdict(deque))
        while True:
            for rank in range(p):  # post the current phase of every idle rank
                if posted[rank] or pc[rank] >= len(programs[rank].phases):
                    continue
                posted[rank] = True
                for step in programs[rank].phases[pc[rank]]:
                    if isinstance(step, Send):
                        self._check_peer(rank, step.peer, p, step)
                        sends[rank, step.peer, step.tag].append((rank, pc[rank], step))
                        pending[rank] += 1
                    elif isinstance(step, Recv):
                        self._check_peer(rank, step.peer, p, step)
                        recvs[step.peer, rank, step.tag].append((rank, pc[rank], step))
                        pending[rank] += 1
                    elif isinstance(step, Native):
                        if rank not in step.group:
                            raise VerificationError(f"rank {rank} phase {pc[rank]}: joins "
                                                    f"native {step.collective} of group "
                                                    f"{list(step.group)} it is not in")
                        natives[step.group][rank].append(step)
                        pending[rank] += 1
            progressed = self._match(sends, recvs, pending)
            progressed |= self._match_natives(natives, pending)
            for rank in range(p):  # finish phases whose communication is complete
                if posted[rank] and pending[rank] == 0:
                    for step in programs[rank].phases[pc[rank]]:
                        self.run_local(rank, step)
                    pc[rank] += 1
                    posted[rank] = False
                    progressed = True
            if all(pc[r] >= len(programs[r].phases) for r in range(p)):
                return
            if not progressed:
                raise DeadlockError(self._describe_deadlock(pc, sends, recvs, natives))

    @staticmethod
    def _check_peer(rank: int, peer: int, p: int, step: object) -> None:
        if not 0 <= peer < p:
            raise VerificationError(f"rank {rank}: {type(step).__name__} names peer {peer} "
                                    f"outside 0..{p - 1}")

    def _match(self, sends: dict, recvs: dict, pending: list[int]) -> bool:
        progressed = False
        for channel in list(sends):
            out_q, in_q = sends[channel], recvs.get(channel)
            while out_q and in_q:
                src_rank, src_phase, send = out_q.popleft()
                dst_rank, dst_phase, recv = in_q.popleft()
                if send.src.count != recv.dst.count:
                    raise SizeMismatchError(
                        f"rank {src_rank} phase {src_phase} sends {send.src.count} elements "
                        f"({send.src}) to rank {dst_rank} tag {send.tag}, whose phase "
                        f"{dst_phase} receives {recv.dst.count} ({recv.dst})")
                self.view(dst_rank, recv.dst)[:] = self.view(src_rank, send.src)
                pending[src_rank] -= 1
                pending[dst_rank] -= 1
                self.messages += 1
                self.elements += send.src.count
                progressed = True
        return progressed

    def _match_natives(self, natives: dict, pending: list[int]) -> bool:
        progressed = False
        for group, queues in natives.items():
            while all(queues[r] for r in group):
                steps = {r: queues[r].popleft() for r in group}
                self.run_native(steps)
                for r in group:
                    pending[r] -= 1
                progressed = True
        return progressed

    def _describe_deadlock(self, pc: list[int], sends: dict, recvs: dict,
                           natives: dict) -> str:
        lines = []
        for channel, queue in sends.items():
            for rank, phase, step in queue:
                lines.append(f"rank {rank} phase {phase}: send of {step.src.count} to rank "
                             f"{channel[1]} tag {channel[2]} has no matching recv")
        for channel, queue in recvs.items():
            for rank, phase, step in queue:
                lines.append(f"rank {rank} phase {phase}: recv of {step.dst.count} from rank "
                             f"{channel[0]} tag {channel[2]} has no matching send")
        for group, queues in natives.items():
            waiting = [r for r in group if queues[r]]
            if waiting:
                missing = [r for r in group if not queues[r]]
                lines.append(f"native collective on {list(group)}: ranks {waiting} wait for "
                             f"{missing}")
        return "deadlock: " + "; ".join(lines[:12]) + (" ..." if len(lines) > 12 else "")


def _same_counts(kind: str, group: tuple[int, ...], sizes: list[int]) -> None:
    if len(set(sizes)) > 1:
        raise SizeMismatchError(f"native {kind} on {list(group)}: sizes differ {sizes}")


# ----- public entry points ------------------------------------------------------------
@dataclass
class Simulation:
    """Every rank's buffers after the run, and what crossed the (virtual) network."""

    buffers: list[dict[str, np.ndarray]]
    messages: int
    elements_moved: int


def simulate(schedule: Schedule, inputs: list[np.ndarray], dtype: str) -> Simulation:
    """Run the schedule on copies of `inputs`; return every rank's buffers afterwards."""
    check_static(schedule)
    spec = CollectiveSpec.from_dict(schedule.spec)
    np_dtype = numpy_dtype(dtype)
    buffers = []
    for rank, program in enumerate(schedule.programs):
        bufs = {name: np.zeros(size, np_dtype) for name, size in program.buffers.items()}
        if "tmp" in bufs:  # garbage in scratch, so a schedule that reads it unwritten fails
            bufs["tmp"][:] = np.asarray(7, np_dtype)
        target = bufs.get(spec.input_buffer)
        if target is None or target.size != inputs[rank].size:
            raise BoundsError(f"rank {rank}: {spec.input_buffer!r} buffer declared for "
                              f"{None if target is None else target.size} elements, input "
                              f"has {inputs[rank].size}")
        target[:] = inputs[rank]
        if not spec.in_place:
            bufs["out"][:] = np.asarray(-3, np_dtype)
        buffers.append(bufs)
    sim = _Sim(schedule, buffers, dtype)
    sim.run()
    return Simulation(buffers, sim.messages, sim.elements)


def verify(schedule: Schedule, dtype: str = "float32", seed: int = 0,
           inputs: list[np.ndarray] | None = None) -> VerifyReport:
    """Simulate on random data and compare every rank's output with the numpy reference."""
    spec = CollectiveSpec.from_dict(schedule.spec)
    if spec.collective in ("all_reduce", "reduce_scatter"):
        check_op(spec.op, dtype)
    if inputs is None:
        inputs = random_inputs(spec, dtype, seed)
    result_run = simulate(schedule, inputs, dtype)
    buffers = result_run.buffers
    expected = reference(spec, inputs)
    bounds = abs_bound(spec, inputs)
    worst = 0.0
    for rank in range(spec.world_size):
        got = buffers[rank][spec.output_buffer]
        result = compare(got, expected[rank], bounds[rank], dtype, spec.op, spec.world_size)
        if result.wrong:
            i = result.first_index
            raise WrongResultError(
                f"{schedule.algorithm} {spec.collective} ({dtype}, {spec.op}, "
                f"{spec.world_size} ranks): rank {rank} has {result.wrong} wrong element(s); "
                f"first at {i}: got {got[i]!r}, expected {expected[rank][i]!r}")
        worst = max(worst, result.max_error)
        if not spec.in_place and not np.array_equal(buffers[rank]["in"], inputs[rank]):
            raise WrongResultError(f"{schedule.algorithm} {spec.collective}: rank {rank}'s "
                                   "input buffer was modified")
    return VerifyReport(schedule.id, dtype, result_run.messages, result_run.elements_moved, worst)
