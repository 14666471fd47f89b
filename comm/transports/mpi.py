"""Transport over MPI (mpi4py), for jobs started by `mpirun` (see `mpirun.py`).

Peers are ranks of a private duplicate of the communicator we are given (COMM_WORLD by
default), so our traffic never matches the user's messages. Point-to-point messages move
the tensor's bytes with `Isend`/`Irecv` on a zero-copy uint8 view of its memory (any
dtype, bfloat16 included) and complete through `Request.Test`, i.e. by polling, which is
how the executor overlaps them with other transports.

Native collectives (the benchmark baselines, and `Native` steps on sub-groups) are the MPI
library's own. Data movement (all-gather, all-to-all-v, broadcast) is done on bytes.
Reductions need an MPI datatype; the mapping is `_MPI_TYPES`. MPI has no standard
bfloat16/float16 reduction type, so those dtypes are reduced through a float32 copy:
the tensor is widened to float32, reduced, averaged if asked, and rounded back once at
the end. The result is at least as accurate as reducing in the narrow type (one rounding
instead of one per step), but it moves twice the bytes and costs two local copies, which
matters when the all-reduce is used as a baseline. "avg" is sum-then-divide, for floating
dtypes only (MPI has no average and an integer average has no agreed rounding).

Sub-communicators for `native()` are made with `MPI_Comm_create_group`, which is
collective over the members only, so a sub-group is created lazily the first time its
members reach a step on it, and cached per ranks tuple for the life of the transport.
Rank order in the tuple is kept: member i of the group is rank i of its communicator.

Limits: CPU tensors only (this Open MPI build is not CUDA-aware); contiguous tensors only;
byte counts of one message, or of one rank's part of a collective, must fit a C int
(< 2 GiB) because Open MPI 5.0 has no MPI-4 large-count calls. Each limit raises a
`TransportError` that says so.

Timeouts and failed peers: MPI has no timeout on a blocking call, and nothing can
interrupt one (measured with Open MPI 5.0.11: `MPI_Comm_revoke` from a watchdog thread
did not free ranks blocked in `MPI_Allreduce` until the stalled peer joined; `Cancel`
does not apply to collectives). So every wait here is `Test` polled until the transport's
`timeout` (point-to-point and native collectives alike: natives are posted as MPI's
nonblocking collectives, `Iallreduce`, `Ialltoallv`...), then a `CollectiveTimeoutError`.
The price: Open MPI runs its nonblocking all-reduce with other algorithms (libnbc) than
the blocking one (tuned), 12-48% slower from 256 KiB to 64 MiB on 4 local ranks (all-to-
all: no slower). A baseline must be MPI as its users call it, so `topocoll bench` sets
`TOPOCOLL_MPI_BLOCKING_NATIVES=1`: natives are then the blocking calls, unbounded.
Whether a survivor gets that chance depends on the launcher: by default Open MPI's
runtime kills the whole job when one rank dies; under `mpirun --with-ft ulfm`
(`run_mpirun(..., fault_tolerant=True)`) the job survives, requests to the dead rank
fail with MPI_ERR_PROC_FAILED within about a second, and on the first failure or timeout
this transport revokes its communicators (ULFM's `MPI_Comm_revoke`), so every other
rank's pending operations fail with MPI_ERR_REVOKED at once instead of waiting out their
own timeouts. Buffers of requests abandoned that way stay referenced for the life of the
transport, so a late message can never land in freed memory. A rank that gives up ends
MPI with `finalize_bounded()` (which `Job.abort()` calls).

mpi4py is imported lazily: importing this module never needs it.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import os
import re
import sys
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import (
    CollectiveTimeoutError,
    Handle,
    NativeCall,
    Transport,
    TransportError,
    as_bytes,
)

MISSING_EXTRA = "MPI transport needs the 'mpi' extra: pip install 'topocoll[mpi]'"
INT_MAX = 2**31 - 1
FT_ENV = "OMPI_MCA_mpi_ft_enable"  # exported to the ranks by `mpirun --with-ft ulfm`
FINALIZE_STUCK = "topocoll: MPI_Finalize did not return after a failure"
BLOCKING_NATIVES_ENV = "TOPOCOLL_MPI_BLOCKING_NATIVES"

# torch dtype -> MPI datatype name (resolved on the MPI module when used).
_MPI_TYPES = {
    torch.float32: "FLOAT",
    torch.float64: "DOUBLE",
    torch.int8: "INT8_T",
    torch.int16: "INT16_T",
    torch.int32: "INT32_T",
    torch.int64: "INT64_T",
    torch.uint8: "UINT8_T",
    torch.complex64: "C_FLOAT_COMPLEX",
    torch.complex128: "C_DOUBLE_COMPLEX",
}
# Reduced through a float32 copy (see the module docstring).
_STAGED = (torch.bfloat16, torch.float16)
_REDUCE_OPS = {"sum": "SUM", "prod": "PROD", "min": "MIN", "max": "MAX"}


def load_mpi() -> Any:
    """The `mpi4py.MPI` module, or an ImportError that names the extra to install."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        if getattr(exc, "name", None) == "mpi4py":
            raise ImportError(MISSING_EXTRA) from None
        # mpi4py is there but its MPI library is not loadable: keep the reason.
        raise ImportError(f"{MISSING_EXTRA} ({_mpi_message(exc)})") from None
    return MPI


def mpi_available() -> bool:
    try:
        load_mpi()
    except ImportError:
        return False
    return True


def library_version(MPI: Any) -> str:
    """First line of `MPI_Get_library_version`, short: 'Open MPI 5.0.11', 'MPICH 4.2.0'."""
    first = MPI.Get_library_version().strip().splitlines()[0]
    first = re.sub(r"\s+", " ", first.split(",")[0]).replace(" Version:", "")
    return re.sub(r"\bv(\d)", r"\1", first).strip()


class _RequestHandle(Handle):
    """One MPI request; keeps the buffer (and tensor) alive until it completes.

    Blocking: MPI moves data only inside MPI calls, so once the executor has nothing
    else to poll it waits here, calling `Test` back to back (each call runs MPI's progress
    engine for every request of the job and, with `mpi_yield_when_idle`, yields the core,
    as MPI's own `Wait` loop does) instead of sleeping between `Test`s; unlike `Wait`,
    the loop ends at the deadline.
    """

    blocking = True

    def __init__(self, MPI: Any, req: Any, tensor: torch.Tensor, buf: np.ndarray, what: str,
                 expect_bytes: int | None = None,
                 transport: MPITransport | None = None) -> None:
        self.MPI = MPI
        self.transport = transport
        self.req = req
        self.keep: tuple[Any, ...] | None = (tensor, buf)
        self.what = what
        self.expect_bytes = expect_bytes
        self.status = MPI.Status() if expect_bytes is not None else None
        self.done = False
        self.error: str | None = None  # a failed request stays failed when tested again

    def test(self) -> bool:
        if self.error is not None:
            raise TransportError(self.error)
        if self.done:
            return True
        status = self.status
        try:
            flag = self.req.Test(status)
        except self.MPI.Exception as exc:
            self.error = f"{self.what} failed: {_mpi_message(exc)}"
            self._abandon()
            raise TransportError(self.error) from exc
        if not flag:
            return False
        self._finish()
        return True

    def _abandon(self) -> None:
        """The request failed or timed out: park its buffer, tell the other ranks."""
        if self.transport is not None:
            self.transport.abandon(self.req, self.keep)
        self.keep = None

    def _finish(self) -> None:
        """The request completed: release the buffer and check the received size."""
        status = self.status
        self.done = True
        self.keep = None
        if status is not None:
            got = status.Get_count(self.MPI.BYTE)
            if got != self.expect_bytes:
                self.error = (f"{self.what}: got a {got}-byte message, "
                              f"expected {self.expect_bytes} bytes")
                raise TransportError(self.error)

    def wait(self, timeout: float) -> None:
        """`Test` back to back until complete; past `timeout` s, CollectiveTimeoutError."""
        deadline = time.monotonic() + timeout
        while not self.test():
            if time.monotonic() > deadline:
                self._abandon()
                raise CollectiveTimeoutError(f"{self.what} timed out after {timeout:.1f} s")

    def describe(self) -> str:
        return self.what


class MPITransport(Transport):
    """Point-to-point and native collectives over an mpi4py communicator."""

    name = "mpi"
    preferred_executor = "phased"  # data moves only inside MPI calls (see Executor)
    busy_waits = True  # `_RequestHandle.wait` calls Test back to back

    def __init__(self, comm: Any = None, timeout: float | None = None,
                 blocking_natives: bool | None = None) -> None:
        """`timeout` bounds every native collective and barrier (seconds; default
        `TOPOCOLL_TIMEOUT`, else 300); the executor bounds point-to-point waits itself.
        `blocking_natives` (default: `TOPOCOLL_MPI_BLOCKING_NATIVES=1`) runs native
        collectives as MPI's blocking calls, unbounded, for baselines (see the module
        docstring)."""
        self.timeout = float(timeout if timeout is not None
                             else os.environ.get("TOPOCOLL_TIMEOUT", "300"))
        if blocking_natives is None:
            blocking_natives = os.environ.get(BLOCKING_NATIVES_ENV, "") == "1"
        self.blocking_natives = blocking_natives
        # Set by `mpirun --with-ft ulfm`: the job survives a dead rank, so revoking our
        # communicators on a failure is what tells the other ranks.
        self.fault_tolerant = os.environ.get(FT_ENV, "") in ("1", "true")
        self._abandoned: list[tuple[Any, Any]] = []
        self._revoked = False
        MPI = load_mpi()
        self.MPI = MPI
        parent = comm if comm is not None else MPI.COMM_WORLD
        # Our own context: nothing we send can match a receive of the user's, or theirs ours.
        self.comm = parent.Dup()
        with contextlib.suppress(MPI.Exception):
            self.comm.Set_name("topocoll")
        super().__init__(self.comm.Get_rank(), self.comm.Get_size())
        tag_ub = self.comm.Get_attr(MPI.TAG_UB)
        self.tag_ub = int(tag_ub) if tag_ub is not None else 32767  # MPI's guaranteed minimum
        self._subcomms: dict[tuple[int, ...], Any] = {}
        self._closed = False

    # -- point to point -------------------------------------------------------------------

    def isend(self, tensor: torch.Tensor, peer: int, tag: int) -> Handle:
        buf = self._bytes(tensor, f"send to rank {peer}")
        self._check_peer_tag(peer, tag, "send to")
        what = f"mpi rank {self.rank} send of {buf.nbytes} B to rank {peer} (tag {tag})"
        with self._errors(what):
            req = self.comm.Isend([buf, self.MPI.BYTE], peer, tag)
        return _RequestHandle(self.MPI, req, tensor, buf, what, transport=self)

    def irecv(self, tensor: torch.Tensor, peer: int, tag: int) -> Handle:
        buf = self._bytes(tensor, f"recv from rank {peer}")
        self._check_peer_tag(peer, tag, "recv from")
        what = f"mpi rank {self.rank} recv of {buf.nbytes} B from rank {peer} (tag {tag})"
        with self._errors(what):
            req = self.comm.Irecv([buf, self.MPI.BYTE], peer, tag)
        return _RequestHandle(self.MPI, req, tensor, buf, what, expect_bytes=buf.nbytes,
                              transport=self)

    def barrier(self) -> None:
        what = f"mpi rank {self.rank} barrier"
        with self._errors(what):
            req = self.comm.Ibarrier()
        self._complete(req, what)

    # -- failures -------------------------------------------------------------------------

    def _complete(self, req: Any, what: str, *keep: Any) -> None:
        """`Test` a nonblocking collective until done; bounded by `self.timeout`.

        `keep` (the buffers) is parked with the request if it fails or times out."""
        deadline = time.monotonic() + self.timeout
        try:
            while not req.Test():
                if time.monotonic() > deadline:
                    self.abandon(req, keep)
                    raise CollectiveTimeoutError(f"{what} timed out after "
                                                 f"{self.timeout:.1f} s")
        except self.MPI.Exception as exc:
            self.abandon(req, keep)
            raise TransportError(f"{what} failed: {_mpi_message(exc)}") from exc

    def _collective(self, comm: Any, name: str, args: tuple[Any, ...], what: str,
                    *keep: Any) -> None:
        """`comm.<name>(*args)`, a native collective: posted as its nonblocking form
        (`Allreduce` -> `Iallreduce`) and bounded by the timeout, or, with
        `blocking_natives`, MPI's own blocking call, which nothing bounds."""
        if self.blocking_natives:
            with self._errors(what):
                getattr(comm, name)(*args)
            return
        with self._errors(what):
            req = getattr(comm, "I" + name[0].lower() + name[1:])(*args)
        self._complete(req, what, *keep)

    def abandon(self, req: Any, keep: Any) -> None:
        """A request we stop waiting for: keep its buffers alive (MPI may still write
        them) and, in a fault-tolerant job, revoke our communicators so that every other
        rank's pending operations fail now rather than at their own timeouts."""
        self._abandoned.append((req, keep))
        self.revoke()

    def revoke(self) -> None:
        """ULFM's `MPI_Comm_revoke` on our communicators (once; fault-tolerant jobs only)."""
        if self._revoked or not self.fault_tolerant or self._closed:
            return
        self._revoked = True
        for comm in (self.comm, *self._subcomms.values()):
            with contextlib.suppress(Exception):  # best effort: no ULFM, already revoked
                if comm != self.MPI.COMM_NULL:
                    comm.Revoke()

    # -- native collectives on sub-groups -------------------------------------------------

    def subcomm(self, ranks: tuple[int, ...]) -> Any:
        """The communicator of `ranks` (member i is its rank i), created on first use."""
        ranks = tuple(int(r) for r in ranks)
        if ranks == tuple(range(self.world_size)):
            return self.comm
        sub = self._subcomms.get(ranks)
        if sub is not None:
            return sub
        if self.rank not in ranks:
            raise TransportError(f"mpi rank {self.rank} is not a member of group {ranks}")
        if len(set(ranks)) != len(ranks) or not all(0 <= r < self.world_size for r in ranks):
            raise TransportError(f"mpi: bad group {ranks} for {self.world_size} ranks")
        # Only the members call this. The tag keeps concurrent creations on overlapping
        # groups apart; all members compute the same one.
        tag = zlib.crc32(repr(ranks).encode()) % (self.tag_ub + 1)
        with self._errors(f"mpi rank {self.rank} creating the communicator of {ranks}"):
            world_group = self.comm.Get_group()
            group = world_group.Incl(list(ranks))
            try:
                sub = self.comm.Create_group(group, tag)
            finally:
                group.Free()
                world_group.Free()
        self._subcomms[ranks] = sub
        return sub

    def native(self, call: NativeCall) -> None:
        comm = self.subcomm(call.group)
        counts = list(call.counts)
        if call.collective == "all_reduce":
            _same_or_copy(call.dst, call.src)
            self._all_reduce(comm, call.dst, call.op)
        elif call.collective == "broadcast":
            if comm.Get_rank() == call.root:
                _same_or_copy(call.dst, call.src)
            self._broadcast(comm, call.dst, call.root)
        elif call.collective == "all_gather":
            self._all_gather(comm, call.dst, call.src, counts or None)
        elif call.collective == "reduce_scatter":
            self._reduce_scatter(comm, call.dst, call.src, counts or None, call.op)
        else:
            raise TransportError(f"{self.name}: no native {call.collective}")

    # -- the benchmark baselines ----------------------------------------------------------

    def native_all_reduce(self, tensor: torch.Tensor, op: str) -> None:
        self._all_reduce(self.comm, tensor, op)

    def native_all_to_all_v(self, out: torch.Tensor, inp: torch.Tensor,
                            out_splits: Sequence[int], in_splits: Sequence[int]) -> None:
        size = self.world_size
        if len(out_splits) != size or len(in_splits) != size:
            raise TransportError(f"mpi all_to_all_v: {size} splits needed, got "
                                 f"{len(out_splits)} out and {len(in_splits)} in")
        if sum(out_splits) != out.numel() or sum(in_splits) != inp.numel():
            raise TransportError(f"mpi all_to_all_v: splits sum to {sum(out_splits)} out / "
                                 f"{sum(in_splits)} in, tensors hold {out.numel()} / "
                                 f"{inp.numel()} elements")
        _same_dtype(out, inp, "all_to_all_v")
        esize = out.element_size()
        send = self._bytes(inp, "all_to_all_v input")
        recv = self._bytes(out, "all_to_all_v output")
        scounts, sdispls = _byte_layout(in_splits, esize, "all_to_all_v")
        rcounts, rdispls = _byte_layout(out_splits, esize, "all_to_all_v")
        byte = self.MPI.BYTE
        what = f"rank {self.rank}: all_to_all_v (native) over mpi"
        self._collective(self.comm, "Alltoallv", ([send, scounts, sdispls, byte],
                                                  [recv, rcounts, rdispls, byte]),
                         what, send, recv)

    def native_reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor, op: str) -> None:
        self._reduce_scatter(self.comm, out, inp, None, op)

    def native_all_gather(self, out: torch.Tensor, inp: torch.Tensor) -> None:
        self._all_gather(self.comm, out, inp, None)

    # -- life cycle -----------------------------------------------------------------------

    def close(self) -> None:
        """Free the duplicated communicators (idempotent; a no-op after MPI_Finalize)."""
        if self._closed:
            return
        self._closed = True
        if self.MPI.Is_finalized():
            return
        for sub in self._subcomms.values():
            if sub != self.MPI.COMM_NULL:
                sub.Free()
        self._subcomms.clear()
        self.comm.Free()

    def finalize_bounded(self, limit: float = 10.0) -> None:
        """`MPI_Finalize` now, and if it has not returned after `limit` s, end the process.

        For a rank that gives up after a failure. Open MPI 5's finalize waits in a runtime
        fence for every rank of the job, and with ULFM that fence can wait forever on a
        rank that died (open-mpi/ompi#9434, #11404; here in 11 of about 50 trials of
        `benchmarks/faults.py` while we worked on it, 0 of the final 40), or on a stalled
        one. A watchdog thread then prints why and calls `os._exit(0)`: whatever
        the caller did before giving up is done, and nothing is left to clean but MPI's
        own state, which the runtime reclaims. mpi4py's `Finalize` holds the GIL (seen
        with gdb: the watchdog waited for it forever), so we call the library's
        `MPI_Finalize` through ctypes, which releases it; mpi4py then finds MPI finalized
        and skips its own call at exit. Where libmpi cannot be found, faulthandler's
        GIL-free timer bounds mpi4py's `Finalize` instead (it exits with status 1).
        """
        if self.MPI.Is_finalized():
            return
        returned = threading.Event()

        def watchdog() -> None:
            if not returned.wait(limit):
                sys.stderr.write(f"{FINALIZE_STUCK} ({limit:.0f} s, rank {self.rank}); "
                                 "exiting without it\n")
                sys.stderr.flush()
                os._exit(0)

        library = _loaded_libmpi()
        if library is None:
            faulthandler.dump_traceback_later(limit, exit=True)
            try:
                self.MPI.Finalize()
            finally:
                faulthandler.cancel_dump_traceback_later()
            return
        threading.Thread(target=watchdog, name="topocoll-finalize-watchdog",
                         daemon=True).start()
        try:
            library.MPI_Finalize()
        finally:
            returned.set()

    def version(self) -> str:
        import mpi4py

        return f"mpi4py {mpi4py.__version__} / {library_version(self.MPI)}"

    # -- helpers --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except self.MPI.Exception as exc:
            raise TransportError(f"{what} failed: {_mpi_message(exc)}") from exc
        except OverflowError as exc:
            raise TransportError(f"{what}: a count does not fit a C int ({exc})") from exc

    def _check_peer_tag(self, peer: int, tag: int, verb: str) -> None:
        if not 0 <= peer < self.world_size:
            raise TransportError(f"mpi rank {self.rank}: {verb} rank {peer}, but the "
                                 f"communicator has {self.world_size} ranks")
        if not 0 <= tag <= self.tag_ub:
            raise TransportError(f"mpi rank {self.rank}: tag {tag} ({verb} rank {peer}) is "
                                 f"outside MPI's range 0..{self.tag_ub} (MPI_TAG_UB)")

    def _bytes(self, tensor: torch.Tensor, what: str) -> np.ndarray:
        if tensor.device.type != "cpu":
            raise TransportError(f"mpi rank {self.rank} {what}: the MPI transport moves CPU "
                                 f"tensors only (got {tensor.device}); this MPI is not "
                                 "CUDA-aware")
        if not tensor.is_contiguous():
            raise TransportError(f"mpi rank {self.rank} {what}: tensor is not contiguous")
        buf = as_bytes(tensor).numpy()
        if buf.nbytes > INT_MAX:
            raise TransportError(f"mpi rank {self.rank} {what}: {buf.nbytes} bytes is more "
                                 "than one MPI message can count (2 GiB); split it")
        return buf

    def _typed(self, tensor: torch.Tensor, what: str) -> list[Any]:
        name = _MPI_TYPES.get(tensor.dtype)
        if name is None:
            raise TransportError(f"mpi {what}: no MPI reduction datatype for {tensor.dtype}")
        return [self._bytes(tensor, what), getattr(self.MPI, name)]

    def _op(self, op: str) -> Any:
        name = _REDUCE_OPS.get(op)
        if name is None:
            raise TransportError(f"mpi: unknown reduction {op!r}")
        return getattr(self.MPI, name)

    def _all_reduce(self, comm: Any, tensor: torch.Tensor, op: str) -> None:
        base = _base_op(op, tensor)
        work = tensor.to(torch.float32) if tensor.dtype in _STAGED else tensor
        what = f"rank {self.rank}: all_reduce (native) over mpi ({op}, {tensor.dtype})"
        buf = self._typed(work, "all_reduce")
        self._collective(comm, "Allreduce", (self.MPI.IN_PLACE, buf, self._op(base)), what,
                         buf)
        if op == "avg":
            work.div_(comm.Get_size())
        if work is not tensor:
            tensor.copy_(work)

    def _reduce_scatter(self, comm: Any, out: torch.Tensor, inp: torch.Tensor,
                        counts: list[int] | None, op: str) -> None:
        size, me = comm.Get_size(), comm.Get_rank()
        counts = counts if counts is not None else [out.numel()] * size
        if len(counts) != size or sum(counts) != inp.numel() or counts[me] != out.numel():
            raise TransportError(f"mpi reduce_scatter: counts {counts} do not fit input "
                                 f"{inp.numel()} / output {out.numel()} on {size} ranks")
        _same_dtype(out, inp, "reduce_scatter")
        base = _base_op(op, out)
        staged = out.dtype in _STAGED
        send = inp.to(torch.float32) if staged else inp
        recv = torch.empty(out.numel(), dtype=torch.float32) if staged else out
        sendbuf, recvbuf = self._typed(send, "reduce_scatter"), self._typed(recv, "reduce_scatter")
        what = f"rank {self.rank}: reduce_scatter (native) over mpi ({op}, {out.dtype})"
        if len(set(counts)) == 1:
            self._collective(comm, "Reduce_scatter_block", (sendbuf, recvbuf, self._op(base)),
                             what, sendbuf, recvbuf)
        else:
            self._collective(comm, "Reduce_scatter",
                             (sendbuf, recvbuf, counts, self._op(base)), what, sendbuf, recvbuf)
        if op == "avg":
            recv.div_(size)
        if recv is not out:
            out.copy_(recv)

    def _all_gather(self, comm: Any, out: torch.Tensor, inp: torch.Tensor,
                    counts: list[int] | None) -> None:
        size, me = comm.Get_size(), comm.Get_rank()
        _same_dtype(out, inp, "all_gather")
        send = self._bytes(inp, "all_gather input")
        recv = self._bytes(out, "all_gather output")
        byte = self.MPI.BYTE
        what = f"rank {self.rank}: all_gather (native) over mpi"
        if counts is None or len(set(counts)) == 1:
            if out.numel() != size * inp.numel():
                raise TransportError(f"mpi all_gather: output holds {out.numel()} elements, "
                                     f"{size} x {inp.numel()} needed")
            self._collective(comm, "Allgather", ([send, byte], [recv, byte]), what, send, recv)
            return
        if len(counts) != size or counts[me] != inp.numel() or sum(counts) != out.numel():
            raise TransportError(f"mpi all_gather: counts {counts} do not fit input "
                                 f"{inp.numel()} / output {out.numel()} on {size} ranks")
        rcounts, rdispls = _byte_layout(counts, out.element_size(), "all_gather")
        self._collective(comm, "Allgatherv", ([send, byte], [recv, rcounts, rdispls, byte]),
                         what, send, recv)

    def _broadcast(self, comm: Any, tensor: torch.Tensor, root: int) -> None:
        buf = self._bytes(tensor, "broadcast")
        what = f"rank {self.rank}: broadcast (native) over mpi from member {root}"
        self._collective(comm, "Bcast", ([buf, self.MPI.BYTE], root), what, buf)


def _loaded_libmpi() -> ctypes.CDLL | None:
    """The MPI library this process has loaded (the one mpi4py uses), or None."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        path = line.split()[-1] if line.split() else ""
        if re.search(r"/libmpi\.so(\.\d+)*$", path):
            try:
                return ctypes.CDLL(path)  # dlopen of a loaded library: the same handle
            except OSError:
                return None
    return None


def _base_op(op: str, tensor: torch.Tensor) -> str:
    if op != "avg":
        return op
    if not (tensor.is_floating_point() or tensor.is_complex()):
        raise TransportError(f"mpi: 'avg' needs a floating dtype, not {tensor.dtype}")
    return "sum"


def _same_dtype(out: torch.Tensor, inp: torch.Tensor, what: str) -> None:
    if out.dtype != inp.dtype:
        raise TransportError(f"mpi {what}: input is {inp.dtype}, output is {out.dtype}")


def _same_or_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    if src.data_ptr() != dst.data_ptr() or src.numel() != dst.numel():
        dst.copy_(src)


def _byte_layout(splits: Sequence[int], esize: int, what: str) -> tuple[list[int], list[int]]:
    counts = [int(s) * esize for s in splits]
    displs = [0] * len(counts)
    for i in range(1, len(counts)):
        displs[i] = displs[i - 1] + counts[i - 1]
    if counts and max(max(counts), displs[-1]) > INT_MAX:
        raise TransportError(f"mpi {what}: byte counts/displacements exceed 2 GiB, which "
                             "Open MPI 5.0 cannot express (no large-count calls)")
    return counts, displs


def _mpi_message(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


__all__ = ["MISSING_EXTRA", "MPITransport", "library_version", "load_mpi", "mpi_available"]
