"""The communicator: topology + transports + executor + algorithm choice, per job.

This is what the torch backend, the benchmark and users' own code call. It validates the
call (`validation`: local checks on every call, a cross-rank check of the call's signature
on its first call, so a bad input is refused on every rank before any data moves), picks
the algorithm (forced, tuned or default), builds (and caches) the schedule, and runs this
rank's program on views of the caller's tensors.
"""

from __future__ import annotations

import logging
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
from .schedule import Schedule
from .selection import Choice, RememberedChoices, default_params
from .transports.base import Transport
from .transports.shm import CMA_OFF, SharedMemoryTransport, host_identity, shm_namespace
from .validation import (
    TORCH_DTYPES,
    Agreement,
    CollectiveError,
    MismatchError,
    Signature,
    op_problem,
    pair_problem,
    parse_splits,
    row_elements,
    rows_of,
    supported_devices,
    tensor_problem,
)

log = logging.getLogger("topocoll")

__all__ = ["DEFAULT_TIMEOUT", "TORCH_DTYPES", "CollectiveError", "Communicator",
           "MismatchError", "job_id"]

DEFAULT_TIMEOUT = float(os.environ.get("TOPOCOLL_TIMEOUT", "300"))
_CACHE_SIZE = 256


def _label(name: str, params: dict[str, object]) -> str:
    """The algorithm as ranks must agree on it: its name plus any explicit parameters."""
    if not params:
        return name
    return f"{name}({', '.join(f'{k}={v}' for k, v in sorted(params.items()))})"


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
        self._choices = RememberedChoices(topology)
        self._schedules: OrderedDict[tuple, Schedule] = OrderedDict()
        self._debug = os.environ.get("TOPOCOLL_DEBUG", "") not in ("", "0")
        self.devices = supported_devices(transports.all())
        # The input checks' own small all-gathers: on the device the transports move, and
        # on their own executor so `executor.stats` count only the caller's collectives.
        self._home = torch.device("cpu" if "cpu" in self.devices else "cuda")
        self._control = Executor(self.rank, transports, timeout)
        self.agreement = Agreement(self.rank, self._gather_ints, debug=self._debug)

    @classmethod
    def create(cls, bootstrap: Bootstrap, inter: Transport, intra: str | Transport = "shm",
               topology: Topology | None = None, timeout: float = DEFAULT_TIMEOUT
               ) -> Communicator:
        """`intra="shm"`: shared memory inside a node, `inter` between nodes; "same": `inter`."""
        hosts = bootstrap.all_gather_json(host_identity())
        if topology is None:
            topology = topology_from_env(bootstrap.world_size) or Topology.from_hosts(hosts)
        if intra == "shm":
            job = bootstrap.broadcast_json(shm_namespace(job_id()))
            intra_transport: Transport = SharedMemoryTransport(
                bootstrap.rank, bootstrap.world_size, job, hosts,
                cma_bytes=CMA_OFF if inter.busy_waits else None)
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

    def _choose(self, collective: str, nbytes: int, algorithm: str | None
                ) -> tuple[str, str | None]:
        """The algorithm, or why none can be chosen (an unknown name, a bad
        `TOPOCOLL_ALGO_*`): refused with the call's other problems, on every rank."""
        try:
            return self._pick(collective, nbytes, algorithm), None
        except ValueError as exc:
            return str(algorithm), str(exc)

    def _admit(self, sig: Signature, problem: str | None) -> None:
        """Refuse a bad call on every rank before any data moves (see `validation`)."""
        if self.agreement.check(sig, problem):
            self.agreement.remember(sig)

    def _gather_ints(self, values: list[int], what: str) -> list[list[int]]:
        """Every rank's int64 `values` (one length on all ranks), for the input checks:
        our own direct all-gather, so it works on every transport and is bounded by the
        communicator's timeout like any collective."""
        p, n = self.world_size, len(values)
        mine = torch.tensor(values, dtype=torch.int64, device=self._home)
        full = torch.empty(p * n, dtype=torch.int64, device=self._home)
        schedule = self.schedule("direct", CollectiveSpec.all_gather(p, n))
        self._control.run(schedule.programs[self.rank], {"in": mine, "out": full}, what)
        return full.view(p, n).tolist()

    def _pick(self, collective: str, nbytes: int, algorithm: str | None) -> str:
        if algorithm in (None, TUNED):
            choice = self._choices(collective, nbytes, self.tuning)
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
    # Every collective first checks its call (refused with a `CollectiveError` on every
    # rank, inputs untouched, if any rank's call is bad or ranks disagree): supported dtype
    # and device, contiguous tensors (refused, not copied: we work in place), matching
    # sizes and dtypes of input and output, op/dtype pair, split sizes; then, on the first
    # call of its signature (every call with TOPOCOLL_DEBUG=1), that all ranks agree.
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", algorithm: str | None = None,
                   **params: object) -> torch.Tensor:
        """In place; returns `tensor`."""
        problem = (tensor_problem(tensor, "tensor", self.devices)
                   or op_problem(op, tensor.dtype))
        name, refused = self._choose("all_reduce", tensor.numel() * tensor.element_size(),
                                     algorithm)
        self._admit(Signature("all_reduce", tensor.dtype, tensor.numel(), str(op), -1, 1,
                              _label(name, params), tensor.device.type), problem or refused)
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
        """Like `torch.distributed.all_to_all_single`: splits count rows of dim 0.

        Split sizes are checked on every call (entries, integers, sign, sum); that what
        rank i sends to j is what j expects from i is checked across ranks on the first
        call of a (dtype, row size, algorithm) signature, on every call whose algorithm
        gathers the split matrix anyway (`bruck`, `hierarchical_2d`), and on every call
        with TOPOCOLL_DEBUG=1. Row counts are left out of the signature on purpose: in MoE
        dispatch they change every step, and checking each new value would add two
        latency-bound rounds to a latency-bound collective.
        """
        collective = "all_to_all" if out_splits is None and in_splits is None else "all_to_all_v"
        p = self.world_size
        row = row_elements(inp)
        in_rows, out_rows = rows_of(inp), rows_of(out)
        send, bad_send = parse_splits("input", in_rows, in_splits, p)
        recv, bad_recv = parse_splits("output", out_rows, out_splits, p)
        problem = (tensor_problem(inp, "input", self.devices)
                   or tensor_problem(out, "output", self.devices) or pair_problem(inp, out)
                   or (f"input rows hold {row} elements but output rows hold "
                       f"{row_elements(out)}" if row != row_elements(out) else None)
                   or bad_send or bad_recv
                   or (f"input has {in_rows} rows but output has {out_rows}; without split "
                       "sizes they must be equal" if collective == "all_to_all"
                       and in_rows != out_rows else None))
        name, refused = self._choose(collective, inp.numel() * inp.element_size(), algorithm)
        sig = Signature(collective, inp.dtype, in_rows if collective == "all_to_all" else -1,
                        "", -1, row, _label(name, params), inp.device.type)
        checked = self.agreement.check(sig, problem or refused)
        full_matrix = name != NATIVE and get_algorithm(collective, name).needs_full_matrix
        matrix: list[list[int]] | None = None
        if collective == "all_to_all_v" and (checked or full_matrix):
            rows, _ = self.agreement.check_splits(collective, send, recv)
            matrix = [[c * row for c in r] for r in rows]
        if checked:
            self.agreement.remember(sig)
        send_el, recv_el = [s * row for s in send], [r * row for r in recv]
        if name == NATIVE:
            self.transports.inter.native_all_to_all_v(out, inp, recv_el, send_el)
            return out
        if matrix is None:  # pairwise: our own row and column are enough
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

    def reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor, op: str = "sum",
                       algorithm: str | None = None, **params: object) -> torch.Tensor:
        """Rank r's `out` gets block r of the reduction of every rank's `inp`."""
        problem = (tensor_problem(inp, "input", self.devices)
                   or tensor_problem(out, "output", self.devices) or pair_problem(inp, out)
                   or (f"input has {inp.numel()} elements, expected {self.world_size} x "
                       f"{out.numel()}" if inp.numel() != out.numel() * self.world_size
                       else None)
                   or op_problem(op, inp.dtype))
        name, refused = self._choose("reduce_scatter", inp.numel() * inp.element_size(),
                                     algorithm)
        self._admit(Signature("reduce_scatter", inp.dtype, out.numel(), str(op), -1, 1,
                              _label(name, params), inp.device.type), problem or refused)
        if name == NATIVE:
            self.transports.inter.native_reduce_scatter(out, inp, op)
            return out
        spec = CollectiveSpec.reduce_scatter(self.world_size, out.numel(), op)
        self._run(self.schedule(name, spec, **params),
                  {"in": inp.reshape(-1), "out": out.view(-1)})
        return out

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor, algorithm: str | None = None,
                   **params: object) -> torch.Tensor:
        """Every rank's `out` gets every rank's `inp`, in rank order."""
        problem = (tensor_problem(inp, "input", self.devices)
                   or tensor_problem(out, "output", self.devices) or pair_problem(inp, out)
                   or (f"output has {out.numel()} elements, expected {self.world_size} x "
                       f"{inp.numel()}" if out.numel() != inp.numel() * self.world_size
                       else None))
        name, refused = self._choose("all_gather", out.numel() * out.element_size(),
                                     algorithm)
        self._admit(Signature("all_gather", inp.dtype, inp.numel(), "", -1, 1,
                              _label(name, params), inp.device.type), problem or refused)
        if name == NATIVE:
            self.transports.inter.native_all_gather(out, inp)
            return out
        spec = CollectiveSpec.all_gather(self.world_size, inp.numel())
        self._run(self.schedule(name, spec, **params),
                  {"in": inp.reshape(-1), "out": out.view(-1)})
        return out

    def broadcast(self, tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
        """In place from `root`'s `tensor` (the binomial tree)."""
        problem = tensor_problem(tensor, "tensor", self.devices)
        if problem is None and (isinstance(root, bool) or not isinstance(root, int)
                                or not 0 <= root < self.world_size):
            problem = f"root {root!r} is not a rank in 0..{self.world_size - 1}"
        self._admit(Signature("broadcast", tensor.dtype, tensor.numel(), "",
                              root if isinstance(root, int) else -2, 1, "tree",
                              tensor.device.type), problem)
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
