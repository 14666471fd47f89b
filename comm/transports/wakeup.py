"""Bells: a waiting rank sleeps in the kernel until a peer (or a helper thread) rings.

Why: with more ranks than cores (8 ranks on our 2 cores, or any oversubscribed node),
a rank that polls for a message it is waiting on takes CPU from the rank that would
send it. Measured on the 2x4 layout with a 1 KiB-per-peer all-to-all (`hierarchical_2d`,
Gloo between nodes, shared memory inside): polling with 32 hot spins before sleeping
took 15 ms per call, 2 spins 8 ms; Gloo's own all-to-all, whose threads block in the
kernel, took 4.5 ms. A bell is a file descriptor the executor can `select()` on:

- `PipeBell`: an anonymous pipe, rung from threads of this process (the Gloo transport's
  completion callbacks).
- `FifoBell`: a named FIFO in /dev/shm, rung by other processes of the host (the
  shared-memory transport: the sender rings the receiver after writing, the receiver
  rings the sender after freeing ring space).

A ring is a best-effort hint, never the data: a waiter drains its bells before it polls
its handles again, so a ring that arrives while it is busy only causes one extra poll,
and a ring that is lost costs at most `IDLE_POLL_S` of latency, because waiters never
sleep longer than that. Rings are lost only at first contact (a peer rings before our
FIFO exists); a full pipe or FIFO drops a ring but is readable anyway. `IDLE_POLL_S` is
long on purpose: each needless wake-up of a sleeping rank is a context switch and cold
caches, which on 2x4 cost more than the Python work of a small call (with a 2 ms cap a
member rank of `node_leader` woke 2.7 times per 1 KiB-per-peer all-to-all).
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import stat
import threading
from collections.abc import Iterable
from pathlib import Path

IDLE_POLL_S = 0.05  # longest sleep between polls when every pending handle has a bell
_DRAIN = 1 << 16


class Bell:
    """A readable file descriptor that becomes readable when someone rings."""

    def fileno(self) -> int:
        raise NotImplementedError

    def drain(self) -> None:
        """Consume every ring so far (the next `select` waits for a new one)."""
        fd = self.fileno()
        with contextlib.suppress(BlockingIOError, OSError):
            while len(os.read(fd, _DRAIN)) == _DRAIN:
                pass

    def close(self) -> None:
        raise NotImplementedError


class PipeBell(Bell):
    """Rung from this process's threads; safe to ring after `close()` (it is a no-op then,
    so a late callback never writes into a file descriptor number reused since)."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._lock = threading.Lock()
        self._closed = False

    def fileno(self) -> int:
        return self._read

    def ring(self, *_: object) -> None:
        """Accepts and ignores arguments, so it can be a future's done-callback."""
        with self._lock:
            if self._closed:
                return
            with contextlib.suppress(BlockingIOError):  # full: already rung plenty
                os.write(self._write, b"\0")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.close(self._read)
            os.close(self._write)


class FifoBell(Bell):
    """This process's bell at `path`, a FIFO other processes of the host ring.

    The owner keeps a write end open itself: a FIFO with no writer reads as end-of-file,
    which `select` reports as readable forever."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a leftover of a crashed run with the same job id
        os.mkfifo(path, 0o600)
        self._read = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self._keepalive = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        self._closed = False

    def fileno(self) -> int:
        return self._read

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        os.close(self._read)
        os.close(self._keepalive)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class FifoRinger:
    """Rings other processes' `FifoBell`s by path, keeping each write end open.

    Between `hold()` and `release()` rings are collected and sent together at the end:
    a woken process can take the ringer's core at once (the scheduler favours a task
    that slept), so a leader that posts three messages and rings after each is stopped
    three times before its third message is out; held, it posts all three and then
    wakes all three peers, who can run side by side."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._held: list[Path] | None = None

    def hold(self) -> None:
        if self._held is None:
            self._held = []

    def release(self) -> None:
        held, self._held = self._held, None
        for path in held or ():
            self.ring(path)

    def ring(self, path: Path) -> None:
        if self._held is not None:
            if path not in self._held:
                self._held.append(path)
            return
        fd = self._fds.get(path)
        if fd is None:
            fd = self._open(path)
            if fd is None:
                return
            self._fds[path] = fd
        try:
            os.write(fd, b"\0")
        except BlockingIOError:
            pass  # the FIFO is full: the owner has not drained yet and will wake anyway
        except OSError:  # the owner closed it: forget it, reopen next time
            del self._fds[path]
            os.close(fd)

    @staticmethod
    def _open(path: Path) -> int | None:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:  # not created yet, or its owner is gone: no one to wake
            if exc.errno in (errno.ENOENT, errno.ENXIO):
                return None
            raise
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()


def bells_of(handles: Iterable[object]) -> list[Bell] | None:
    """The distinct bells of `handles`, or None if any handle has none (then the caller
    must poll: MPI and UCX make progress only when polled). Every handle is asked, even
    after one without a bell: asking starts the helper wait of a Gloo handle, which
    otherwise completes only when waited on."""
    bells: dict[int, Bell] = {}
    missing = False
    for handle in handles:
        bell = getattr(handle, "bell", None)
        if bell is None:
            missing = True
        else:
            bells[id(bell)] = bell
    return None if missing or not bells else list(bells.values())


def sleep_until_rung(bells: list[Bell], timeout: float) -> None:
    """Block until one of `bells` rings or `timeout` (capped at `IDLE_POLL_S`) passes,
    then drain the ones that rang."""
    try:
        ready, _, _ = select.select(bells, [], [], max(0.0, min(timeout, IDLE_POLL_S)))
    except (OSError, ValueError):  # a bell closed under us: fall back to a short sleep
        select.select([], [], [], min(max(timeout, 0.0), IDLE_POLL_S))
        return
    for bell in ready:
        bell.drain()
