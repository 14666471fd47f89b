"""Rendezvous: exchanging small blobs (addresses, hostnames, split sizes) between ranks.

We never run our own server: the job already has one (torch's TCPStore, MPI's
communicator), and the bootstrap only moves bytes through it. Nothing received is
unpickled or evaluated; callers exchange bytes or JSON.
"""

from __future__ import annotations

import abc
import json
from datetime import timedelta
from typing import Any

import numpy as np


class Bootstrap(abc.ABC):
    rank: int
    world_size: int

    @abc.abstractmethod
    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's `data`, in rank order, on every rank."""

    def all_gather_json(self, value: Any) -> list[Any]:
        blobs = self.all_gather_bytes(json.dumps(value, sort_keys=True).encode())
        return [json.loads(b.decode()) for b in blobs]

    def broadcast_json(self, value: Any, root: int = 0) -> Any:
        return self.all_gather_json(value if self.rank == root else None)[root]


class StoreBootstrap(Bootstrap):
    """Through a torch.distributed Store (TCPStore, FileStore, a PrefixStore...)."""

    def __init__(self, store: Any, rank: int, world_size: int, prefix: str = "topocoll",
                 timeout: float = 300.0) -> None:
        self.store, self.rank, self.world_size = store, rank, world_size
        self.prefix = prefix
        self.round = 0
        self.store.set_timeout(timedelta(seconds=timeout))

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        self.round += 1
        base = f"{self.prefix}/ag{self.round}"
        self.store.set(f"{base}/{self.rank}", data)
        out = [self.store.get(f"{base}/{r}") for r in range(self.world_size)]
        # The last rank to finish reading deletes this round's keys.
        if self.store.add(f"{base}/done", 1) == self.world_size:
            for r in range(self.world_size):
                self.store.delete_key(f"{base}/{r}")
            self.store.delete_key(f"{base}/done")
        return [bytes(b) for b in out]


class MPIBootstrap(Bootstrap):
    """Through an mpi4py communicator, with buffer (not pickle) collectives."""

    def __init__(self, comm: Any) -> None:
        self.comm = comm
        self.rank, self.world_size = comm.Get_rank(), comm.Get_size()

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        lengths = np.zeros(self.world_size, dtype=np.int64)
        self.comm.Allgather(np.array([len(data)], dtype=np.int64), lengths)
        out = np.zeros(int(lengths.sum()), dtype=np.uint8)
        displs = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        self.comm.Allgatherv(np.frombuffer(data, dtype=np.uint8),
                             [out, lengths.tolist(), displs.tolist(), _mpi_byte()])
        return [out[d:d + n].tobytes() for d, n in zip(displs.tolist(), lengths.tolist())]


def _mpi_byte() -> Any:
    from mpi4py import MPI

    return MPI.BYTE


class LocalBootstrap(Bootstrap):
    """A one-rank job: nothing to exchange."""

    rank = 0
    world_size = 1

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        return [data]
