"""Joining a running job: find the rendezvous the launcher gave us, build transports.

Launchers we compose with, never replace:
- `mpirun`: ranks from the MPI environment, rendezvous over MPI itself;
- `torchrun` and our local launcher: RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, a
  torch TCPStore (rank 0 serves it);
A Gloo process group is created only when the Gloo transport is asked for.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from .bootstrap import Bootstrap, MPIBootstrap, StoreBootstrap
from .communicator import DEFAULT_TIMEOUT, Communicator, job_id
from .store import server_store
from .transports.base import Transport
from .tuning import load_for_job

TRANSPORTS = ("gloo", "mpi", "ucx", "shm", "nccl")
INTRA_CHOICES = ("shm", "same")
_MPI_ENV = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK")


class JobSetupError(RuntimeError):
    pass


@dataclass
class Job:
    communicator: Communicator
    bootstrap: Bootstrap
    transport: str
    intra: str
    launcher: str
    store: Any = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return self.bootstrap.rank

    @property
    def world_size(self) -> int:
        return self.bootstrap.world_size

    def versions(self) -> dict[str, str]:
        import torch

        from topocoll import __version__

        out = {"topocoll": __version__, "torch": torch.__version__}
        for transport in self.communicator.transports.all():
            out[transport.name] = transport.version()
        return out

    def close(self) -> None:
        self.communicator.close()
        if self.transport == "gloo":
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    def abort(self) -> None:
        """Release what this rank holds without talking to any peer (after a failure).

        `close()` starts with a barrier, which a dead or stalled peer would time out; this
        only does local work (unmap and unlink shared memory, force UCX endpoints shut,
        free MPI communicators, drop the Gloo group), so the process can exit at once.
        Best effort: a transport that fails to close does not stop the others.

        Under MPI it also finalizes MPI, bounded (`MPITransport.finalize_bounded`):
        Open MPI's finalize can wait forever for a dead rank, and it would otherwise run
        at interpreter exit with no bound. If it does not return, the process ends there
        with status 0, so do everything else (reports, logs) before calling this.
        """
        for transport in self.communicator.transports.all():
            with contextlib.suppress(Exception):
                transport.close()
        if self.transport in ("gloo", "nccl"):
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                if dist.is_initialized():
                    dist.destroy_process_group()
        if self.transport == "mpi":
            from .transports.mpi import MPITransport

            inter = self.communicator.transports.inter
            if isinstance(inter, MPITransport):
                inter.finalize_bounded()


def under_mpirun() -> bool:
    return any(name in os.environ for name in _MPI_ENV)


def _store_from_env(timeout: float) -> tuple[Any, int, int]:
    import torch.distributed as dist

    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    except KeyError as exc:
        raise JobSetupError(
            f"no launcher environment: {exc.args[0]} is unset; run under mpirun, torchrun "
            "or `topocoll bench --launcher local`") from None
    # torchrun's agent (and our local launcher) host the store; otherwise rank 0 does.
    agent_hosts = (os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "") == "True"
                   or os.environ.get("TOPOCOLL_AGENT_STORE", "") == "1")
    if rank == 0 and not agent_hosts:  # listen on MASTER_ADDR only, not every interface
        return server_store(addr, port, world, timeout, strict=False), rank, world
    store = dist.TCPStore(addr, port, world, False, timeout=timedelta(seconds=timeout),
                          wait_for_workers=False)
    return store, rank, world


def _store_over_mpi(bootstrap: Bootstrap, timeout: float) -> Any:
    """A TCPStore for Gloo under mpirun: rank 0 serves it, the port travels over MPI."""
    import torch.distributed as dist

    addr = os.environ.get("TOPOCOLL_MASTER_ADDR", "127.0.0.1")
    if bootstrap.rank == 0:
        store = server_store(addr, 0, bootstrap.world_size, timeout, strict=False)
        port = bootstrap.broadcast_json(store.port)
    else:
        port = bootstrap.broadcast_json(None)
        store = dist.TCPStore(addr, port, bootstrap.world_size, False,
                              timeout=timedelta(seconds=timeout))
    return store


def init_job(transport: str = "gloo", intra: str = "shm", timeout: float = DEFAULT_TIMEOUT,
             launcher: str = "auto") -> Job:
    """Rendezvous, transports and communicator for this process's rank."""
    if transport not in TRANSPORTS:
        raise JobSetupError(f"unknown transport {transport!r}; choose from {TRANSPORTS}")
    if intra not in INTRA_CHOICES:
        raise JobSetupError(f"unknown intra-node transport {intra!r}; choose from "
                            f"{INTRA_CHOICES}")
    use_mpi = launcher == "mpirun" or (launcher == "auto" and under_mpirun())
    store = None
    if use_mpi:
        from .transports.mpi import load_mpi

        bootstrap: Bootstrap = MPIBootstrap(load_mpi().COMM_WORLD)
    else:
        store, rank, world = _store_from_env(timeout)
        bootstrap = StoreBootstrap(store, rank, world, prefix="topocoll-boot", timeout=timeout)
    inter, store = _make_transport(transport, bootstrap, store, timeout)
    if transport == "shm":  # one host only: every level over shared memory
        intra = "shm"
    communicator = Communicator.create(bootstrap, inter,
                                       intra=inter if transport == "shm" else intra,
                                       timeout=timeout)
    communicator.tuning = load_for_job(communicator.topology, transport)
    return Job(communicator, bootstrap, transport, intra,
               "mpirun" if use_mpi else ("torchrun" if launcher == "auto" else launcher),
               store)


def _make_transport(name: str, bootstrap: Bootstrap, store: Any, timeout: float
                    ) -> tuple[Transport, Any]:
    """The transport between nodes, and the store it made (Gloo under mpirun needs one)."""
    if name in ("gloo", "nccl"):
        import torch.distributed as dist

        from .transports.torch_pg import (
            TorchPGTransport,
            reverse_gloo_group,
            split_directions_wanted,
        )

        if store is None:
            store = _store_over_mpi(bootstrap, timeout)
        wait = timedelta(seconds=timeout)
        if not dist.is_initialized():
            dist.init_process_group(name, store=store, rank=bootstrap.rank,
                                    world_size=bootstrap.world_size, timeout=wait)
        reverse = None
        if split_directions_wanted(name):
            reverse = reverse_gloo_group(store, bootstrap.rank, bootstrap.world_size, wait)
        return TorchPGTransport(timeout=wait, reverse=reverse), store
    if name == "mpi":
        from .transports.mpi import MPITransport

        if not under_mpirun():
            raise JobSetupError("the MPI transport runs under mpirun: use "
                                "`topocoll bench --launcher local --transport mpi` (it starts "
                                "mpirun for you) or `mpirun -n N topocoll bench ...`")
        return MPITransport(timeout=timeout), store
    if name == "ucx":
        from .transports.ucx import UCXTransport

        return UCXTransport(bootstrap, timeout=timeout), store
    if name == "shm":
        from .transports.shm import SharedMemoryTransport, host_identity, shm_namespace

        hosts = bootstrap.all_gather_json(host_identity())
        job = bootstrap.broadcast_json(shm_namespace(job_id()))
        return SharedMemoryTransport(bootstrap.rank, bootstrap.world_size, job, hosts), store
    raise JobSetupError(f"unknown transport {name!r}")
