"""Building and running the `mpirun` command line for this project (Open MPI 5).

`mpirun_command(n, argv)` returns, for a local run (the default, `interface="lo"`)::

    [mpirun, --allow-run-as-root (only as root), --oversubscribe,
     --mca mpi_yield_when_idle 1, --mca btl self,sm, --mca pml ob1,
     --mca btl_tcp_if_include lo, -n N, *extra, sys.executable, *argv]

Why each flag is there:

- `--allow-run-as-root`: Open MPI refuses to start as root without it (containers and
  CI run as root). Only added when we are root.
- `--oversubscribe`: without it Open MPI refuses to start more ranks than cores (tests run
  4 ranks on 2 cores).
- `--mca mpi_yield_when_idle 1`: an idle rank yields the CPU instead of busy-polling. With
  more ranks than cores, busy-polling ranks starve each other (a collective measured 70x
  slower here without it).
- `--mca btl self,sm` and `--mca pml ob1` (local runs only): all ranks are on this host,
  so messages go through shared memory; leaving out the TCP BTL means the ranks open no
  TCP socket at all, and pinning ob1 keeps UCX/OFI (which probe devices and may open
  their own sockets) out of the job. Checked with `ss -ltnp`.
- `--mca btl_tcp_if_include <interface>`: the one interface the job names. For local runs
  it is `lo`; it only matters if a caller adds TCP back to `btl`. For multi-host runs
  (`interface="eth0"`) it is joined by `--prtemca oob_tcp_if_include <interface>` for the
  runtime's own out-of-band channel.

A caveat measured on Open MPI 5.0.11: `*_if_include` selects the interfaces that are
*advertised*, not the address that is bound. The TCP BTL and PRRTE's out-of-band listener
(in `prterun` itself, always present) bind the wildcard address, and PRRTE refuses `lo`
for its out-of-band channel ("No network interfaces were found for out-of-band
communications"). So for local runs `run_mpirun` by default starts mpirun in a private
network namespace that holds only a loopback interface (`unshare --net`, root only): what
mpirun listens on is then reachable through loopback only. `isolate=False` turns it off;
`netns_usable()` says whether it is possible here. Open MPI prints no warning for any of
these settings.

Extra MCA settings: `mca={"name": "value"}` adds `--mca name value` (or replaces one of
ours: `mca={"btl": "self,sm,tcp"}`), `prtemca=...` does the same for `--prtemca` (runtime,
i.e. PRRTE, parameters); `extra=[...]` is passed through before the program (`--host a,b`,
`--bind-to none`, ...).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

MISSING_MPIRUN = ("mpirun not found next to {python} or on PATH; the MPI transport needs "
                  "the 'mpi' extra: pip install 'topocoll[mpi]'")
TIMEOUT_RC = 124  # what `timeout(1)` returns
LOCAL_INTERFACES = ("lo", "lo0")


def find_mpirun() -> str:
    """`mpirun` of this environment (next to the Python executable), else the one on PATH."""
    beside = Path(sys.executable).parent / "mpirun"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("mpirun")
    if found is None:
        raise FileNotFoundError(MISSING_MPIRUN.format(python=sys.executable))
    return found


def mpirun_command(n: int, argv: Sequence[str], *, extra: Sequence[str] = (),
                   mca: Mapping[str, str] | None = None,
                   prtemca: Mapping[str, str] | None = None,
                   interface: str = "lo", python: str | None = None,
                   mpirun: str | None = None, fault_tolerant: bool = False) -> list[str]:
    """The mpirun argv that runs `python *argv` on `n` ranks (see the module docstring).

    `fault_tolerant` adds `--with-ft ulfm`: by default Open MPI's runtime kills every
    rank as soon as one dies, so survivors never get to report the failure; with ULFM
    the job lives on, operations with the dead rank fail (MPI_ERR_PROC_FAILED) and the
    MPI transport revokes its communicators so the other ranks fail too. Off by default:
    it measured about 3x the latency of a small all-reduce here (12 -> 42 us, 4 ranks).
    """
    if n < 1:
        raise ValueError(f"mpirun needs at least one rank, not {n}")
    cmd = [mpirun or find_mpirun()]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    cmd.append("--oversubscribe")
    if fault_tolerant:
        cmd += ["--with-ft", "ulfm"]
    params: dict[str, object] = {"mpi_yield_when_idle": 1}
    runtime: dict[str, object] = {}
    if interface in LOCAL_INTERFACES:
        params.update(btl="self,sm", pml="ob1")
    else:
        runtime["oob_tcp_if_include"] = interface
    params["btl_tcp_if_include"] = interface
    # The caller's settings replace ours rather than repeat the flag.
    params.update(mca or {})
    runtime.update(prtemca or {})
    for key, value in params.items():
        cmd += ["--mca", key, str(value)]
    for key, value in runtime.items():
        cmd += ["--prtemca", key, str(value)]
    cmd += ["-n", str(n), *extra, python or sys.executable, *argv]
    return cmd


@functools.lru_cache(maxsize=1)
def netns_usable() -> bool:
    """Whether `unshare --net` works here (root, util-linux and iproute2 present)."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return False
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if unshare is None or ip is None:
        return False
    try:
        probe = subprocess.run([unshare, "--net", "--", ip, "link", "set", "lo", "up"],
                               capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def in_loopback_netns(cmd: Sequence[str]) -> list[str]:
    """`cmd` run in a new network namespace whose only interface is loopback (brought up)."""
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if unshare is None or ip is None:
        raise FileNotFoundError("network isolation needs `unshare` (util-linux) and `ip`")
    script = f'{ip} link set lo up && exec "$@"'
    return [unshare, "--net", "--", "/bin/sh", "-c", script, "topocoll-netns", *cmd]


def run_mpirun(n: int, argv: Sequence[str], timeout: float, *, extra: Sequence[str] = (),
               mca: Mapping[str, str] | None = None,
               prtemca: Mapping[str, str] | None = None, interface: str = "lo",
               isolate: bool | None = None, env: Mapping[str, str] | None = None,
               cwd: str | os.PathLike[str] | None = None,
               grace: float = 5.0, fault_tolerant: bool = False,
               ) -> subprocess.CompletedProcess[str]:
    """Run `python *argv` on `n` ranks; never outlives `timeout` (+ `grace`) seconds.

    Returns the completed process with its stdout and stderr text. On timeout every
    process of the job is killed (SIGTERM, then SIGKILL after `grace` s) and the result
    has returncode 124 with a note at the end of stderr.

    `isolate=None` runs a local job in a loopback-only network namespace when that is
    possible here (see the module docstring); True requires it, False never does it.
    """
    cmd = mpirun_command(n, argv, extra=extra, mca=mca, prtemca=prtemca, interface=interface,
                         fault_tolerant=fault_tolerant)
    local = interface in LOCAL_INTERFACES
    if isolate is None:
        isolate = local and netns_usable()
    run_env = dict(os.environ if env is None else env)
    if isolate:
        if not local:
            raise ValueError(f"isolate=True hides interface {interface!r}; use it for "
                             "local (loopback) runs only")
        cmd = in_loopback_netns(cmd)
        # Libraries that pick an interface by resolving the hostname: there is only lo.
        run_env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return _run_killing_session(cmd, timeout, grace, run_env, cwd)


def _run_killing_session(cmd: Sequence[str], timeout: float, grace: float,
                         env: Mapping[str, str], cwd: str | os.PathLike[str] | None,
                         ) -> subprocess.CompletedProcess[str]:
    # A new session: mpirun and everything it starts share its session id, even the ranks
    # that prterun puts into process groups of their own, so we can find them all.
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, env=dict(env), cwd=cwd,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(list(cmd), proc.returncode, out, err)
    except subprocess.TimeoutExpired:
        pass
    _signal_session(proc.pid, signal.SIGTERM)  # prterun forwards it and cleans up
    try:
        out, err = proc.communicate(timeout=grace)
    except subprocess.TimeoutExpired:
        out, err = "", ""
    _signal_session(proc.pid, signal.SIGKILL)  # whatever is left, orphaned ranks included
    try:
        more_out, more_err = proc.communicate(timeout=grace)
        out, err = (out or "") + (more_out or ""), (err or "") + (more_err or "")
    except subprocess.TimeoutExpired:
        proc.kill()
    note = f"\n[topocoll] mpirun timed out after {timeout:.0f} s; its processes were killed\n"
    return subprocess.CompletedProcess(list(cmd), TIMEOUT_RC, out or "", (err or "") + note)


def session_pids(sid: int) -> list[int]:
    """Live processes whose session id is `sid` (Linux /proc); empty elsewhere."""
    pids = []
    proc_dir = Path("/proc")
    if not proc_dir.is_dir():
        return pids
    for entry in proc_dir.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp session ...; comm may hold spaces and parentheses.
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 3 and int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def _signal_session(sid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(sid, sig)
    for pid in session_pids(sid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


__all__ = ["MISSING_MPIRUN", "TIMEOUT_RC", "find_mpirun", "in_loopback_netns",
           "mpirun_command", "netns_usable", "run_mpirun", "session_pids"]
