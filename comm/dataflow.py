"""A rank's program as a dependency graph, so the executor need not stop at phase ends.

Phases are the schedule's contract (and what the verifier checks): any execution that
respects the true dependencies of the phase order is equivalent. Running by dependencies
lets the network keep busy with segment s while the node still reduces segment s+1,
instead of every rank waiting at each phase boundary for the slowest operation.

Dependencies: a later operation depends on an earlier one when they touch overlapping
regions and at least one writes (read-after-write, write-after-read, write-after-write),
except two communication steps of the same phase, which the phase semantics make
concurrent. Messages on one (direction, peer, tag) channel are posted in program order,
since transports match them in order. A native collective orders everything around it.

Consecutive copies of one phase that fill one contiguous destination (a pack, or a
rank's output assembled from blocks) become one `CopyRun` op, executed as a single
`torch.cat(..., out=)`: the node leader of `node_leader` assembles 36 blocks per call on
2x4, and each separate op costs tens of microseconds of Python.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .schedule import Copy, Native, RankProgram, Recv, Reduce, Region, Scale, Send

COMM, LOCAL, NATIVE = "comm", "local", "native"


@dataclass
class Op:
    index: int
    phase: int
    kind: str                      # COMM, LOCAL or NATIVE
    step: object                   # the (possibly rewritten) schedule step
    reads: tuple[Region, ...]
    writes: tuple[Region, ...]
    fused: Reduce | None = None    # a Recv that reduces into `fused.dst` as it receives
    channel: tuple | None = None   # ("send"|"recv", peer, tag)
    deps: list[int] = field(default_factory=list)
    channel_prev: int | None = None


@dataclass(frozen=True, slots=True)
class CopyRun:
    """Copy `srcs`, in order, into the contiguous `dst` (their counts sum to its count)."""

    dst: Region
    srcs: tuple[Region, ...]


def fuse_copies(local: list[Op]) -> list[Op]:
    """Runs of adjacent `Copy` ops whose destinations follow each other in one buffer,
    as one `CopyRun` op. A copy joins a run only if it reads nothing the run writes and
    writes nothing the run reads, so the order inside the run does not matter."""
    out: list[Op] = []
    run: list[Op] = []

    def flush() -> None:
        if len(run) == 1:
            out.append(run[0])
        elif run:
            dst = Region(run[0].step.dst.buf, run[0].step.dst.offset,
                         sum(op.step.dst.count for op in run))
            srcs = tuple(op.step.src for op in run)
            joined = _join_adjacent(srcs)
            step = Copy(dst, joined[0]) if len(joined) == 1 else CopyRun(dst, joined)
            out.append(Op(0, run[0].phase, LOCAL, step, srcs, (dst,)))
        run.clear()

    for op in local:
        step = op.step
        if isinstance(step, Copy) and run:
            last = run[-1].step.dst
            adjacent = step.dst.buf == last.buf and step.dst.offset == last.end
            independent = not any(step.src.overlaps(o.step.dst) or step.dst.overlaps(o.step.src)
                                  for o in run) and not step.src.overlaps(step.dst)
            if adjacent and independent:
                run.append(op)
                continue
        flush()
        if isinstance(step, Copy) and not step.src.overlaps(step.dst):
            run.append(op)
        else:
            out.append(op)
    flush()
    return out


def _join_adjacent(srcs: tuple[Region, ...]) -> tuple[Region, ...]:
    """Sources that follow each other in one buffer as one region: a pack's blocks from
    one source rank are often consecutive in its input, and every region is one more
    tensor view per call."""
    joined = [srcs[0]]
    for src in srcs[1:]:
        last = joined[-1]
        if src.buf == last.buf and src.offset == last.end:
            joined[-1] = Region(last.buf, last.offset, last.count + src.count)
        else:
            joined.append(src)
    return tuple(joined)


def _conflict(a: Op, b: Op) -> bool:
    for w in a.writes:
        for r in (*b.reads, *b.writes):
            if w.overlaps(r):
                return True
    for r in a.reads:
        for w in b.writes:
            if r.overlaps(w):
                return True
    return False


def compile_program(program: RankProgram, fusable: Callable[[tuple], dict[int, Reduce]]
                    ) -> list[Op]:
    """Ops in program order (per phase: communication first, then local steps)."""
    ops: list[Op] = []
    for phase_index, phase in enumerate(program.phases):
        fused = fusable(phase)
        folded = {phase[i].dst for i in fused}
        comm: list[Op] = []
        local: list[Op] = []
        self_sends = [s for s in phase if isinstance(s, Send) and s.peer == program.rank
                      and s.src.count]
        self_recvs = [s for s in phase if isinstance(s, Recv) and s.peer == program.rank
                      and s.dst.count]
        for position, step in enumerate(phase):
            if position in fused:
                target = fused[position].dst
                comm.append(Op(0, phase_index, COMM, step, (target,), (target,),
                               fused=fused[position], channel=("recv", step.peer, step.tag)))
            elif isinstance(step, Send) and step.src.count and step.peer != program.rank:
                comm.append(Op(0, phase_index, COMM, step, (step.src,), (),
                               channel=("send", step.peer, step.tag)))
            elif isinstance(step, Recv) and step.dst.count and step.peer != program.rank:
                comm.append(Op(0, phase_index, COMM, step, (), (step.dst,),
                               channel=("recv", step.peer, step.tag)))
            elif isinstance(step, Native) and step.src.count:
                comm.append(Op(0, phase_index, NATIVE, step, (step.src,), (step.dst,)))
            elif isinstance(step, Reduce) and step.dst.count:
                rest = tuple(s for s in step.srcs[1:] if s not in folded)
                if len(rest) < len(step.srcs) - 1:
                    if not rest:
                        continue
                    step = Reduce(step.dst, (step.srcs[0], *rest), step.op)
                local.append(Op(0, phase_index, LOCAL, step, step.srcs, (step.dst,)))
            elif isinstance(step, Copy) and step.src.count:
                local.append(Op(0, phase_index, LOCAL, step, (step.src,), (step.dst,)))
            elif isinstance(step, Scale) and step.dst.count:
                local.append(Op(0, phase_index, LOCAL, step, (step.dst,), (step.dst,)))
        for send, recv in zip(self_sends, self_recvs):  # a rank's message to itself
            comm.append(Op(0, phase_index, LOCAL, Copy(recv.dst, send.src), (send.src,),
                           (recv.dst,)))
        ops.extend(comm)
        ops.extend(fuse_copies(local))
    last_on_channel: dict[tuple, int] = {}
    last_native: int | None = None
    for index, op in enumerate(ops):
        op.index = index
        if op.kind == NATIVE:
            op.deps = list(range(index))
            last_native = index
        else:
            op.deps = [a.index for a in ops[:index]
                       if not (a.kind == COMM and op.kind == COMM and a.phase == op.phase)
                       and (a.kind == NATIVE or _conflict(a, op))]
            if last_native is not None and last_native not in op.deps:
                op.deps.append(last_native)
        if op.channel is not None:
            op.channel_prev = last_on_channel.get(op.channel)
            last_on_channel[op.channel] = index
    return ops
