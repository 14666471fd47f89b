"""The MPI transport: `mpi_checks.py` under mpirun on 2, 3 and 4 ranks, and the helpers.

The mpirun runs oversubscribe a small machine (4 ranks on 2 cores); the launcher's
`mpi_yield_when_idle` keeps that fast. About 35 s in all on 2 cores.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from topocoll.comm.transports import mpirun as launcher
from topocoll.comm.transports.mpi import MISSING_EXTRA, load_mpi

CHECKS = Path(__file__).with_name("mpi_checks.py")
HAVE_MPI4PY = importlib.util.find_spec("mpi4py") is not None


def _mpirun_path() -> str | None:
    try:
        return launcher.find_mpirun()
    except FileNotFoundError:
        return None


MPIRUN = _mpirun_path()
needs_mpi4py = pytest.mark.skipif(not HAVE_MPI4PY,
                                  reason="mpi4py is not installed (the 'mpi' extra)")
needs_mpirun = pytest.mark.skipif(MPIRUN is None,
                                  reason="mpirun not found next to the interpreter or on PATH "
                                         "(the 'mpi' extra installs Open MPI)")


@pytest.mark.mpi
@pytest.mark.multiprocess
@needs_mpi4py
@needs_mpirun
@pytest.mark.timeout(180)
@pytest.mark.parametrize("n", [2, 3, 4])
def test_mpi_checks_under_mpirun(n: int) -> None:
    proc = launcher.run_mpirun(n, [str(CHECKS)], timeout=120)
    output = f"$ {' '.join(proc.args)}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    assert proc.returncode == 0, output
    ok = sorted(int(r) for r in re.findall(r"^MPI-CHECKS OK rank=(\d+)$", proc.stdout, re.M))
    assert ok == list(range(n)), output
    info = re.search(r"^MPI-CHECKS version=(.+) interfaces=(\S+)$", proc.stdout, re.M)
    assert info, output
    assert info.group(1).startswith("mpi4py "), output
    if launcher.netns_usable():
        # mpirun ran in a namespace where loopback is the only interface to listen on.
        assert info.group(2) == "lo", output


@pytest.mark.mpi
@pytest.mark.multiprocess
@needs_mpirun
@pytest.mark.timeout(60)
def test_run_mpirun_timeout_kills_every_rank() -> None:
    marker = f"topocoll-hang-{uuid.uuid4().hex}"
    start = time.monotonic()
    proc = launcher.run_mpirun(2, ["-c", f"import time; time.sleep(600)  # {marker}"],
                               timeout=6, grace=3)
    assert proc.returncode == launcher.TIMEOUT_RC
    assert "timed out after 6 s" in proc.stderr
    assert time.monotonic() - start < 20
    deadline = time.monotonic() + 5
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_with(marker) == []


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmdline:
                found.append(int(entry.name))
    return found


def test_mpirun_command_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    cmd = launcher.mpirun_command(4, ["script.py", "--x"], mpirun="/opt/bin/mpirun",
                                  extra=["--bind-to", "none"], mca={"coll_tuned_priority": 0})
    assert cmd == ["/opt/bin/mpirun", "--allow-run-as-root", "--oversubscribe",
                   "--mca", "mpi_yield_when_idle", "1",
                   "--mca", "btl", "self,sm", "--mca", "pml", "ob1",
                   "--mca", "btl_tcp_if_include", "lo",
                   "--mca", "coll_tuned_priority", "0",
                   "-n", "4", "--bind-to", "none", sys.executable, "script.py", "--x"]
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    cmd = launcher.mpirun_command(2, ["s.py"], mpirun="mpirun", interface="eth0",
                                  prtemca={"prte_silence_shared_fs": 1},
                                  mca={"mpi_yield_when_idle": 0})
    assert "--allow-run-as-root" not in cmd
    assert "self,sm" not in cmd  # a multi-host job needs the TCP BTL
    joined = " ".join(cmd)
    assert "--mca btl_tcp_if_include eth0" in joined
    assert "--prtemca oob_tcp_if_include eth0" in joined
    assert "--prtemca prte_silence_shared_fs 1" in joined
    assert cmd.count("mpi_yield_when_idle") == 1 and "--mca mpi_yield_when_idle 0" in joined
    with pytest.raises(ValueError):
        launcher.mpirun_command(0, ["s.py"], mpirun="mpirun")


def test_find_mpirun_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=re.escape("pip install 'topocoll[mpi]'")):
        launcher.find_mpirun()
    fake = tmp_path / "mpirun"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert launcher.find_mpirun() == str(fake)


def test_module_imports_without_mpi4py() -> None:
    code = ("import sys; sys.modules['mpi4py'] = None\n"
            "import topocoll.comm.transports.mpi as m\n"
            "try:\n    m.MPITransport()\nexcept ImportError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == MISSING_EXTRA + "\n"


def test_missing_extra_message(monkeypatch: pytest.MonkeyPatch) -> None:
    assert MISSING_EXTRA == ("MPI transport needs the 'mpi' extra: "
                             "pip install 'topocoll[mpi]'")
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", None)
    with pytest.raises(ImportError) as info:
        load_mpi()
    assert str(info.value) == MISSING_EXTRA
    assert info.value.__cause__ is None and info.value.__suppress_context__


@needs_mpi4py
def test_unloadable_mpi_library_keeps_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    import mpi4py

    monkeypatch.setitem(sys.modules, "mpi4py", mpi4py)
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", None)  # as if libmpi.so failed to load
    monkeypatch.delattr(mpi4py, "MPI", raising=False)
    with pytest.raises(ImportError) as info:
        load_mpi()
    message = str(info.value)
    assert message.startswith(MISSING_EXTRA + " (") and "\n" not in message
