"""The communicator: topology + transports + executor + algorithm choice, per job.

This is what the torch backend, the benchmark and users' own code call. It validates the
call, picks the algorithm (forced, tuned or default), builds (and caches) the schedule,
and runs this rank's program on views of the caller's tensors.
"""

from __future__ import annotations

import logging
import math
import os
import uuid
from collections import OrderedDict
from collections.abc import Sequence

import torch

from topocoll.topology import Topology, topology_from_env

from .algorithms import NATIVE, TUNED, get_algorithm
from .bootstrap import Bootstrap
from .collectives import CollectiveSpec
from .executor import Executor, LevelTransports
from .ops import UnsupportedOpError, check_op
from .schedule import Schedule
from .selection import Choice, choose, default_params
from .transports.base import Transport
from .transports.shm import SharedMemoryTransport, host_identity

log = logging.getLogger("topocoll")

TORCH_DTYPES: dict[torch.dtype, str] = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.float64: "float64",
    torch.int32: "int32",
    torch.int64: "int64",
}
DEFAULT_TIMEOUT = float(os.environ.get("TOPOCOLL_TIMEOUT", "300"))
_CACHE_SIZE = 256


def _row_elements(tensor: torch.Tensor) -> int:
    """Elements per row of dim 0 (split sizes count rows, as in torch)."""
    return math.prod(tensor.shape[1:]) if tensor.dim() > 1 else 1


class CollectiveError(ValueError):
    """A collective call that cannot be run as given; names rank, collective and problem."""


def job_id() -> str:
    """The launcher's job id (so it can clean up after a crash), else a fresh one."""
    given = os.environ.get("TOPOCOLL_JOB_ID", "")
    return given if given.isalnum() else uuid.uuid4().hex[:12]


class Communicator:
    def __init__(self, bootstrap: Bootstrap, transports: LevelTransports, topology: Topology,
                 timeout: float = DEFAULT_TIMEOUT, tuning: object | None = None) -> None:
        if topology.world_size != bootstrap.world_size:
            raise ValueError(f"topology has {topology.world_size} ranks, job has "
                             f"{bootstrap.world_size}")
        self.bootstrap = bootstrap
        self.rank, self.world_size = bootstrap.rank, bootstrap.world_size
        self.topology = topology
        self.transports = transports
        self.executor = Executor(self.rank, transports, timeout)
        self.tuning = tuning
        self.last_choice: Choice | None = None
        self._schedules: OrderedDict[tuple, Schedule] = OrderedDict()
        self._debug = os.environ.get("TOPOCOLL_DEBUG", "") not in ("", "0")

    @classmethod
    def create(cls, bootstrap: Bootstrap, inter: Transport, intra: str | Transport = "shm",
               topology: Topology | None = None, timeout: float = DEFAULT_TIMEOUT
               ) -> Communicator:
        """`intra="shm"`: shared memory inside a node, `inter` between nodes; "same": `inter`."""
        hosts = bootstrap.all_gather_json(host_identity())
        if topology is None:
            topology = topology_from_env(bootstrap.world_size) or Topology.from_hosts(hosts)
        if intra == "shm":
            job = bootstrap.broadcast_json(job_id())
            intra_transport: Transport = SharedMemoryTransport(
                bootstrap.rank, bootstrap.world_size, job, hosts)
        elif intra == "same":
            intra_transport = inter
        elif isinstance(intra, Transport):
            intra_transport = intra
        else:
            raise ValueError(f"intra must be 'shm', 'same' or a Transport, got {intra!r}")
        return cls(bootstrap, LevelTransports(intra=intra_transport, inter=inter), topology,
                   timeout)

    # ----- helpers ------------------------------------------------------------------
    def _error(self, collective: str, problem: str) -> CollectiveError:
        return CollectiveError(f"rank {self.rank}: {collective}: {problem}")

    def _dtype(self, collective: str, tensor: torch.Tensor) -> str:
        name = TORCH_DTYPES.get(tensor.dtype)
        if name is None:
            raise self._error(collective, f"unsupported dtype {tensor.dtype}; supported: "
                                          f"{', '.join(map(str, TORCH_DTYPES))}")
        if not tensor.is_contiguous():
            raise self._error(collective, "tensor is not contiguous; call .contiguous() "
                                          "first (topocoll sends tensors in place)")
        return name

    def _pick(self, collective: str, nbytes: int, algorithm: str | None) -> str:
        if algorithm in (None, TUNED):
            choice = choose(collective, nbytes, self.topology, self.tuning)
        else:
            if algorithm != NATIVE:
                get_algorithm(collective, algorithm)  # raises with the known names
            choice = Choice(algorithm, "requested")
        self.last_choice = choice
        if self._debug:
            log.warning("topocoll rank %d: %s of %d bytes -> %s (%s)", self.rank, collective,
                        nbytes, choice.algorithm, choice.reason)
        return choice.algorithm

    def schedule(self, algorithm: str, spec: CollectiveSpec, **params: object) -> Schedule:
        """The cached schedule for this call shape (built once, reused)."""
        key = (algorithm, spec, tuple(sorted(params.items())))
        cached = self._schedules.get(key)
        if cached is not None:
            self._schedules.move_to_end(key)
            return cached
        built = get_algorithm(spec.collective, algorithm).build(self.topology, spec, params)
        self._schedules[key] = built
        if len(self._schedules) > _CACHE_SIZE:
            self._schedules.popitem(last=False)
        return built

    def _run(self, schedule: Schedule, buffers: dict[str, torch.Tensor]) -> None:
        what = f"{schedule.collective} ({schedule.algorithm})"
        self.executor.run(schedule.programs[self.rank], buffers, what)

    # ----- collectives --------------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", algorithm: str | None = None,
                   **params: object) -> torch.Tensor:
        """In place; returns `tensor`."""
        dtype = self._dtype("all_reduce", tensor)
        try:
            check_op(op, dtype)
        except UnsupportedOpError as exc:
            raise self._error("all_reduce", str(exc)) from None
        name = self._pick("all_reduce", tensor.numel() * tensor.element_size(), algorithm)
        if name == NATIVE:
            self.transports.inter.native_all_reduce(tensor, op)
            return tensor
        spec = CollectiveSpec.all_reduce(self.world_size, tensor.numel(), op)
        nbytes = tensor.numel() * tensor.element_size()
        params = {**default_params("all_reduce", name, nbytes, self.topology), **params}
        self._run(self.schedule(name, spec, **params), {"data": tensor.view(-1)})
        return tensor

    def all_to_all_v(self, out: torch.Tensor, inp: torch.Tensor,
                     out_splits: Sequence[int] | None = None,
                     in_splits: Sequence[int] | None = None,
                     algorithm: str | None = None, **params: object) -> torch.Tensor:
        """Like `torch.distributed.all_to_all_single`: splits count rows of dim 0."""
        collective = "all_to_all" if out_splits is None and in_splits is None else "all_to_all_v"
        self._dtype(collective, inp)
        self._dtype(collective, out)
        if inp.dtype != out.dtype:
            raise self._error(collective, f"input is {inp.dtype} but output is {out.dtype}")
        p = self.world_size
        row = _row_elements(inp)
        if row != _row_elements(out):
            raise self._error(collective, f"input rows hold {row} elements but output rows "
                                          f"hold {_row_elements(out)}")
        send = self._splits(collective, "input", inp, in_splits, p)
        recv = self._splits(collective, "output", out, out_splits, p)
        send_el, recv_el = [s * row for s in send], [r * row for r in recv]
        name = self._pick(collective, inp.numel() * inp.element_size(), algorithm)
        if name == NATIVE:
            self.transports.inter.native_all_to_all_v(out, inp, recv_el, send_el)
            return out
        if get_algorithm(collective, name).needs_full_matrix:
            matrix = self._gather_rows(send_el)
        else:  # pairwise: our own row and column are enough
            matrix = [[0] * p for _ in range(p)]
            matrix[self.rank] = list(send_el)
            for src in range(p):
                matrix[src][self.rank] = recv_el[src]
        spec = (CollectiveSpec.all_to_all(p, send_el[0]) if collective == "all_to_all"
                else CollectiveSpec.all_to_all_v(matrix))
        nbytes = inp.numel() * inp.element_size()
        params = {**default_params(collective, name, nbytes, self.topology), **params}
        self._run(self.schedule(name, spec, **params),
                  {"in": inp.reshape(-1), "out": out.view(-1)})
        return out

    def _splits(self, collective: str, which: str, tensor: torch.Tensor,
                splits: Sequence[int] | None, p: int) -> list[int]:
        rows = tensor.shape[0] if tensor.dim() else tensor.numel()
        if splits is None:
            if rows % p:
                raise self._error(collective, f"{which} has {rows} rows, not divisible by "
                                              f"{p} ranks; pass split sizes")
            return [rows // p] * p
        values = list(splits)
        if len(values) != p:
            raise self._error(collective, f"{which} split sizes have {len(values)} entries "
                                          f"for {p} ranks")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise self._error(collective, f"{which} split sizes must be non-negative "
                                              f"integers, got {values}")
        if sum(values) != rows:
            raise self._error(collective, f"{which} split sizes sum to {sum(values)} but the "
                                          f"tensor has {rows} rows")
        return values

    def _gather_rows(self, send_counts: list[int]) -> list[list[int]]:
        """Every rank's send counts (the count matrix), through our own all-gather."""
        p = self.world_size
        mine = torch.tensor(send_counts, dtype=torch.int64)
        full = torch.empty(p * p, dtype=torch.int64)
        spec = CollectiveSpec.all_gather(p, p)
        self._run(self.schedule("direct", spec), {"in": mine, "out": full})
        return full.view(p, p).tolist()

    def reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor, op: str = "sum",
                       algorithm: str | None = None, **params: object) -> torch.Tensor:
        dtype = self._dtype("reduce_scatter", inp)
        self._dtype("reduce_scatter", out)
        if inp.numel() != out.numel() * self.world_size:
            raise self._error("reduce_scatter", f"input has {inp.numel()} elements, expected "
                                                f"{self.world_size} x {out.numel()}")
        try:
            check_op(op, dtype)
        except UnsupportedOpError as exc:
            raise self._error("reduce_scatter", str(exc)) from None
        name = self._pick("reduce_scatter", inp.numel() * inp.element_size(), algorithm)
        if name == NATIVE:
            self.transports.inter.native_reduce_scatter(out, inp, op)
            return out
        spec = CollectiveSpec.reduce_scatter(self.world_size, out.numel(), op)
        self._run(self.schedule(name, spec, **params),
                  {"in": inp.reshape(-1), "out": out.view(-1)})
        return out

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor, algorithm: str | None = None,
                   **params: object) -> torch.Tensor:
        self._dtype("all_gather", inp)
        self._dtype("all_gather", out)
        if out.numel() != inp.numel() * self.world_size:
            raise self._error("all_gather", f"output has {out.numel()} elements, expected "
                                            f"{self.world_size} x {inp.numel()}")
        name = self._pick("all_gather", out.numel() * out.element_size(), algorithm)
        if name == NATIVE:
            self.transports.inter.native_all_gather(out, inp)
            return out
        spec = CollectiveSpec.all_gather(self.world_size, inp.numel())
        self._run(self.schedule(name, spec, **params),
                  {"in": inp.reshape(-1), "out": out.view(-1)})
        return out

    def broadcast(self, tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
        self._dtype("broadcast", tensor)
        if not 0 <= root < self.world_size:
            raise self._error("broadcast", f"root {root} outside 0..{self.world_size - 1}")
        spec = CollectiveSpec.broadcast(self.world_size, tensor.numel(), root)
        self._run(self.schedule("tree", spec), {"data": tensor.view(-1)})
        return tensor

    def barrier(self) -> None:
        """A one-element all-reduce: cheap, and works on every transport."""
        token = torch.ones(1, dtype=torch.int32)
        spec = CollectiveSpec.all_reduce(self.world_size, 1, "sum")
        self._run(self.schedule("recursive_doubling", spec), {"data": token})

    def close(self) -> None:
        """Release transports (shared-memory segments, endpoints); call once on every rank."""
        try:
            self.barrier()
        finally:
            for transport in self.transports.all():
                transport.close()
