"""The local launcher: N ranks of a command on this machine, as torchrun or mpirun would.

For the Gloo, UCX and shared-memory transports it starts the processes itself with the
torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK) and hosts
the TCPStore in this process on loopback, port 0 (so no port is guessed). For the MPI
transport it runs `mpirun` (MPI ranks can only be started by MPI's own launcher).

Every rank runs in its own session; the first rank to fail takes the others down (as
mpirun does), and a job past its timeout is killed whole, so nothing outlives the run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from topocoll.comm.store import LOOPBACK, server_store
from topocoll.comm.transports.shm import remove_segments

AGENT_STORE_ENV = "TOPOCOLL_AGENT_STORE"


class LaunchError(RuntimeError):
    pass


@dataclass
class LaunchResult:
    returncode: int
    failed_rank: int | None
    stderr_tail: str


def kill_all(procs: Sequence[subprocess.Popen]) -> None:
    """SIGKILL every still-running rank's process group, then reap them all."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    for proc in procs:
        proc.wait()


def loopback_store(n: int, timeout: float) -> Any:
    """The job's TCPStore, served from this process on 127.0.0.1 only (port 0: no guess)."""
    return server_store(LOOPBACK, 0, n, timeout)


def local_job_env(n: int, store_port: int, job: str, env: dict[str, str] | None = None
                  ) -> dict[str, str]:
    """The environment of every rank of a local job (RANK and LOCAL_RANK added per rank).

    Everything a rank listens on stays on loopback unless the caller's environment says
    otherwise: Gloo binds the address of GLOO_SOCKET_IFNAME, and UCX's TCP transport
    listens on every device in UCX_NET_DEVICES (all of them by default: `ss -ltnp` showed
    each rank listening on the machine's public address too).
    """
    base = {**os.environ, "TOPOCOLL_JOB_ID": job, **(env or {})}
    base.update({"MASTER_ADDR": LOOPBACK, "MASTER_PORT": str(store_port),
                 "WORLD_SIZE": str(n), AGENT_STORE_ENV: "1", "OMP_NUM_THREADS": "1",
                 "TORCHELASTIC_USE_AGENT_STORE": "True",
                 "GLOO_SOCKET_IFNAME": base.get("GLOO_SOCKET_IFNAME", "lo"),
                 "UCX_NET_DEVICES": base.get("UCX_NET_DEVICES", "lo")})
    return base


def launch_local(n: int, argv: Sequence[str], timeout: float, env: dict[str, str] | None = None,
                 quiet_ranks: bool = True) -> LaunchResult:
    """Run `python argv...` as ranks 0..n-1; rank 0's stdout is ours."""
    if n < 1:
        raise LaunchError(f"need at least one rank, got -n {n}")
    store = loopback_store(n, timeout)
    job = uuid.uuid4().hex[:12]
    base = local_job_env(n, store.port, job, env)
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        for rank in range(n):
            rank_env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            log = open(os.devnull, "w") if rank and quiet_ranks else None  # noqa: SIM115
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, *argv], env=rank_env, stdout=log,
                stderr=subprocess.PIPE, start_new_session=True, text=True))
        return _supervise(procs, timeout)
    finally:
        kill_all(procs)
        remove_segments(job)  # what ranks that died could not unlink
        for log in logs:
            if log is not None:
                log.close()
        del store


def _supervise(procs: list[subprocess.Popen], timeout: float) -> LaunchResult:
    deadline = time.monotonic() + timeout
    while True:
        codes = [p.poll() for p in procs]
        failed = next((r for r, c in enumerate(codes) if c not in (None, 0)), None)
        if failed is not None:
            kill_all(procs)
            tail = _stderr_tail(procs[failed])
            for rank, proc in enumerate(procs):  # rank 0's stderr is the user's too
                if rank == 0 and rank != failed:
                    sys.stderr.write(_stderr_tail(proc))
            return LaunchResult(codes[failed] or 1, failed, tail)
        if all(c == 0 for c in codes):
            sys.stderr.write(_stderr_tail(procs[0]))
            return LaunchResult(0, None, "")
        if time.monotonic() > deadline:
            kill_all(procs)
            return LaunchResult(124, None, f"job killed after the {timeout:.0f} s timeout\n")
        time.sleep(0.05)


def _stderr_tail(proc: subprocess.Popen, limit: int = 4000) -> str:
    if proc.stderr is None:
        return ""
    try:
        text = proc.stderr.read() or ""
    except ValueError:
        return ""
    return text[-limit:]


def launch_mpirun(n: int, argv: Sequence[str], timeout: float,
                  env: dict[str, str] | None = None) -> LaunchResult:
    """`mpirun -n N python argv...` with the flags this machine needs (see transports.mpirun)."""
    from topocoll.comm.transports.mpirun import run_mpirun

    job = uuid.uuid4().hex[:12]
    env = {"TOPOCOLL_JOB_ID": job, "OMP_NUM_THREADS": "1", **(env or {})}
    extra: list[str] = []
    for name in sorted(env):
        extra += ["-x", name]
    try:
        result = run_mpirun(n, list(argv), timeout, extra=extra, env={**os.environ, **env})
    finally:
        remove_segments(job)
    sys.stdout.write(result.stdout or "")
    code = result.returncode
    return LaunchResult(code, None if code == 0 else -1, (result.stderr or "")[-4000:])


def launch_job(command: str, transport: str, n: int, argv_for: Callable[[str], list[str]],
               timeout: float, env: dict[str, str] | None = None) -> int:
    """Run `n` ranks of one of our commands here: through mpirun for the MPI transport,
    else our own launcher; `argv_for(launcher)` is the rank-side command line. Reports a
    failure in one line (plus the failing rank's stderr) and returns the exit code."""
    if transport == "mpi":
        result = launch_mpirun(n, argv_for("mpirun"), timeout, env)
    else:
        result = launch_local(n, argv_for("torchrun"), timeout, env)
    if result.returncode:
        who = "" if result.failed_rank in (None, -1) else f" (rank {result.failed_rank} failed)"
        sys.stderr.write(result.stderr_tail)
        print(f"topocoll {command}: the local job failed{who}, exit {result.returncode}",
              file=sys.stderr)
    return result.returncode
