"""UCX transport through ucxx's synchronous core API (CPU tensors).

UCX picks the fabric: TCP here, RC/DC verbs (RDMA) on an InfiniBand or
RoCE cluster. We use ucxx (`ucxx._lib.libucxx`), the maintained binding: ucx-py is
deprecated in favour of ucxx. Only its core API, not asyncio: the executor polls
`Handle.test()` from plain Python, so a handle drives `worker.progress()` itself and
never blocks.

Wire-up: every rank publishes its UCX worker address (raw bytes) through the job's
`Bootstrap`; an endpoint to a peer is created from that address on first use and cached.
Matching: the 64-bit UCX tag carries the sender's rank in its top 24 bits and the
caller's tag in the low 40, and receives use the full mask, so a receive matches only its
sender and tag; UCX keeps messages of one endpoint and tag in order, which gives the
per-(sender, receiver, tag) ordering the schedules rely on. Bytes move straight from and
into the tensors' memory (a uint8 view, no copy).

Endpoints are created with peer-failure handling: a peer that dies fails the requests
posted to it (a `TransportError` within milliseconds on TCP) instead of leaving them to
the executor's timeout, and `close()` can force endpoints shut without waiting on a dead
peer. UCX then uses only transports that can report peer failure (tcp, rc, dc, ud; not
sm/cma): ranks of one host talk over loopback TCP even with `sm` in `UCX_TLS`, which is
fine because the shm transport carries the traffic inside a node.

Environment, defaulted with `setdefault` before ucxx is first imported (UCX reads it when
the context is made), so whatever the user exports wins:

- `UCX_TLS=tcp,self`: the transports UCX may use. TCP (plus `self` for a rank's messages
  to itself) works on every machine without probing for RDMA devices, and cannot bypass
  an emulated network whose namespaces share /dev/shm. On a real cluster export
  `UCX_TLS=rc,self` or `dc,self` (`rc`/`dc` are the verbs transports, i.e. RDMA over
  InfiniBand/RoCE), or `UCX_TLS=all`; `UCX_NET_DEVICES` (e.g. `mlx5_0:1`) picks the NIC.
- `UCX_RNDV_FRAG_MEM_TYPE=host`: importing ucxx sets it to `cuda` (GPU staging buffers
  for pipelined rendezvous); we move host memory and may have no GPU.
- `UCX_WARN_UNUSED_ENV_VARS=n`: importing ucxx exports `UCX_MEMTYPE_CACHE=n`, which UCX
  1.21 no longer knows and would warn about in every process.
- ucxx itself also exports `UCX_RNDV_THRESH=8192` and `UCX_MAX_RNDV_RAILS=1` unless set:
  messages above 8 KiB use the rendezvous protocol.

Importing ucxx (~0.5 s) loads libucx/libucxx/librmm, imports asyncio and probes NVML
(`pynvml`), but initialises no CUDA context; without a GPU UCX silently skips its CUDA
transports.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import time
from types import ModuleType
from typing import Any

import torch

from ..bootstrap import Bootstrap
from .base import Backoff, CollectiveTimeoutError, Handle, Transport, TransportError, as_bytes

MISSING = "UCX transport needs the 'ucx' extra: pip install 'topocoll[ucx]'"

ENV_DEFAULTS = {
    "UCX_TLS": "tcp,self",
    "UCX_RNDV_FRAG_MEM_TYPE": "host",
    "UCX_WARN_UNUSED_ENV_VARS": "n",
    # TCP moves data in 8 KiB segments by default; 256 KiB doubled large-message bandwidth
    # here (0.9 -> 1.8 GB/s at 16 MiB). Only read by the tcp transport.
    "UCX_TCP_TX_SEG_SIZE": "256k",
    "UCX_TCP_RX_SEG_SIZE": "256k",
}

TAG_BITS = 40  # low bits: the caller's tag; high 24 bits: the sender's rank
MAX_RANKS = 1 << (64 - TAG_BITS)
BARRIER_TAG = (1 << TAG_BITS) - 64  # and up: one tag per barrier round, reserved
MAX_TAG = BARRIER_TAG - 1


def load_ucxx() -> ModuleType:
    """Set our UCX defaults, then import the ucxx core (env is read at import and init)."""
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    try:
        return importlib.import_module("ucxx._lib.libucxx")
    except ImportError as exc:
        raise ImportError(MISSING) from exc


class _UCXHandle(Handle):
    def __init__(self, transport: UCXTransport, endpoint: Any, request: Any, data: Any,
                 op: str, peer: int, tag: int) -> None:
        self.transport, self.endpoint, self.request, self.data = transport, endpoint, request, data
        self.op, self.peer, self.tag = op, peer, tag
        self.nbytes = int(data.nbytes)
        self.done = False

    def test(self) -> bool:
        if self.done:
            return True
        if not self.request.completed:
            self.transport.progress()
            if not self.request.completed:
                return False
        try:
            self.request.check_error()
        except Exception as exc:  # ucxx raises its own UCXX*Error classes
            down = "" if self.endpoint.alive else (
                f"; the endpoint to rank {self.peer} is down (peer exited or link failed)")
            raise TransportError(f"rank {self.transport.rank}: {self.describe()} failed: "
                                 f"{type(exc).__name__}: {exc}{down}") from exc
        self.done = True
        self.endpoint = self.request = self.data = None  # the caller may reuse the buffer
        return True

    def describe(self) -> str:
        return f"ucx {self.op} rank {self.peer} ({self.nbytes} bytes, tag {self.tag})"


class UCXTransport(Transport):
    """Point-to-point over one UCX worker per rank; see the module docstring.

    Construction is collective (it all-gathers worker addresses through `bootstrap`);
    `timeout` bounds `barrier()`.
    """

    name = "ucx"

    def __init__(self, bootstrap: Bootstrap, timeout: float = 300.0) -> None:
        super().__init__(bootstrap.rank, bootstrap.world_size)
        if self.world_size > MAX_RANKS:
            raise ValueError(f"ucx: at most {MAX_RANKS} ranks fit in the tag, "
                             f"got {self.world_size}")
        self.ucx = load_ucxx()
        self._array = importlib.import_module("ucxx._lib.arr").Array  # buffer-protocol view
        self.timeout = timeout
        ucx = self.ucx
        try:
            self._context: Any = ucx.UCXContext(feature_flags=(ucx.Feature.TAG,))
            self._worker: Any = ucx.UCXWorker(self._context)
        except Exception as exc:  # e.g. UCX_TLS=rc on a host without an RDMA device
            raise TransportError(f"ucx: rank {self.rank}: cannot start UCX with "
                                 f"UCX_TLS={os.environ.get('UCX_TLS')}: {exc}") from exc
        self._addresses = bootstrap.all_gather_bytes(self._worker.address.tobytes())
        self._endpoints: dict[int, Any] = {}
        self._barrier_buffers = (torch.ones(1, dtype=torch.uint8),
                                 torch.zeros(1, dtype=torch.uint8))

    def _endpoint(self, peer: int) -> Any:
        ep = self._endpoints.get(peer)
        if ep is None:
            if self._worker is None:
                raise TransportError(f"ucx: rank {self.rank}: transport is closed")
            if not 0 <= peer < self.world_size:
                raise TransportError(f"ucx: rank {self.rank}: peer {peer} outside "
                                     f"0..{self.world_size - 1}")
            address = self.ucx.UCXAddress.create_from_buffer(self._addresses[peer])
            # Error handling on: a dead peer fails its requests instead of hanging them,
            # and close() can force the endpoint shut without a flush to that peer.
            try:
                ep = self.ucx.UCXEndpoint.create_from_worker_address(self._worker, address,
                                                                     True)
            except Exception as exc:  # no transport in common (UCX_TLS differs, no route)
                raise TransportError(f"ucx: rank {self.rank} cannot reach rank {peer} with "
                                     f"UCX_TLS={os.environ.get('UCX_TLS')}: {exc}") from exc
            self._endpoints[peer] = ep
        return ep

    def _ucx_tag(self, sender: int, tag: int) -> Any:
        return self.ucx.UCXXTag((sender << TAG_BITS) | tag)

    def _post(self, op: str, tensor: torch.Tensor, peer: int, tag: int,
              user_tag: bool = True) -> Handle:
        if user_tag and not 0 <= tag <= MAX_TAG:
            raise TransportError(f"ucx: rank {self.rank}: tag {tag} outside 0..{MAX_TAG}")
        data = _host_bytes(tensor)
        array = self._array(data)
        ep = self._endpoint(peer)
        try:
            if op == "send to":
                request = ep.tag_send(array, self._ucx_tag(self.rank, tag))
            else:  # through the endpoint, so that its failure cancels the receive
                request = ep.tag_recv(array, self._ucx_tag(peer, tag))
        except Exception as exc:
            raise TransportError(f"ucx: rank {self.rank}: posting {op} rank {peer} "
                                 f"({data.nbytes} bytes, tag {tag}) failed: {exc}") from exc
        return _UCXHandle(self, ep, request, data, op, peer, tag)

    def isend(self, tensor: torch.Tensor, peer: int, tag: int) -> Handle:
        return self._post("send to", tensor, peer, tag)

    def irecv(self, tensor: torch.Tensor, peer: int, tag: int) -> Handle:
        return self._post("recv from", tensor, peer, tag)

    def progress(self) -> None:
        """Let UCX move whatever it can now (never blocks)."""
        if self._worker is None:
            raise TransportError(f"ucx: rank {self.rank}: transport is closed")
        self._worker.progress()

    def barrier(self) -> None:
        """Dissemination barrier: round k talks to rank +/- 2**k, one reserved tag a round."""
        deadline = time.monotonic() + self.timeout
        distance, round_ = 1, 0
        send, recv = self._barrier_buffers
        while distance < self.world_size:
            handles = [
                self._post("recv from", recv, (self.rank - distance) % self.world_size,
                           BARRIER_TAG + round_, user_tag=False),
                self._post("send to", send, (self.rank + distance) % self.world_size,
                           BARRIER_TAG + round_, user_tag=False),
            ]
            backoff = Backoff()
            while not all(h.test() for h in handles):
                if time.monotonic() > deadline:
                    pending = "; ".join(h.describe() for h in handles)
                    raise CollectiveTimeoutError(f"ucx: rank {self.rank}: barrier timed out "
                                                 f"after {self.timeout:.1f} s ({pending})")
                backoff.pause()
            distance, round_ = distance * 2, round_ + 1

    def close(self) -> None:
        """Close endpoints (forced: no flush that a dead peer could stall) and the worker.

        Local and bounded. Forcing drops eager messages a peer has not taken yet, so call
        it after a barrier, as the communicator's `close` does.
        """
        if self._worker is None:
            return
        for ep in self._endpoints.values():
            # Forced close completes locally; best effort, the peer may be gone already.
            with contextlib.suppress(Exception):
                ep.close_blocking()
        self._endpoints.clear()
        self._worker = None
        self._context = None

    def version(self) -> str:
        ucxx = importlib.import_module("ucxx")
        major, minor = (int(p) for p in ucxx.__version__.split(".")[:2])
        ucx_major, ucx_minor = self.ucx.get_ucx_version()[:2]
        return f"ucxx {major}.{minor} / UCX {ucx_major}.{ucx_minor}"

    def describe(self) -> str:
        return f"ucx rank {self.rank}/{self.world_size} UCX_TLS={os.environ.get('UCX_TLS')}"


def _host_bytes(tensor: torch.Tensor) -> Any:
    if tensor.device.type != "cpu":
        raise TransportError("ucx transport moves CPU tensors only; use NCCL for GPU tensors")
    if not tensor.is_contiguous():
        raise TransportError("ucx transport needs contiguous tensors")
    return as_bytes(tensor).numpy()
