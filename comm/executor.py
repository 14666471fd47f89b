"""Runs one rank's schedule on real transports.

By default by dependencies (`dataflow`): every step starts as soon as what it reads and
writes is ready, and at most `TOPOCOLL_LOOKAHEAD` (default 1) phases ahead of the oldest
unfinished one (`_PhaseWindow`), so a pipelined algorithm keeps the network busy with one
segment while the node reduces the next (64 MiB hierarchical all-reduce on the emulated 2x4 cluster:
1 MiB 34 vs 44 ms, 64 MiB the same or better; every multi-process test green under both).
Over MPI the default is `phased` (`MPITransport.preferred_executor`): MPI moves data only
inside its calls, and the phased wait finishes shared memory first, then sits in MPI's
progress loop (64 MiB over MPI on the same cluster: 588 ms phased, 870 ms dataflow).
`TOPOCOLL_EXECUTOR=phased` runs phase by phase instead: post every send and receive of
a phase (each on the transport of the level it crosses), poll them all to completion,
then run the local steps: the schedule's own semantics, as the verifier checks them.

Sends and receives use views of the caller's tensors, so nothing is copied unless the
schedule says `Copy` (or a transport must stage through its own memory);
`ExecStats.bytes_copied` counts the schedule's copies so tests can hold algorithms to
zero-copy.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from topocoll.topology import INTER, INTRA, SELF

from .dataflow import COMM, LOCAL, NATIVE, CopyRun, Op, compile_program
from .schedule import Copy, Native, RankProgram, Recv, Reduce, Region, Scale, Send
from .transports.base import (
    Backoff,
    CollectiveTimeoutError,
    Handle,
    NativeCall,
    Transport,
    TransportError,
)
from .transports.wakeup import bells_of, sleep_until_rung

_INPLACE = {
    "sum": lambda a, b: a.add_(b),
    "prod": lambda a, b: a.mul_(b),
    "min": lambda a, b: torch.minimum(a, b, out=a),
    "max": lambda a, b: torch.maximum(a, b, out=a),
}
_OUT = {
    "sum": lambda a, b, out: torch.add(a, b, out=out),
    "prod": lambda a, b, out: torch.mul(a, b, out=out),
    "min": lambda a, b, out: torch.minimum(a, b, out=out),
    "max": lambda a, b, out: torch.maximum(a, b, out=out),
}


@dataclass
class ExecStats:
    """Debug counters, cumulative over the executor's life."""

    collectives: int = 0
    messages: int = 0
    bytes_sent: int = 0
    bytes_copied: int = 0
    bytes_reduced: int = 0
    per_level_bytes: dict[str, int] = field(default_factory=dict)

    def snapshot(self) -> dict[str, int]:
        return {"collectives": self.collectives, "messages": self.messages,
                "bytes_sent": self.bytes_sent, "bytes_copied": self.bytes_copied,
                "bytes_reduced": self.bytes_reduced}


@dataclass
class LevelTransports:
    """Which transport serves which topology level (one setting, sensible defaults)."""

    intra: Transport
    inter: Transport

    def for_kind(self, kind: str) -> Transport:
        return self.inter if kind == INTER else self.intra

    def all(self) -> list[Transport]:
        return [self.intra] if self.intra is self.inter else [self.intra, self.inter]


class Executor:
    def __init__(self, rank: int, transports: LevelTransports, timeout: float = 300.0,
                 mode: str | None = None) -> None:
        self.rank = rank
        self.mode = (mode or os.environ.get("TOPOCOLL_EXECUTOR")
                     or transports.inter.preferred_executor)
        if self.mode not in ("dataflow", "phased"):
            raise ValueError(f"TOPOCOLL_EXECUTOR must be 'dataflow' or 'phased', got "
                             f"{self.mode!r}")
        self._programs: dict[int, tuple[RankProgram, list[Op]]] = {}
        self.transports = transports
        self.timeout = timeout
        self.stats = ExecStats()
        self.lookahead = _lookahead_from_env()
        self._scratch: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def scratch(self, count: int, like: torch.Tensor) -> torch.Tensor:
        """Reusable scratch (grown, never shrunk): no allocation per call in steady state."""
        key = (like.dtype, like.device)
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < count:
            buf = torch.empty(max(count, 1), dtype=like.dtype, device=like.device)
            self._scratch[key] = buf
        return buf[:count]

    def run(self, program: RankProgram, buffers: Mapping[str, torch.Tensor],
            what: str = "collective") -> None:
        """Execute `program`; `buffers` maps buffer names to flat tensors (tmp optional)."""
        if program.rank != self.rank:
            raise ValueError(f"rank {self.rank} was given the program of rank {program.rank}")
        views = dict(buffers)
        if "tmp" in program.buffers and "tmp" not in views:
            like = next(iter(buffers.values()))
            views["tmp"] = self.scratch(program.buffers["tmp"], like)
        ops = self._compiled(program)
        if self.mode == "phased":
            self._run_phased(ops, views, what)
        else:
            self._run_dataflow(ops, views, what)
        self.stats.collectives += 1

    def _compiled(self, program: RankProgram) -> list[Op]:
        key = id(program)
        entry = self._programs.get(key)
        if entry is None or entry[0] is not program:
            entry = (program, compile_program(program, self._fusable))
            self._programs[key] = entry
            if len(self._programs) > 512:
                self._programs.pop(next(iter(self._programs)))
        return entry[1]

    def _start(self, op: Op, views: Mapping[str, torch.Tensor]) -> Handle | None:
        """Post a communication op (a handle) or run a local one (None)."""
        step = op.step
        if op.kind == LOCAL:
            if isinstance(step, Reduce):
                self._reduce(step, views)
            elif isinstance(step, Copy):
                dst, src = self._view(views, step.dst), self._view(views, step.src)
                dst.copy_(src)
                self.stats.bytes_copied += src.numel() * src.element_size()
            elif isinstance(step, CopyRun):
                dst = self._view(views, step.dst)
                torch.cat([self._view(views, src) for src in step.srcs], out=dst)
                self.stats.bytes_copied += dst.numel() * dst.element_size()
            elif isinstance(step, Scale):
                self._view(views, step.dst).div_(step.divisor)
            return None
        if op.kind == NATIVE:
            self._native(step, views)
            return None
        transport = self.transports.for_kind(step.level.kind if step.level else INTRA)
        if op.fused is not None:
            target = self._view(views, op.fused.dst)
            self.stats.bytes_reduced += target.numel() * target.element_size()
            return transport.irecv_reduce(target, op.fused.op, step.peer, step.tag)
        if isinstance(step, Send):
            data = self._view(views, step.src)
            nbytes = data.numel() * data.element_size()
            self.stats.messages += 1
            self.stats.bytes_sent += nbytes
            key = str(step.level) if step.level else INTRA
            self.stats.per_level_bytes[key] = self.stats.per_level_bytes.get(key, 0) + nbytes
            return transport.isend(data, step.peer, step.tag)
        return transport.irecv(self._view(views, step.dst), step.peer, step.tag)

    def _run_dataflow(self, ops: list[Op], views: Mapping[str, torch.Tensor],
                      what: str) -> None:
        """Start every op as soon as what it depends on is done; poll what is in flight."""
        waiting = [len(op.deps) for op in ops]
        dependents: list[list[int]] = [[] for _ in ops]
        for op in ops:
            for d in op.deps:
                dependents[d].append(op.index)
        posted = [False] * len(ops)
        window = _PhaseWindow(ops, self.lookahead)
        ready = [op.index for op in ops if not op.deps]
        inflight: list[tuple[Handle, Op]] = []
        done_count = 0
        deadline = time.monotonic() + self.timeout
        backoff = Backoff()

        def finish(index: int) -> None:
            nonlocal done_count
            done_count += 1
            for j in dependents[index]:
                waiting[j] -= 1
                if waiting[j] == 0:
                    ready.append(j)
            ready.extend(window.finish(ops[index]))

        while done_count < len(ops):
            progressed = False
            if ready:
                ready[:] = window.admit(ready, ops)
            if ready:
                batch = sorted(ready)
                ready.clear()  # finish() refills it with what becomes ready
                self.transports.intra.hold_wakeups()  # peers woken once the batch is out
                try:
                    progressed = self._post(batch, ops, views, what, posted, ready,
                                            inflight, finish)
                finally:
                    self.transports.intra.release_wakeups()
            still = []
            for handle, op in inflight:
                try:
                    complete = handle.test()
                except TransportError as exc:
                    raise _in_context(exc, f"rank {self.rank}: {what} phase {op.phase}"
                                      ) from exc
                if complete:
                    finish(op.index)
                    progressed = True
                else:
                    still.append((handle, op))
            inflight = still
            if progressed:
                backoff.reset()
                continue
            now = time.monotonic()
            if now > deadline:
                if inflight:
                    handle, op = inflight[0]
                    raise self._timeout(op.phase, what, handle, op.step, len(inflight))
                raise CollectiveTimeoutError(f"rank {self.rank}: {what} made no progress for "
                                             f"{self.timeout:.1f} s")
            if inflight and all(handle.blocking for handle, _ in inflight):
                self._block_on(inflight[0], len(inflight), deadline - now, what)
                continue
            _idle([handle for handle, _ in inflight], backoff, deadline - now)

    def _post(self, batch: list[int], ops: list[Op], views: Mapping[str, torch.Tensor],
              what: str, posted: list[bool], ready: list[int],
              inflight: list[tuple[Handle, Op]], finish: Callable[[int], None]) -> bool:
        """Start the ready ops of `batch` (local ones run to completion); True if any did."""
        progressed = False
        for i in batch:
            op = ops[i]
            if op.channel_prev is not None and not posted[op.channel_prev]:
                ready.append(i)  # keep per-channel message order
                continue
            try:
                handle = self._start(op, views)
            except TransportError as exc:
                raise _in_context(exc, f"rank {self.rank}: {what} phase {op.phase}") from exc
            posted[i] = True
            progressed = True
            if handle is None:
                finish(i)
            else:
                inflight.append((handle, op))
        return progressed

    def _block_on(self, pending: tuple[Handle, Op], count: int, left: float, what: str
                  ) -> None:
        """Everything in flight completes without us (Gloo's own threads, MPI's progress
        inside its calls): wait on the oldest in this thread, with no hand-off to a
        helper thread and no wake-up on a bell."""
        handle, op = pending
        try:
            handle.wait(max(left, 0.001))
        except CollectiveTimeoutError as exc:
            raise self._timeout(op.phase, what, handle, op.step, count) from exc
        except TransportError as exc:
            raise _in_context(exc, f"rank {self.rank}: {what} phase {op.phase}") from exc

    def _view(self, views: Mapping[str, torch.Tensor], region: Region) -> torch.Tensor:
        return views[region.buf][region.offset:region.end]

    def _fusable(self, phase: tuple) -> dict[int, Reduce]:
        """Receives into scratch whose only use is an in-place reduce, on a transport that
        can reduce as it receives: position of the Recv in the phase -> its Reduce."""
        recvs = {step.dst: i for i, step in enumerate(phase)
                 if isinstance(step, Recv) and step.dst.buf == "tmp" and step.dst.count}
        if not recvs:
            return {}
        sent = [s.src for s in phase if isinstance(s, Send)]
        uses: dict[Region, int] = {}
        for step in phase:
            if isinstance(step, Reduce):
                for src in step.srcs:
                    uses[src] = uses.get(src, 0) + 1
            elif isinstance(step, Copy):
                uses[step.src] = uses.get(step.src, 0) + 2
        fused: dict[int, Reduce] = {}
        for step in phase:
            if not (isinstance(step, Reduce) and step.srcs[0] == step.dst and step.dst.count):
                continue
            if any(step.dst.overlaps(s) for s in sent):
                continue  # a send of dst in this phase must see its value before the reduce
            for src in step.srcs[1:]:
                i = recvs.get(src)
                if i is None or uses.get(src) != 1:
                    continue
                level = phase[i].level
                transport = self.transports.for_kind(level.kind if level else INTRA)
                if hasattr(transport, "irecv_reduce"):
                    fused[i] = step
        return fused

    def _run_phased(self, ops: list[Op], views: Mapping[str, torch.Tensor], what: str) -> None:
        """Phase by phase: post the phase's communication, wait for all of it, then run
        its local steps (the schedule's own semantics, as the verifier checks them)."""
        start = 0
        while start < len(ops):
            phase = ops[start].phase
            end = start
            while end < len(ops) and ops[end].phase == phase:
                end += 1
            self.transports.intra.hold_wakeups()  # peers woken once the phase is posted
            try:
                posted = self._post_phase(ops[start:end], views, what, phase)
            finally:
                self.transports.intra.release_wakeups()
            for op in ops[start:end]:
                if op.kind == NATIVE:
                    try:
                        self._start(op, views)
                    except TransportError as exc:
                        raise _in_context(exc, f"rank {self.rank}: {what} phase {phase}"
                                          ) from exc
            self._wait_all(posted, phase, what)
            for op in ops[start:end]:
                if op.kind == LOCAL:
                    self._start(op, views)
            start = end

    def _post_phase(self, ops: list[Op], views: Mapping[str, torch.Tensor], what: str,
                    phase: int) -> list[tuple[Handle, object]]:
        posted: list[tuple[Handle, object]] = []
        for op in ops:
            if op.kind == COMM:
                try:
                    handle = self._start(op, views)
                except TransportError as exc:
                    raise _in_context(exc, f"rank {self.rank}: {what} phase {phase}") from exc
                posted.append((handle, op.step))
        return posted

    def _wait_all(self, posted: list[tuple[Handle, object]], index: int, what: str) -> None:
        if not posted:
            return
        deadline = time.monotonic() + self.timeout
        backoff = Backoff()
        remaining = posted
        while remaining:
            still = []
            try:
                for handle, step in remaining:
                    if not handle.test():
                        still.append((handle, step))
            except TransportError as exc:
                raise _in_context(exc, f"rank {self.rank}: {what} phase {index}") from exc
            if len(still) < len(remaining):
                backoff.reset()
            remaining = still
            if all(handle.blocking for handle, _ in remaining):
                for handle, step in remaining:
                    try:
                        handle.wait(max(deadline - time.monotonic(), 0.001))
                    except CollectiveTimeoutError as exc:
                        raise self._timeout(index, what, handle, step, len(remaining)) from exc
                    except TransportError as exc:
                        raise _in_context(exc, f"rank {self.rank}: {what} phase {index}"
                                          ) from exc
                return
            now = time.monotonic()
            if now > deadline:
                handle, step = next((h, s) for h, s in remaining if not h.blocking)
                raise self._timeout(index, what, handle, step, len(remaining))
            _idle([handle for handle, _ in remaining], backoff, deadline - now)

    def _timeout(self, index: int, what: str, handle: Handle, step: object,
                 pending: int) -> CollectiveTimeoutError:
        direction = "send to" if isinstance(step, Send) else "recv from"
        return CollectiveTimeoutError(
            f"rank {self.rank}: {what} timed out after {self.timeout:.1f} s in phase {index} "
            f"waiting on {direction} rank {step.peer} (tag {step.tag}, {handle.describe()}); "
            f"{pending} operation(s) pending")

    def _reduce(self, step: Reduce, views: Mapping[str, torch.Tensor]) -> None:
        if not step.dst.count:
            return
        dst = self._view(views, step.dst)
        srcs = [self._view(views, s) for s in step.srcs]
        first, rest = srcs[0], srcs[1:]
        if step.srcs[0] != step.dst:
            if rest:
                _OUT[step.op](first, rest[0], dst)
                rest = rest[1:]
            else:
                dst.copy_(first)
                self.stats.bytes_copied += first.numel() * first.element_size()
        for other in rest:
            _INPLACE[step.op](dst, other)
        self.stats.bytes_reduced += dst.numel() * dst.element_size() * len(step.srcs[1:])

    def _native(self, step: Native, views: Mapping[str, torch.Tensor]) -> None:
        kind = step.level.kind if step.level else INTER
        transport = self.transports.for_kind(INTRA if kind in (INTRA, SELF) else INTER)
        transport.native(NativeCall(step.collective, step.group, self._view(views, step.src),
                                    self._view(views, step.dst), step.counts, step.op,
                                    step.root))


LOOKAHEAD_ENV = "TOPOCOLL_LOOKAHEAD"
DEFAULT_LOOKAHEAD = 1


def _lookahead_from_env() -> int | None:
    value = os.environ.get(LOOKAHEAD_ENV, "").strip()
    if not value:
        return DEFAULT_LOOKAHEAD
    if value == "none":
        return None
    if not value.isdigit():
        raise ValueError(f"{LOOKAHEAD_ENV} must be a number of phases (0, 1, ...) or 'none', "
                         f"got {value!r}")
    return int(value)


class _PhaseWindow:
    """How far the dataflow executor may run ahead of its oldest unfinished phase.

    Why: segments of a pipelined schedule touch disjoint memory, so by dependencies alone
    every segment's intra-node reduce-scatter is ready at once. On ranks that share cores
    they then all crawl together, and the first segment reaches the network only when
    the whole reduce-scatter is done (64 MiB hierarchical on the emulated 2x4 cluster:
    the first inter-node send at 124 ms of 720). With a window of `lookahead` phases, an
    op of phase p starts only once this rank has finished every op of the phases before
    p - lookahead, so the pipeline fills in order. Any window is deadlock-free: the
    oldest phase is always admitted, which is exactly what the phased executor runs.
    """

    def __init__(self, ops: list[Op], lookahead: int | None) -> None:
        self.lookahead = lookahead
        self.left: dict[int, int] = {}
        for op in ops:
            self.left[op.phase] = self.left.get(op.phase, 0) + 1
        self.phases = sorted(self.left)
        self.oldest_at = 0  # index into self.phases of the oldest unfinished phase
        self.held: list[int] = []

    def _limit(self) -> int | None:
        if self.lookahead is None or self.oldest_at >= len(self.phases):
            return None
        return self.phases[self.oldest_at] + self.lookahead

    def admit(self, ready: list[int], ops: list[Op]) -> list[int]:
        """The ready ops inside the window; the rest are held until it moves."""
        limit = self._limit()
        if limit is None:
            return ready
        admitted = []
        for i in ready:
            (admitted if ops[i].phase <= limit else self.held).append(i)
        return admitted

    def finish(self, op: Op) -> list[int]:
        """Count `op` done; the held ops the window now admits."""
        self.left[op.phase] -= 1
        moved = False
        while self.oldest_at < len(self.phases) and not self.left[self.phases[self.oldest_at]]:
            self.oldest_at += 1
            moved = True
        if not moved or not self.held:
            return []
        released, self.held = self.held, []
        return released


def _idle(pending: list[Handle], backoff: Backoff, left: float) -> None:
    """Nothing progressed: sleep on the pending handles' bells when they all have one
    (shared memory, Gloo), else back off and poll again (MPI, UCX progress only when
    polled)."""
    bells = bells_of(pending)
    if bells is None:
        backoff.pause()
    else:
        sleep_until_rung(bells, left)


def _in_context(exc: TransportError, where: str) -> TransportError:
    """`exc` with where it happened (rank, collective, algorithm, phase) in front; a
    timeout stays a CollectiveTimeoutError, so callers can still tell the two apart."""
    kind = CollectiveTimeoutError if isinstance(exc, CollectiveTimeoutError) else TransportError
    return kind(f"{where}: {exc}")


__all__ = ["ExecStats", "Executor", "LevelTransports"]
