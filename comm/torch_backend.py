"""The drop-in torch.distributed backend: `init_process_group(backend="topocoll")`.

torch's C++ `Backend` cannot be subclassed from Python, but a Python subclass of
`ProcessGroup` returned by a registered creator is used as the group itself (the route
torchft takes). Our group owns an inner native group per device type (Gloo for CPU
tensors, NCCL for CUDA tensors) plus a `Communicator` that runs our algorithms over it
(and over shared memory inside a node, for CPU tensors).

All-reduce, all-to-all (single and list forms), reduce-scatter and all-gather into a
tensor run our schedules; every other collective is delegated to the inner group, so
nothing a user calls raises NotImplementedError. Calls run to completion before they
return; the returned Work is already complete, and its `wait()` and `get_future()` behave
as Gloo's do.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import _create_work_from_future

from topocoll.topology import Topology, topology_from_env

from .bootstrap import StoreBootstrap
from .communicator import DEFAULT_TIMEOUT, Communicator, job_id
from .executor import LevelTransports
from .transports.shm import SharedMemoryTransport, host_identity, shm_namespace
from .transports.torch_pg import (
    TorchPGTransport,
    reverse_gloo_group,
    split_directions_wanted,
)
from .tuning import load_for_job

BACKEND_NAME = "topocoll"
log = logging.getLogger("topocoll")

_OPS: list[tuple[Any, str]] = [
    (dist.ReduceOp.SUM, "sum"), (dist.ReduceOp.PRODUCT, "prod"), (dist.ReduceOp.MIN, "min"),
    (dist.ReduceOp.MAX, "max"), (dist.ReduceOp.AVG, "avg"),
]

# Collectives we delegate unchanged to the inner native group of the tensors' device.
DELEGATED = (
    "broadcast", "reduce", "allgather", "allgather_coalesced", "allreduce_coalesced",
    "gather", "scatter", "reduce_scatter", "send", "recv", "recv_anysource",
    "monitored_barrier",
)


def op_name(reduce_op: Any) -> str | None:
    """Our name for a torch ReduceOp, None for ops we leave to the inner group."""
    for torch_op, name in _OPS:
        if reduce_op == torch_op:
            return name
    return None


def _completed(result: Any) -> dist.Work:
    future: torch.futures.Future = torch.futures.Future()
    future.set_result(result)
    return _create_work_from_future(future)


def _first_device(args: Sequence[Any]) -> torch.device:
    """The device of the first tensor found in (nested lists of) arguments."""
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return arg.device
        if isinstance(arg, (list, tuple)):
            for item in arg:
                if isinstance(item, torch.Tensor):
                    return item.device
                if isinstance(item, (list, tuple)) and item and isinstance(item[0],
                                                                           torch.Tensor):
                    return item[0].device
    return torch.device("cpu")


def _delegate(name: str) -> Callable[..., Any]:
    def method(self: ProcessGroupTopocoll, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.inner(_first_device(args)), name)(*args, **kwargs)

    method.__name__ = name
    method.__doc__ = f"`{name}` of the inner native group (Gloo on CPU, NCCL on CUDA)."
    return method


class ProcessGroupTopocoll(dist.ProcessGroup):
    def __init__(self, store: dist.Store, rank: int, size: int, timeout: timedelta,
                 global_ranks: Sequence[int] | None = None) -> None:
        super().__init__(rank, size)
        self._store = store
        self._timeout = timeout
        self._global_ranks = list(global_ranks) if global_ranks else list(range(size))
        self._inner: dict[str, dist.ProcessGroup] = {}
        self._comms: dict[str, Communicator] = {}
        self._bootstrap = StoreBootstrap(dist.PrefixStore("topocoll-boot", store), rank, size,
                                         timeout=timeout.total_seconds())
        self._hosts = self._bootstrap.all_gather_json(host_identity())
        self.topology = self._topology()
        self.inner("cpu")  # create Gloo now, as every rank does: creation is collective

    # ----- construction ------------------------------------------------------------
    def _topology(self) -> Topology:
        override = topology_from_env()
        if override is not None and override.world_size >= max(self._global_ranks) + 1:
            nodes = [override.node_of[g] for g in self._global_ranks]
            order = {n: i for i, n in enumerate(dict.fromkeys(nodes))}
            return Topology(tuple(order[n] for n in nodes), override.rails)
        return Topology.from_hosts(self._hosts)

    @staticmethod
    def _kind(device: torch.device | str) -> str:
        """`cuda`, else `cpu`: a tensor on any other device (meta, mps...) goes to the CPU
        group, which refuses it on every rank. Creating a group for its device instead
        would be a collective step only that rank takes, and the job would hang."""
        kind = torch.device(device).type
        return kind if kind == "cuda" else "cpu"

    def inner(self, device: torch.device | str) -> dist.ProcessGroup:
        """The native group for a device type, created on first use."""
        kind = self._kind(device)
        group = self._inner.get(kind)
        if group is None:
            prefix = dist.PrefixStore(f"topocoll-{kind}", self._store)
            if kind == "cuda":
                group = dist.ProcessGroupNCCL(prefix, self.rank(), self.size())
            else:
                group = dist.ProcessGroupGloo(prefix, self.rank(), self.size(), self._timeout)
            self._inner[kind] = group
        return group

    def communicator(self, device: torch.device) -> Communicator:
        """Our communicator for a device type (see `_kind`), created on first use. Bad
        input is refused by it on every rank as a `CollectiveError` (a ValueError), which
        reaches the caller of `dist.*` as a Python exception."""
        kind = self._kind(device)
        comm = self._comms.get(kind)
        if comm is None:
            reverse = None
            if kind == "cpu" and split_directions_wanted("gloo"):
                reverse = reverse_gloo_group(dist.PrefixStore(f"topocoll-{kind}", self._store),
                                             self.rank(), self.size(), self._timeout)
            inter = TorchPGTransport(self.inner(kind), store=dist.PrefixStore(
                f"topocoll-sub-{kind}", self._store), timeout=self._timeout, reverse=reverse)
            intra_mode = os.environ.get("TOPOCOLL_INTRA", "shm")
            if kind == "cpu" and intra_mode == "shm":
                job = self._bootstrap.broadcast_json(shm_namespace(job_id()))
                intra = SharedMemoryTransport(self.rank(), self.size(), job, self._hosts)
            else:  # CUDA tensors: NCCL inside the node too (CUDA IPC comes later)
                intra = inter
            comm = Communicator(self._bootstrap, LevelTransports(intra=intra, inter=inter),
                                self.topology, self._timeout.total_seconds(),
                                tuning=load_for_job(self.topology, inter.name))
            self._comms[kind] = comm
            atexit.register(self.shutdown)  # unlink shared memory even without destroy
        return comm

    # ----- identity ----------------------------------------------------------------
    def getBackendName(self) -> str:
        return BACKEND_NAME

    def name(self) -> str:
        return BACKEND_NAME

    def _get_backend_name(self) -> str:
        return BACKEND_NAME

    # ----- our algorithms ----------------------------------------------------------
    def allreduce(self, tensors: list[torch.Tensor] | torch.Tensor, opts: Any = None
                  ) -> dist.Work:
        tensors = [tensors] if isinstance(tensors, torch.Tensor) else tensors
        reduce_op = getattr(opts, "reduceOp", dist.ReduceOp.SUM)
        op = op_name(reduce_op)
        if op is None or len(tensors) != 1:
            return self.inner(tensors[0].device).allreduce(tensors, opts or
                                                           dist.AllreduceOptions())
        tensor = tensors[0]
        self.communicator(tensor.device).all_reduce(tensor, op)
        return _completed(tensors)

    def all_to_all_single(self, output: torch.Tensor, input: torch.Tensor,
                          output_split_sizes: list[int], input_split_sizes: list[int],
                          opts: Any = None) -> dist.Work:
        comm = self.communicator(input.device)
        comm.all_to_all_v(output, input, output_split_sizes or None,
                          input_split_sizes or None)
        return _completed([output])

    alltoall_base = all_to_all_single

    def alltoall(self, output_tensors: list[torch.Tensor], input_tensors: list[torch.Tensor],
                 opts: Any = None) -> dist.Work:
        """List form: one contiguous exchange of the flattened tensors, then unpack."""
        flat_in = torch.cat([t.reshape(-1) for t in input_tensors])
        flat_out = torch.empty(sum(t.numel() for t in output_tensors), dtype=flat_in.dtype,
                               device=flat_in.device)
        self.communicator(flat_in.device).all_to_all_v(
            flat_out, flat_in, [t.numel() for t in output_tensors],
            [t.numel() for t in input_tensors])
        offset = 0
        for t in output_tensors:
            t.copy_(flat_out[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
        return _completed(output_tensors)

    def reduce_scatter_single(self, output: torch.Tensor, input: torch.Tensor,
                              opts: Any = None) -> dist.Work:
        op = op_name(getattr(opts, "reduceOp", dist.ReduceOp.SUM))
        if op is None:
            return self.inner(input.device)._reduce_scatter_base(output, input, opts)
        self.communicator(input.device).reduce_scatter(output, input, op)
        return _completed([output])

    _reduce_scatter_base = reduce_scatter_single

    def all_gather_single(self, output: torch.Tensor, input: torch.Tensor,
                          opts: Any = None) -> dist.Work:
        self.communicator(input.device).all_gather(output, input)
        return _completed([output])

    _allgather_base = all_gather_single

    def barrier(self, opts: Any = None) -> dist.Work:
        self.communicator(torch.device("cpu")).barrier()
        return _completed([])

    def shutdown(self) -> None:
        """Close our transports, then the inner native groups, in that order and once:
        left to interpreter teardown, a Gloo group can be destroyed while its threads
        still run (seen once as `terminate called without an active exception`)."""
        for comm in self._comms.values():
            for transport in comm.transports.all():
                transport.close()
        self._comms.clear()
        for group in self._inner.values():
            with contextlib.suppress(Exception):
                group.shutdown()
        self._inner.clear()

    def abort(self) -> None:
        self.shutdown()


for _name in DELEGATED:
    setattr(ProcessGroupTopocoll, _name, _delegate(_name))


def _create(options: Any, backend_options: Any = None) -> ProcessGroupTopocoll:
    """The creator torch calls for every group of our backend (extended API)."""
    timeout = options.timeout or timedelta(seconds=DEFAULT_TIMEOUT)
    return ProcessGroupTopocoll(options.store, options.group_rank, options.group_size,
                                timeout, list(options.global_ranks_in_group or []))


def register() -> None:
    """Make `backend="topocoll"` known to torch.distributed (idempotent)."""
    if BACKEND_NAME.upper() in dist.Backend._plugins:
        return
    dist.Backend.register_backend(BACKEND_NAME, _create, extended_api=True,
                                  devices=["cpu", "cuda"])
