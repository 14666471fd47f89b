"""Shared-memory transport between processes of one host (CPU tensors).

Each (sender, receiver, tag) channel is a single-producer single-consumer byte ring in
its own POSIX shared-memory segment, created on first use by whichever side gets there
first and reused for the life of the communicator: no allocation and no pickling per
call. A message is copied into the ring by the sender and out of it by the receiver,
chunk by chunk, so messages of any size stream through a fixed-size ring while both
sides make progress (the executor polls every handle of a phase).

Layout of a segment: written by the sender, int64 `head` (bytes ever written) at byte 0
and the sender's CMA threshold at byte 8 (-1: off); written by the receiver, on its own
cache line, int64 `tail` (bytes ever read) at byte 64, CMA messages acknowledged at
byte 72 and the refused flag at byte 80; data from byte 128. On x86 the stores that
fill the data are visible before the store that advances `head` (TSO).

Messages larger than the ring (from `TOPOCOLL_SHM_CMA_BYTES`, default the ring's
capacity) take one copy instead of two when the kernel allows cross-memory attach
(`cma.py`): the sender puts only a descriptor (pid, address, length) in the ring and
waits; the receiver reads the sender's buffer directly (`process_vm_readv`) and
acknowledges. The sender's setting rules a channel (it writes its threshold into the
header before its first byte), and a receiver the kernel refuses marks the channel
refused, after which the sender streams that message and every later one through the
ring: no rank has to agree in advance.

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
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from . import cma
from .base import Handle, Transport, TransportError, as_bytes
from .wakeup import FifoBell, FifoRinger

SHM_DIR = Path("/dev/shm")
PREFIX = "topocoll-"
HEADER = 128
DEFAULT_CAPACITY = int(os.environ.get("TOPOCOLL_SHM_CHANNEL_BYTES", 1 << 20))
CMA_ENV = "TOPOCOLL_SHM_CMA_BYTES"
CMA_OFF = -1
# header words (int64 index): sender's line, then the receiver's
HEAD, CMA_THRESHOLD, TAIL, ACKS, REFUSED = 0, 1, 8, 9, 10
DESCRIPTOR_WORDS = 5  # pid, address, nbytes, token, token address


def cma_threshold_from_env(default: int) -> int:
    """Bytes from which a message goes by CMA (`off`: never); CMA_OFF where unavailable.

    The default is the ring's capacity. A message that fits in the ring lets its sender
    go on at once, while by CMA the sender waits for the reader and the reader does all
    the copying: with 256 KiB, `node_leader` (whose leader reads its members' blocks)
    and `tree` got 20-40% slower at 256 KiB..512 KiB on the emulated 2x4 cluster. A
    message larger than the ring waits for its reader either way."""
    value = os.environ.get(CMA_ENV, "").strip().lower()
    if not cma.available() or value == "off":
        return CMA_OFF
    if not value:
        return default
    try:
        threshold = int(value)
    except ValueError:
        threshold = 0
    if threshold < 1:
        raise ValueError(f"{CMA_ENV} must be a positive number of bytes or 'off', got "
                         f"{value!r}")
    return threshold


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
        self.verified_pid: int | None = None  # a sender whose token we have read back
        self.cma_posted = 0  # CMA descriptors this side has sent on the channel

    def progress(self, queue: deque) -> None:
        while queue and queue[0].advance():
            queue.popleft()

    @property
    def head(self) -> int:
        return int(self.header[HEAD])

    @property
    def tail(self) -> int:
        return int(self.header[TAIL])

    def sends_by_cma(self, nbytes: int, threshold: int) -> bool:
        """Sender side: publish our threshold (before any byte) and decide."""
        if int(self.header[CMA_THRESHOLD]) != threshold:
            self.header[CMA_THRESHOLD] = threshold
        return threshold != CMA_OFF and nbytes >= threshold and not self.header[REFUSED]

    def receives_by_cma(self, nbytes: int) -> bool:
        """Receiver side, once the message's first bytes are in: the sender's decision."""
        threshold = int(self.header[CMA_THRESHOLD])
        return threshold != CMA_OFF and nbytes >= threshold and not self.header[REFUSED]

    def close(self) -> None:
        del self.header, self.ring
        with contextlib.suppress(BufferError):  # a view still alive; freed at exit
            self.map.close()


class _SendHandle(Handle):
    def __init__(self, channel: _Channel, data: np.ndarray, peer: int,
                 descriptor: Callable[[np.ndarray], np.ndarray], cma_threshold: int) -> None:
        self.channel, self.data, self.peer, self.done_bytes = channel, data, peer, 0
        self.descriptor, self.cma_threshold = descriptor, cma_threshold
        self.mode: str | None = None  # "ring" or "cma", decided when the message starts
        self.pending = np.empty(0, dtype=np.uint8)  # the CMA descriptor still to write
        self.written = 0
        self.ack_target = 0
        channel.sends.append(self)

    def test(self) -> bool:
        if self.done_bytes < self.data.size:
            self.channel.progress(self.channel.sends)
        return self.done_bytes >= self.data.size

    def advance(self) -> bool:
        ch = self.channel
        if self.mode is None:
            if ch.sends_by_cma(self.data.size, self.cma_threshold):
                self.mode = "cma"
                self.pending = self.descriptor(self.data)
                ch.cma_posted += 1
                self.ack_target = ch.cma_posted
            else:
                self.mode = "ring"
        if self.mode == "cma":
            self.written = _write_stream(ch, self.pending, self.written)
            if self.written < self.pending.size:
                return False
            if int(ch.header[ACKS]) >= self.ack_target:
                self.done_bytes = self.data.size  # the receiver has read it all
                return True
            if not ch.header[REFUSED]:
                return False
            self.mode = "ring"  # the receiver could not read us: stream it after all
        self.done_bytes = _write_stream(ch, self.data, self.done_bytes)
        return self.done_bytes >= self.data.size

    def describe(self) -> str:
        how = " by CMA, waiting for the receiver" if self.mode == "cma" else ""
        return f"shm send to rank {self.peer} ({self.done_bytes}/{self.data.size} bytes{how})"


def _read_stream(ch: _Channel, dst: np.ndarray, done: int) -> int:
    """Copy what the ring holds of `dst[done:]` out of it; the new count of bytes read."""
    total = dst.size
    while done < total:
        tail = ch.tail
        avail = ch.head - tail
        if avail <= 0:
            break
        n = min(avail, total - done)
        _ring_read(ch, tail, dst[done:done + n])
        ch.header[TAIL] = tail + n
        done += n
        if _sender_may_wait(ch, avail, done < total):
            ch.wake_peer()
    return done


def _write_stream(ch: _Channel, src: np.ndarray, done: int) -> int:
    """Copy what fits of `src[done:]` into the ring; the new count of bytes written."""
    total = src.size
    while done < total:
        head = ch.head
        free = ch.capacity - (head - ch.tail)
        if free <= 0:
            break
        n = min(free, total - done)
        _ring_write(ch, head, src[done:done + n])
        ch.header[HEAD] = head + n
        done += n
        ch.wake_peer()
    return done


class _RecvHandle(Handle):
    def __init__(self, channel: _Channel, data: np.ndarray, peer: int, rank: int) -> None:
        self.channel, self.data, self.peer, self.rank, self.done_bytes = (
            channel, data, peer, rank, 0)
        self.mode: str | None = None
        self.descriptor = np.empty(DESCRIPTOR_WORDS * 8, dtype=np.uint8)
        self.descriptor_read = 0
        channel.recvs.append(self)

    def test(self) -> bool:
        if self.done_bytes < self.data.size:
            self.channel.progress(self.channel.recvs)
        return self.done_bytes >= self.data.size

    def advance(self) -> bool:
        ch, total = self.channel, self.data.size
        if self.mode is None:
            if total == 0:
                return True
            if ch.head - ch.tail <= 0:
                return False  # the sender has not started this message
            self.mode = "cma" if ch.receives_by_cma(total) else "ring"
        if self.mode == "cma":
            if not self._read_descriptor():
                return False
            if self._pull_by_cma():
                return True
            self.mode = "ring"  # refused: the sender streams this message instead
        return self._read_ring()

    def _read_descriptor(self) -> bool:
        self.descriptor_read = _read_stream(self.channel, self.descriptor, self.descriptor_read)
        return self.descriptor_read >= self.descriptor.size

    def _pull_by_cma(self) -> bool:
        """Read the sender's buffer and acknowledge; False (channel refused) if the
        kernel will not let us, or the descriptor names a process that is not the
        sender (its token does not read back)."""
        ch = self.channel
        pid, address, nbytes, token, token_address = (
            int(v) for v in self.descriptor.view(np.int64))
        if nbytes != self.data.size:
            raise TransportError(
                f"shm: rank {self.rank} expected {self.data.size} bytes from rank "
                f"{self.peer}, which sent {nbytes}: the two sides disagree on the message")
        try:
            if ch.verified_pid != pid:
                probe = np.zeros(1, dtype=np.int64)
                cma.read(pid, token_address, probe.ctypes.data, 8)
                if int(probe[0]) != token:
                    raise cma.CmaError(0, f"pid {pid} is not the sender")
                ch.verified_pid = pid
            self._pull(pid, address)
        except cma.CmaError:
            ch.header[REFUSED] = 1
            ch.wake_peer()
            return False
        self.done_bytes = self.data.size
        ch.header[ACKS] = int(ch.header[ACKS]) + 1
        ch.wake_peer()
        return True

    def _pull(self, pid: int, address: int) -> None:
        cma.read(pid, address, self.data.ctypes.data, self.data.size)

    def _read_ring(self) -> bool:
        self.done_bytes = _read_stream(self.channel, self.data, self.done_bytes)
        return self.done_bytes >= self.data.size

    def describe(self) -> str:
        return f"shm recv from rank {self.peer} ({self.done_bytes}/{self.data.size} bytes)"


class _RecvReduceHandle(_RecvHandle):
    """Receive and reduce into `target` in one pass, through a small cache-hot stage.

    Saves writing the message to scratch and reading it back for the reduction: the
    bytes go ring -> stage (a few hundred KiB, stays in cache) -> `target op= stage`.
    Elements split across two reads wait in the stage for their remaining bytes.
    """

    def __init__(self, channel: _Channel, target: torch.Tensor, op: str, peer: int,
                 rank: int, stage: torch.Tensor) -> None:
        super().__init__(channel, _host_bytes(target), peer, rank)
        self.target, self.op, self.stage = target, op, stage
        self.itemsize = target.element_size()
        self.pending = 0  # bytes of a partial element carried in the stage
        self.elements_done = 0

    def _pull(self, pid: int, address: int) -> None:
        """CMA in stage-sized pieces of whole elements, each reduced while cache-hot."""
        stage_bytes = self.stage.numpy()
        piece = (stage_bytes.size // self.itemsize) * self.itemsize
        for start in range(0, self.data.size, piece):
            n = min(piece, self.data.size - start)
            cma.read(pid, address + start, stage_bytes.ctypes.data, n)
            whole = n // self.itemsize
            first = start // self.itemsize
            incoming = self.stage[:n].view(self.target.dtype)
            _REDUCE_INPLACE[self.op](self.target[first:first + whole], incoming)

    def _read_ring(self) -> bool:
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
            ch.header[TAIL] = tail + n
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
    """`cma_bytes`: the size from which this rank's sends go by CMA (`CMA_OFF`: never;
    None: `TOPOCOLL_SHM_CMA_BYTES`, default `capacity`). `Communicator.create` turns it off
    beside a transport that `busy_waits`: on the emulated cluster over MPI, whose ranks
    call `Test` back to back while they wait, 4 of 45 64 MiB all-reduces took 2.6-11 s
    instead of 0.6 s, with a 256 KiB cross-memory read taking 300 ms of wall time and no
    CPU (blocked on the peer's memory map while eight ranks share two cores); none in
    ~100 such calls over Gloo, whose ranks sleep while they wait."""

    name = "shm"

    def __init__(self, rank: int, world_size: int, job_id: str, hosts: Sequence[str],
                 capacity: int = DEFAULT_CAPACITY, cma_bytes: int | None = None) -> None:
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
        # Every name this rank made in /dev/shm, unlinked at `close()`, or when the
        # transport is collected or the interpreter exits without it: a script under
        # plain torchrun that never calls `job.close()` left its rings behind.
        self._paths: set[Path] = {self.bell.path}
        self._unlink = weakref.finalize(self, _unlink_all, self._paths)
        self.cma_bytes = cma_threshold_from_env(capacity) if cma_bytes is None else cma_bytes
        if self.cma_bytes != CMA_OFF:
            cma.allow_readers()
        # A random word a CMA reader reads back from our memory before trusting a
        # descriptor: proof that the pid in it is this process (not a namesake in
        # another pid namespace).
        self._token = np.frombuffer(os.urandom(8), dtype=np.int64).copy()

    def _descriptor(self, data: np.ndarray) -> np.ndarray:
        words = np.array([os.getpid(), data.ctypes.data, data.size, int(self._token[0]),
                          self._token.ctypes.data], dtype=np.int64)
        return words.view(np.uint8)

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
            self._paths.add(SHM_DIR / name)
            channel = _Channel(SHM_DIR / name, self.capacity,
                               lambda: self._ringer.ring(bell))
            self._channels[key] = channel
        return channel

    def hold_wakeups(self) -> None:
        self._ringer.hold()

    def release_wakeups(self) -> None:
        self._ringer.release()

    def isend(self, tensor: torch.Tensor, peer: int, tag: int) -> Handle:
        handle = _SendHandle(self._channel(self.rank, peer, tag), _host_bytes(tensor), peer,
                             self._descriptor, self.cma_bytes)
        handle.bell = self.bell
        handle.test()
        return handle

    def irecv(self, tensor: torch.Tensor, peer: int, tag: int) -> Handle:
        handle = _RecvHandle(self._channel(peer, self.rank, tag), _host_bytes(tensor), peer,
                             self.rank)
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
        handle = _RecvReduceHandle(channel, target, op, peer, self.rank, stage)
        handle.bell = self.bell
        return handle

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
        self._ringer.close()
        self.bell.close()
        self._unlink()  # every name this rank made, once (and never again at exit)


def _unlink_all(paths: set[Path]) -> None:
    """Unlink what a transport made: peers keep what they mapped, the names go."""
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink()


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
