"""The one small interface every transport implements.

A transport moves the bytes of a contiguous 1-D tensor slice to or from a peer (given by
its global rank) without blocking, and reports completion through a `Handle`. The
executor drives handles by polling (`test`) so that one phase may mix transports (shared
memory inside the node, a network between nodes) and still overlap them. Native
collectives are optional: a transport that has none raises `NotSupportedError` and the
caller picks a schedule instead.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .wakeup import Bell


class TransportError(RuntimeError):
    """A transport failed; the message names the rank, peer and operation."""


class CollectiveTimeoutError(TransportError, TimeoutError):
    """A peer did not answer within the timeout."""


class NotSupportedError(TransportError):
    pass


class Handle(abc.ABC):
    """One posted send or receive.

    `blocking` handles (Gloo's send/recv report completion only from `wait()`) progress
    in their library's own threads; the executor finishes every pollable handle of a
    phase first and only then blocks on these, so no shared-memory stream stalls behind
    them.
    """

    blocking = False
    # A `wakeup.Bell` rung whenever this handle may have progressed (None: it must be
    # polled). When every pending handle has one, the executor sleeps on them.
    bell: Bell | None = None

    @abc.abstractmethod
    def test(self) -> bool:
        """Make what progress is possible without blocking; True once complete."""

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        backoff = Backoff()
        while not self.test():
            if time.monotonic() > deadline:
                raise CollectiveTimeoutError(f"{self.describe()} timed out after {timeout:.1f} s")
            backoff.pause()

    def describe(self) -> str:
        return type(self).__name__


class Backoff:
    """Polling without starving other ranks on an oversubscribed machine.

    A few hot spins for the latency-critical case, then yielding, then short sleeps; with
    more ranks than cores a pure busy-poll makes every collective crawl (the reason Open
    MPI needs `mpi_yield_when_idle` here).
    """

    def __init__(self, spins: int = 32, max_sleep: float = 0.0005) -> None:
        self.count = 0
        self.spins = spins
        self.max_sleep = max_sleep

    def reset(self) -> None:
        self.count = 0

    def pause(self) -> None:
        self.count += 1
        if self.count <= self.spins:
            return
        if self.count <= 2 * self.spins:
            time.sleep(0)
            return
        time.sleep(min(self.max_sleep, 0.00002 * (self.count - 2 * self.spins)))


@dataclass(frozen=True)
class NativeCall:
    """A native collective for `Transport.native`: the step's arguments with tensors."""

    collective: str
    group: tuple[int, ...]
    src: torch.Tensor
    dst: torch.Tensor
    counts: tuple[int, ...]
    op: str
    root: int


class Transport(abc.ABC):
    """Point-to-point messaging between the ranks of one job, by global rank."""

    name: str = "transport"
    preferred_executor: str = "dataflow"  # the executor mode when TOPOCOLL_EXECUTOR is unset
    # Waits by calling into its library back to back (MPI progresses only inside its
    # calls), so its ranks keep their cores busy while they wait. Beside such ranks the
    # shared-memory transport keeps to its copying ring: a cross-memory read (CMA) of a
    # rank that spins was seen to stall for seconds (see `SharedMemoryTransport`).
    busy_waits: bool = False

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size

    @abc.abstractmethod
    def isend(self, tensor: torch.Tensor, peer: int, tag: int) -> Handle:
        """Start sending the contiguous `tensor` to `peer`."""

    @abc.abstractmethod
    def irecv(self, tensor: torch.Tensor, peer: int, tag: int) -> Handle:
        """Start receiving into the contiguous `tensor` from `peer`."""

    def barrier(self) -> None:
        """Every rank of the job reaches this point before any leaves it."""
        raise NotSupportedError(f"{self.name}: no barrier")

    def native(self, call: NativeCall) -> None:
        """Run a native collective on a sub-group (blocking)."""
        raise NotSupportedError(f"{self.name}: no native {call.collective}")

    # The baselines the benchmark compares against: the library's own collectives.
    def native_all_reduce(self, tensor: torch.Tensor, op: str) -> None:
        raise NotSupportedError(f"{self.name}: no native all_reduce")

    def native_all_to_all_v(self, out: torch.Tensor, inp: torch.Tensor,
                            out_splits: Sequence[int], in_splits: Sequence[int]) -> None:
        raise NotSupportedError(f"{self.name}: no native all_to_all_v")

    def native_reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor, op: str) -> None:
        raise NotSupportedError(f"{self.name}: no native reduce_scatter")

    def native_all_gather(self, out: torch.Tensor, inp: torch.Tensor) -> None:
        raise NotSupportedError(f"{self.name}: no native all_gather")

    def hold_wakeups(self) -> None:
        """Collect the wake-ups of peers that posting messages would send, until
        `release_wakeups` (the executor brackets a batch of posts with the two)."""

    def release_wakeups(self) -> None:
        """Send the wake-ups collected since `hold_wakeups`."""

    def close(self) -> None:
        """Release what the transport holds (segments, endpoints)."""

    def version(self) -> str:
        return ""


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's storage as uint8, for transports that move raw bytes (bf16 included)."""
    flat = tensor.reshape(-1)
    return flat.view(torch.uint8) if flat.numel() else flat.to(torch.uint8)
