"""Cross-memory attach: read another process's memory in one copy (`process_vm_readv`).

Why: through a shared-memory ring every intra-node byte is copied twice (sender into
the ring, receiver out of it). On the emulated 2x4 cluster a 64 MiB hierarchical
all-reduce keeps both cores busy for the whole call, and those double copies were the
largest share of the ranks' own CPU time. With CMA the receiver copies straight out of
the sender's buffer, as Open MPI's and UCX's CMA transports do.

The kernel allows it when the reader may ptrace the owner: same user and no Yama
restriction, or the owner declared any process may (`allow_readers`), or the reader has
CAP_SYS_PTRACE. A container's seccomp profile may still refuse it; callers must treat
`CmaError` as "use the copying path", not as a failure.
"""

from __future__ import annotations

import ctypes
import os
import sys

PR_SET_PTRACER = 0x59616D61  # prctl option of the Yama LSM
PR_SET_PTRACER_ANY = ctypes.c_ulong(-1).value


class CmaError(OSError):
    """The kernel refused or failed a cross-process read; fall back to copying."""


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _load() -> tuple[object | None, object | None]:
    if not sys.platform.startswith("linux"):
        return None, None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None, None
    readv = getattr(libc, "process_vm_readv", None)
    if readv is not None:
        readv.restype = ctypes.c_ssize_t
        readv.argtypes = [ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_ulong,
                          ctypes.POINTER(_IoVec), ctypes.c_ulong, ctypes.c_ulong]
    prctl = getattr(libc, "prctl", None)
    return readv, prctl


_READV, _PRCTL = _load()


def available() -> bool:
    """Whether this platform has `process_vm_readv` at all (Linux with glibc/musl)."""
    return _READV is not None


def allow_readers() -> None:
    """Let processes of the same user read this one even under Yama's ptrace_scope=1
    (where only a parent may): the ranks of a job are siblings, not parent and child.
    Best effort: without Yama the call fails harmlessly."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PTRACER, ctypes.c_ulong(PR_SET_PTRACER_ANY), 0, 0, 0)


def read(pid: int, remote_address: int, local_address: int, nbytes: int) -> None:
    """Copy `nbytes` from `remote_address` in process `pid` to `local_address` here."""
    if _READV is None:
        raise CmaError(0, "process_vm_readv is not available on this platform")
    done = 0
    while done < nbytes:
        local = _IoVec(local_address + done, nbytes - done)
        remote = _IoVec(remote_address + done, nbytes - done)
        got = _READV(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if got < 0:
            err = ctypes.get_errno()
            raise CmaError(err, f"process_vm_readv from pid {pid}: {os.strerror(err)}")
        if got == 0:
            raise CmaError(0, f"process_vm_readv from pid {pid} read nothing at "
                              f"{remote_address + done:#x}")
        done += got
