"""Every algorithm through every installed transport, in real processes on localhost.

Each case is one job (`tests/collective_checks.py` on every rank) that checks all
collectives, algorithms, dtypes and ops against numpy and the transport's native
collective; a failing rank takes the job down and its message names the case.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from topocoll.benchmarks.launcher import launch_local, launch_mpirun
from topocoll.extras import available

CHECKS = Path(__file__).with_name("collective_checks.py")

CASES = [
    # transport, intra, layout, quick
    ("gloo", "shm", "2,3", False),
    ("gloo", "same", "1,1,1", False),
    ("gloo", "shm", "4,4", True),
    ("gloo", "shm", "3,1,3", True),
    ("shm", "shm", "2,3", False),
    ("shm", "shm", "7", True),
    ("ucx", "shm", "2,3", False),
    ("ucx", "same", "2", True),
    ("mpi", "shm", "2,3", False),
    ("mpi", "same", "3", True),
]


def _needs(transport: str) -> None:
    if transport == "ucx" and not available("ucxx"):
        pytest.skip("ucxx is not installed (extra 'ucx')")
    if transport == "mpi" and not available("mpi4py"):
        pytest.skip("mpi4py is not installed (extra 'mpi')")


@pytest.mark.multiprocess
@pytest.mark.timeout(240)
@pytest.mark.parametrize("transport, intra, layout, quick", CASES,
                         ids=[f"{t}-{i}-{lay}" for t, i, lay, _ in CASES])
def test_every_algorithm_matches_numpy(transport, intra, layout, quick, capfd,
                                       no_leaked_segments):
    _needs(transport)
    n = sum(int(x) for x in layout.split(","))
    argv = [str(CHECKS), transport, intra, *(["--quick"] if quick else [])]
    launch = launch_mpirun if transport == "mpi" else launch_local
    result = launch(n, argv, 200, {"TOPOCOLL_TOPOLOGY": layout})
    out = capfd.readouterr().out
    assert result.returncode == 0, (f"{transport}/{intra} on {layout}: rank "
                                    f"{result.failed_rank} failed:\n{result.stderr_tail}")
    assert "COLLECTIVE-CHECKS OK rank=0" in out, out[-2000:]


@pytest.mark.multiprocess
@pytest.mark.timeout(240)
@pytest.mark.parametrize("transport, layout", [("gloo", "2,3"), ("shm", "4")])
def test_phased_executor_matches_numpy(transport, layout, capfd, no_leaked_segments):
    """The default executor runs by dependencies; the phase-by-phase one (the schedule's
    literal semantics, `TOPOCOLL_EXECUTOR=phased`) must stay correct too."""
    n = sum(int(x) for x in layout.split(","))
    result = launch_local(n, [str(CHECKS), transport, "shm"], 200,
                          {"TOPOCOLL_TOPOLOGY": layout, "TOPOCOLL_EXECUTOR": "phased"})
    out = capfd.readouterr().out
    assert result.returncode == 0, (f"phased {transport} on {layout}: rank "
                                    f"{result.failed_rank} failed:\n{result.stderr_tail}")
    assert "COLLECTIVE-CHECKS OK rank=0" in out, out[-2000:]
