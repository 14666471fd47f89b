"""Transport over a torch.distributed group: Gloo on CPU, NCCL for CUDA tensors.

Accepts either a registered `ProcessGroup` (e.g. the default group of a job) or a raw
backend object (`ProcessGroupGloo(...)`, as the topocoll torch backend creates for its
inner group), so it only calls the methods both have (`send`, `recv`, `allreduce`,
`broadcast`, `allgather`, `alltoall_base`, `_allgather_base`, `barrier`), never the
`dist.*` functions that need a registered group. Peers are ranks of that group.

With a `reverse` group (a second group of the same ranks, hence a second set of
connections), messages from a higher rank to a lower one travel on it, so every TCP
connection carries bulk data one way only. Measured on the emulated cluster (jumbo
frames, 1 Gbit/s tbf): four rank pairs swapping 16 MiB over one Gloo connection each got
72-105 MB/s each way; over one connection per direction, 117-123 MB/s (the line rate).
Algorithms exchange in pairs all the time (ring neighbours on two nodes, recursive
doubling, the inter-node step of `hierarchical`).

Sub-groups for native collectives are created on first use by their members only:
from the store when one is given (a Gloo group over a prefixed store), else with
`dist.new_group(..., use_local_synchronization=True)`; cached either way.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .base import CollectiveTimeoutError, Handle, NativeCall, Transport, TransportError
from .wakeup import PipeBell

_REDUCE_OPS = {
    "sum": dist.ReduceOp.SUM,
    "prod": dist.ReduceOp.PRODUCT,
    "min": dist.ReduceOp.MIN,
    "max": dist.ReduceOp.MAX,
}


_WAITERS = ThreadPoolExecutor(max_workers=32, thread_name_prefix="topocoll-wait")


class _WorkHandle(Handle):
    """Gloo's send/recv work reports completion only from `wait()`, so finding out costs
    a blocked thread. Two ways, picked by what the executor needs:

    - alone (every pending handle is one of these), the executor blocks on `wait()` in
      its own thread (`blocking`): no hand-off, no wake-up of a second thread. For a small
      all-to-all's leader that is most of its waiting, and each hand-off costs a thread
      switch on cores that eight ranks share;
    - beside shared-memory or other pollable handles, the executor asks for a `bell`:
      only then a helper thread waits (the GIL is released meanwhile), rings the bell when
      done, and `test()` polls that thread's future.

    Either wait is bounded by the transport's timeout: Gloo's point-to-point `wait()` has
    none of its own, and a thread blocked forever on a stalled peer would keep the
    process from exiting (the pool's threads are joined at interpreter exit)."""

    blocking = True

    def __init__(self, work: dist.Work, what: str, timeout: timedelta, bell: PipeBell
                 ) -> None:
        self.work = work
        self.what = what
        self.done = False
        self.timeout = timeout
        self._bell = bell
        self.future: Future[Any] | None = None

    @property  # type: ignore[override]
    def bell(self) -> PipeBell:
        """The bell rung on completion; asking for it starts the helper thread's wait."""
        if self.future is None and not self.done:
            self.future = _WAITERS.submit(self.work.wait, self.timeout)
            self.future.add_done_callback(self._bell.ring)
        return self._bell

    def test(self) -> bool:
        if self.done:
            return True
        if self.future is None or not self.future.done():
            return False  # nobody is waiting yet: only wait() or the bell can tell
        try:
            self.future.result()
        except RuntimeError as exc:
            raise _transport_error(self.what, exc) from exc
        self.done = True
        return True

    def wait(self, timeout: float) -> None:
        """Block until complete: on the helper thread's future if one waits already,
        else on Gloo's own `wait()` right here (no polling either way)."""
        if self.done:
            return
        if self.future is None:
            limit = min(timedelta(seconds=max(timeout, 0.001)), self.timeout)
            try:
                self.work.wait(limit)
            except RuntimeError as exc:
                raise _transport_error(self.what, exc) from exc
            self.done = True
            return
        try:
            self.future.result(timeout)
        except FutureTimeout:  # the builtin TimeoutError only from Python 3.11
            raise CollectiveTimeoutError(f"{self.what} timed out after {timeout:.1f} s"
                                         ) from None
        self.test()

    def describe(self) -> str:
        return self.what


SPLIT_ENV = "TOPOCOLL_GLOO_SPLIT_DIRECTIONS"


def split_directions_wanted(backend: str) -> bool:
    """A second group for the reverse direction: Gloo only (NCCL's channels are not one
    TCP connection per pair), on by default, off with TOPOCOLL_GLOO_SPLIT_DIRECTIONS=0."""
    return backend == "gloo" and os.environ.get(SPLIT_ENV, "1") != "0"


def reverse_gloo_group(store: dist.Store, rank: int, world_size: int, timeout: timedelta
                       ) -> Any:
    """The second Gloo group of the same ranks (a collective step: every rank calls it)."""
    return dist.ProcessGroupGloo(dist.PrefixStore("topocoll-reverse", store), rank,
                                 world_size, timeout)


def _transport_error(what: str, exc: BaseException) -> TransportError:
    """torch's error (DistBackendError, a RuntimeError) as ours, naming what failed."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "imed out" in text or "imeout" in text:
        return CollectiveTimeoutError(f"{what} timed out: {text}")
    return TransportError(f"{what} failed: {text}")


def _wait(work: dist.Work | None) -> None:
    if work is not None:
        work.wait()


def _allreduce_opts(op: str) -> dist.AllreduceOptions:
    opts = dist.AllreduceOptions()
    opts.reduceOp = _REDUCE_OPS[op]
    return opts


class TorchPGTransport(Transport):
    def __init__(self, group: Any = None, store: dist.Store | None = None,
                 timeout: timedelta = timedelta(seconds=300), reverse: Any = None) -> None:
        self.group = group if group is not None else dist.group.WORLD
        self.reverse = reverse  # carries higher -> lower rank messages when given
        super().__init__(self.group.rank(), self.group.size())
        self.name = self._backend_name()
        self.store = store
        self.timeout = timeout
        self._subgroups: dict[tuple[int, ...], Any] = {}
        self.bell = PipeBell()  # rung by the threads that wait on Gloo's work

    def _backend_name(self) -> str:
        for getter in ("name", "_get_backend_name"):
            try:
                value = getattr(self.group, getter)()
            except (AttributeError, RuntimeError):
                continue
            if value:
                return str(value).lower()
        return dist.get_backend(self.group)

    def close(self) -> None:
        """Shut the reverse group down (we made it): left to interpreter teardown, a Gloo
        group can be destroyed while its threads still run, and the process aborts with
        `terminate called without an active exception` (seen in the DDP example)."""
        self.bell.close()
        reverse, self.reverse = self.reverse, None
        if reverse is not None:
            with contextlib.suppress(Exception):
                reverse.shutdown()

    def _direction(self, sender: int, receiver: int) -> Any:
        """The group a message from `sender` to `receiver` travels on (both sides agree)."""
        if self.reverse is not None and sender > receiver:
            return self.reverse
        return self.group

    def isend(self, tensor: torch.Tensor, peer: int, tag: int) -> Handle:
        what = f"{self.name} send to rank {peer}"
        with self._failures(what):  # posting fails too once a peer's connection is gone
            work = self._direction(self.rank, peer).send([tensor], peer, tag)
        return _WorkHandle(work, what, self.timeout, self.bell)

    def irecv(self, tensor: torch.Tensor, peer: int, tag: int) -> Handle:
        what = f"{self.name} recv from rank {peer}"
        with self._failures(what):
            work = self._direction(peer, self.rank).recv([tensor], peer, tag)
        return _WorkHandle(work, what, self.timeout, self.bell)

    @contextlib.contextmanager
    def _failures(self, what: str) -> Iterator[None]:
        """torch's errors in the block become ours (TransportError/CollectiveTimeoutError)
        naming the rank and `what`, so callers catch one family of errors."""
        try:
            yield
        except TransportError:
            raise
        except RuntimeError as exc:
            raise _transport_error(f"rank {self.rank}: {what}", exc) from exc

    def barrier(self) -> None:
        with self._failures(f"{self.name} barrier"):
            _wait(self.group.barrier())

    def subgroup(self, ranks: tuple[int, ...]) -> Any:
        """The native group of `ranks` (ranks of our group), made by its members only."""
        if ranks == tuple(range(self.world_size)):
            return self.group
        group = self._subgroups.get(ranks)
        if group is None:
            if self.store is not None:
                prefix = dist.PrefixStore("sub-" + "-".join(map(str, ranks)), self.store)
                group = dist.ProcessGroupGloo(prefix, ranks.index(self.rank), len(ranks),
                                              self.timeout)
            else:
                group = dist.new_group(list(ranks), backend=self.name,
                                       use_local_synchronization=True)
            self._subgroups[ranks] = group
        return group

    def native(self, call: NativeCall) -> None:
        with self._failures(f"{self.name} native {call.collective} on ranks "
                            f"{list(call.group)}"):
            self._native(call)

    def _native(self, call: NativeCall) -> None:
        group = self.subgroup(call.group)
        if call.collective == "all_reduce":
            _wait(group.allreduce([call.dst], _allreduce_opts(call.op)))
        elif call.collective == "broadcast":
            opts = dist.BroadcastOptions()
            opts.rootRank = call.root
            _wait(group.broadcast([call.dst], opts))
        elif call.collective == "all_gather":
            outs = list(call.dst.split(list(call.counts)))
            _wait(group.allgather([outs], [call.src]))
        elif call.collective == "reduce_scatter":
            self._reduce_scatter(group, call.dst, call.src, list(call.counts), call.op,
                                 call.group.index(self.rank))
        else:
            raise TransportError(f"{self.name}: no native {call.collective}")

    @staticmethod
    def _reduce_scatter(group: Any, out: torch.Tensor, inp: torch.Tensor, counts: list[int],
                        op: str, me: int) -> None:
        """Gloo has no reduce-scatter: all-reduce a copy and keep our block."""
        full = inp.clone()
        _wait(group.allreduce([full], _allreduce_opts(op)))
        start = sum(counts[:me])
        out.copy_(full[start:start + counts[me]])

    def native_all_reduce(self, tensor: torch.Tensor, op: str) -> None:
        with self._failures(f"all_reduce (native) over {self.name}"):
            _wait(self.group.allreduce([tensor],
                                       _allreduce_opts("sum" if op == "avg" else op)))
        if op == "avg":
            tensor.div_(self.world_size)

    def native_all_to_all_v(self, out: torch.Tensor, inp: torch.Tensor,
                            out_splits: Sequence[int], in_splits: Sequence[int]) -> None:
        with self._failures(f"all_to_all_v (native) over {self.name}"):
            _wait(self.group.alltoall_base(out, inp, list(out_splits), list(in_splits),
                                           dist.AllToAllOptions()))

    def native_reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor, op: str) -> None:
        counts = [out.numel()] * self.world_size
        with self._failures(f"reduce_scatter (native) over {self.name}"):
            self._reduce_scatter(self.group, out, inp, counts, "sum" if op == "avg" else op,
                                 self.rank)
        if op == "avg":
            out.div_(self.world_size)

    def native_all_gather(self, out: torch.Tensor, inp: torch.Tensor) -> None:
        with self._failures(f"all_gather (native) over {self.name}"):
            _wait(self.group._allgather_base(out, inp))

    def version(self) -> str:
        return f"torch {torch.__version__} {self.name}"
