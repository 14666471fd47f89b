"""Shared-memory transport between processes of one host (CPU tensors).

Each (sender, receiver, tag) channel is a single-producer single-consumer byte ring in
its own POSIX shared-memory segment, created on first use by whichever side gets there
first and reused for the life of the communicator: no allocation and no pickling per
call. A message is copied into the ring by the sender and out of it by the receiver,
chunk by chunk, so messages of any size stream through a fixed-size ring while both
sides make progress (the executor polls every handle of a phase).

Layout of a segment: int64 `head` (bytes ever written) at byte 0, int64 `tail` (bytes
ever read) at byte 64 (its own cache line), data from byte 128. On x86 the stores that
fill the data are visible before the store that advances `head` (TSO).

A receiver with nothing to do sleeps on its bell (`wakeup.FifoBell`, one FIFO per rank
and transport) instead of polling: a sender rings the receiver after writing, a receiver
rings the sender after freeing space.

The transport refuses peers whose host differs: the emulated cluster's namespaces share
/dev/shm, and using it across them would bypass the network being measured.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from .base import Handle, Transport, TransportError, as_bytes
from .wakeup import FifoBell, FifoRinger

SHM_DIR = Path("/dev/shm")
PREFIX = "topocoll-"
HEADER = 128
DEFAULT_CAPACITY = int(os.environ.get("TOPOCOLL_SHM_CHANNEL_BYTES", 1 << 20))


class _Channel:
    def __init__(self, path: Path, capacity: int, wake_peer: Callable[[], None]) -> None:
        self.path = path
        self.wake_peer = wake_peer  # rings the other side (this process is one side only)
        self.capacity = capacity
        size = HEADER + capacity
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
            self.map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.header = np.frombuffer(self.map, dtype=np.int64, count=HEADER // 8)
        self.ring = np.frombuffer(self.map, dtype=np.uint8, offset=HEADER, count=capacity)
        # Messages of one channel are a byte stream: only the oldest unfinished send (or
        # receive) may move bytes, or two messages posted in one phase would interleave.
        self.sends: deque[_SendHandle] = deque()
        self.recvs: deque[_RecvHandle] = deque()

    def progress(self, queue: deque) -> None:
        while queue and queue[0].advance():
            queue.popleft()

    @property
    def head(self) -> int:
        return int(self.header[0])

    @property
    def tail(self) -> int:
        return int(self.header[8])

    def close(self) -> None:
        del self.header, self.ring
        with contextlib.suppress(BufferError):  # a view still alive; freed at exit
            self.map.close()


class _SendHandle(Handle):
    def __init__(self, channel: _Channel, data: np.ndarray, peer: int) -> None:
        self.channel, self.data, self.peer, self.done_bytes = channel, data, peer, 0
        channel.sends.append(self)

    def test(self) -> bool:
        if self.done_bytes < self.data.size:
            self.channel.progress(self.channel.sends)
        return self.done_bytes >= self.data.size

    def advance(self) -> bool:
        ch, total = self.channel, self.data.size
        while self.done_bytes < total:
            head = ch.head
            free = ch.capacity - (head - ch.tail)
            if free <= 0:
                return False
            n = min(free, total - self.done_bytes)
            _ring_write(ch, head, self.data[self.done_bytes:self.done_bytes + n])
            ch.header[0] = head + n
            self.done_bytes += n
            ch.wake_peer()
        return True

    def describe(self) -> str:
        return f"shm send to rank {self.peer} ({self.done_bytes}/{self.data.size} bytes)"


class _RecvHandle(Handle):
    def __init__(self, channel: _Channel, data: np.ndarray, peer: int) -> None:
        self.channel, self.data, self.peer, self.done_bytes = channel, data, peer, 0
        channel.recvs.append(self)

    def test(self) -> bool:
        if self.done_bytes < self.data.size:
            self.channel.progress(self.channel.recvs)
        return self.done_bytes >= self.data.size

    def advance(self) -> bool:
        ch, total = self.channel, self.data.size
        while self.done_bytes < total:
            tail = ch.tail
            avail = ch.head - tail
            if avail <= 0:
                return False
            n = min(avail, total - self.done_bytes)
            _ring_read(ch, tail, self.data[self.done_bytes:self.done_bytes + n])
            ch.header[8] = tail + n
            self.done_bytes += n
            if _sender_may_wait(ch, avail, self.done_bytes < total):
                ch.wake_peer()
        return True

    def describe(self) -> str:
        return f"shm recv from rank {self.peer} ({self.done_bytes}/{self.data.size} bytes)"


class _RecvReduceHandle(_RecvHandle):
    """Receive and reduce into `target` in one pass, through a small cache-hot stage.

    Saves writing the message to scratch and reading it back for the reduction: the
    bytes go ring -> stage (a few hundred KiB, stays in cache) -> `target op= stage`.
    Elements split across two reads wait in the stage for their remaining bytes.
    """

    def __init__(self, channel: _Channel, target: torch.Tensor, op: str, peer: int,
                 stage: torch.Tensor) -> None:
        super().__init__(channel, _host_bytes(target), peer)
        self.target, self.op, self.stage = target, op, stage
        self.itemsize = target.element_size()
        self.pending = 0  # bytes of a partial element carried in the stage
        self.elements_done = 0

    def advance(self) -> bool:
        ch, total = self.channel, self.data.size
        stage_bytes = self.stage.numpy()
        room = (stage_bytes.size // self.itemsize) * self.itemsize
        while self.done_bytes < total:
            tail = ch.tail
            avail = ch.head - tail
            if avail <= 0:
                return False
            n = min(avail, total - self.done_bytes, room - self.pending)
            _ring_read(ch, tail, stage_bytes[self.pending:self.pending + n])
            ch.header[8] = tail + n
            self.done_bytes += n
            if _sender_may_wait(ch, avail, self.done_bytes < total):
                ch.wake_peer()
            filled = self.pending + n
            whole = filled // self.itemsize
            if whole:
                incoming = self.stage[:whole * self.itemsize].view(self.target.dtype)
                dst = self.target[self.elements_done:self.elements_done + whole]
                _REDUCE_INPLACE[self.op](dst, incoming)
                self.elements_done += whole
            self.pending = filled - whole * self.itemsize
            if self.pending:
                stage_bytes[:self.pending] = stage_bytes[whole * self.itemsize:filled]
        return True


def _sender_may_wait(ch: _Channel, avail_before: int, message_unfinished: bool) -> bool:
    """Whether a read freed space a blocked sender waits for: the ring was full, or the
    message still has bytes the sender has not written (then it is blocked or about to
    write). A small message read whole needs no ring back: its sender is long done."""
    return message_unfinished or avail_before >= ch.capacity


_REDUCE_INPLACE = {
    "sum": lambda a, b: a.add_(b),
    "prod": lambda a, b: a.mul_(b),
    "min": lambda a, b: torch.minimum(a, b, out=a),
    "max": lambda a, b: torch.maximum(a, b, out=a),
}
STAGE_BYTES = 256 << 10


def _ring_write(ch: _Channel, position: int, src: np.ndarray) -> None:
    start = position % ch.capacity
    first = min(src.size, ch.capacity - start)
    ch.ring[start:start + first] = src[:first]
    if first < src.size:
        ch.ring[:src.size - first] = src[first:]


def _ring_read(ch: _Channel, position: int, dst: np.ndarray) -> None:
    start = position % ch.capacity
    first = min(dst.size, ch.capacity - start)
    dst[:first] = ch.ring[start:start + first]
    if first < dst.size:
        dst[first:] = ch.ring[:dst.size - first]


def host_identity() -> str:
    """Hostname plus boot id: equal only for processes that really share /dev/shm and a host."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{os.uname().nodename}/{boot}"


class SharedMemoryTransport(Transport):
    name = "shm"

    def __init__(self, rank: int, world_size: int, job_id: str, hosts: Sequence[str],
                 capacity: int = DEFAULT_CAPACITY) -> None:
        super().__init__(rank, world_size)
        if len(hosts) != world_size:
            raise ValueError(f"shm: {len(hosts)} host ids for {world_size} ranks")
        if not all(part.isalnum() for part in job_id.split("-")):
            raise ValueError(f"shm: job id must be alphanumeric words joined by '-', got "
                             f"{job_id!r}")
        self.job_id = job_id
        self.hosts = list(hosts)
        self.capacity = capacity
        self._channels: dict[tuple[int, int, int], _Channel] = {}
        self._stages: dict[tuple[int, int], torch.Tensor] = {}  # one per incoming channel
        self.bell = FifoBell(self._bell_path(rank))
        self._ringer = FifoRinger()

    def _bell_path(self, rank: int) -> Path:
        return SHM_DIR / f"{PREFIX}{self.job_id}-bell-{rank}"

    def _channel(self, src: int, dst: int, tag: int) -> _Channel:
        key = (src, dst, tag)
        channel = self._channels.get(key)
        if channel is None:
            peer = dst if src == self.rank else src
            if self.hosts[peer] != self.hosts[self.rank]:
                raise TransportError(
                    f"shm: rank {self.rank} cannot reach rank {peer}: it runs on host "
                    f"{self.hosts[peer]!r}, not {self.hosts[self.rank]!r}; use a network "
                    "transport between nodes")
            name = f"{PREFIX}{self.job_id}-{src}-{dst}-{tag}"
            bell = self._bell_path(peer)
            channel = _Channel(SHM_DIR / name, self.capacity,
                               lambda: self._ringer.ring(bell))
            self._channels[key] = channel
        return channel

    def hold_wakeups(self) -> None:
        self._ringer.hold()

    def release_wakeups(self) -> None:
        self._ringer.release()

    def isend(self, tensor: torch.Tensor, peer: int, tag: int) -> Handle:
        handle = _SendHandle(self._channel(self.rank, peer, tag), _host_bytes(tensor), peer)
        handle.bell = self.bell
        handle.test()
        return handle

    def irecv(self, tensor: torch.Tensor, peer: int, tag: int) -> Handle:
        handle = _RecvHandle(self._channel(peer, self.rank, tag), _host_bytes(tensor), peer)
        handle.bell = self.bell
        return handle

    def irecv_reduce(self, target: torch.Tensor, op: str, peer: int, tag: int) -> Handle:
        """Receive `target.numel()` elements and fold them into `target` with `op`."""
        if op not in _REDUCE_INPLACE:
            raise TransportError(f"shm: cannot reduce with op {op!r}")
        channel = self._channel(peer, self.rank, tag)
        stage = self._stages.get((peer, tag))
        if stage is None:
            stage = torch.empty(STAGE_BYTES, dtype=torch.uint8)
            self._stages[peer, tag] = stage
        handle = _RecvReduceHandle(channel, target, op, peer, stage)
        handle.bell = self.bell
        return handle

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
            with contextlib.suppress(FileNotFoundError):
                channel.path.unlink()
        self._channels.clear()
        self._ringer.close()
        self.bell.close()


def _host_bytes(tensor: torch.Tensor) -> np.ndarray:
    if tensor.device.type != "cpu":
        raise TransportError("shm transport moves CPU tensors only; use CUDA IPC/NCCL for GPU")
    if not tensor.is_contiguous():
        raise TransportError("shm transport needs contiguous tensors")
    return as_bytes(tensor).numpy()


def shm_namespace(job_id: str) -> str:
    """The names of one transport instance's segments: the job id (so a launcher can
    remove what a crashed job left) plus a fresh suffix, so two communicators of one job
    (a torch sub-group beside the world group) never share a ring or a bell. Call on
    every rank and broadcast the root's value."""
    return f"{job_id}-{uuid.uuid4().hex[:8]}"


def stale_segments(job_id: str | None = None) -> list[Path]:
    """topocoll segments in /dev/shm (of one job, or all): what a crashed run leaves."""
    pattern = f"{PREFIX}{job_id}-*" if job_id else f"{PREFIX}*"
    return sorted(SHM_DIR.glob(pattern)) if SHM_DIR.exists() else []


def remove_segments(job_id: str | None = None) -> int:
    removed = 0
    for path in stale_segments(job_id):
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed
