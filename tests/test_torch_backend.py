"""backend="topocoll" in torch.distributed: collectives, DDP, MoE dispatch, torchrun."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from topocoll.benchmarks.launcher import launch_local

HERE = Path(__file__).resolve().parent
CHECKS = HERE / "backend_checks.py"
EXAMPLE = HERE.parent / "examples" / "ddp_train.py"


def _run_session(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run in a new session; on timeout kill the whole group (torchrun's workers too)."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{cmd[:4]} did not finish in {timeout} s:\n{err[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _run(n: int, *flags: str, capfd) -> str:
    result = launch_local(n, [str(CHECKS), *flags], timeout=240)
    out = capfd.readouterr().out
    assert result.returncode == 0, (f"{n} ranks {flags}: rank {result.failed_rank} failed:\n"
                                    f"{result.stderr_tail}")
    assert "BACKEND-CHECKS OK rank=0" in out, out[-2000:]
    return out


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_collectives_match_gloo(n, capfd, no_leaked_segments):
    _run(n, capfd=capfd)


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
@pytest.mark.parametrize("n", [2, 3])
def test_ddp_training_matches_gloo(n, capfd, no_leaked_segments):
    _run(n, "--ddp", capfd=capfd)


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
@pytest.mark.parametrize("n", [4, 5])
def test_moe_dispatch_round_trips(n, capfd, no_leaked_segments):
    _run(n, "--moe", capfd=capfd)


def test_backend_registered_by_entry_point_without_import(tmp_path):
    """torch loads the `torch.backends` entry point: no `import topocoll` needed."""
    code = ("import torch.distributed as dist; "
            "print('TOPOCOLL' in dist.Backend._plugins)")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.stdout.strip() == "True", result.stderr


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_torchrun_example_trains_like_gloo(tmp_path, no_leaked_segments):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun, "torchrun is installed with torch"
    sums = {}
    for backend in ("topocoll", "gloo"):
        result = _run_session(
            [torchrun, "--standalone", "--nproc-per-node", "4", str(EXAMPLE),
             "--backend", backend, "--steps", "10"], tmp_path, timeout=240)
        if backend == "gloo" and _torch_gloo_exit_abort(result):
            warnings.warn("the Gloo reference run aborted at interpreter exit after its "
                          "result (torch's teardown, not topocoll); its checksum is used",
                          stacklevel=1)
        else:
            assert result.returncode == 0, result.stderr[-3000:]
        assert f"({backend}, 4 ranks)" in result.stdout
        sums[backend] = float(result.stdout.split("checksum")[-1])
    assert sums["topocoll"] == pytest.approx(sums["gloo"], rel=1e-5)


def _torch_gloo_exit_abort(result: subprocess.CompletedProcess) -> bool:
    """Plain torch Gloo + DDP sometimes aborts one rank after the script's last line, in
    interpreter teardown (`terminate called without an active exception`, no Python frame
    left; 6 of ~60 runs of this example under load with torch 2.13, with or without a
    barrier and dropping the model before `destroy_process_group`). The topocoll backend
    shuts its Gloo groups down itself and did not abort in 25 runs beside them. Only that
    exact failure, after the final checksum was printed, is the reference's."""
    return (result.returncode != 0 and "final parameter checksum" in result.stdout
            and "terminate called without an active exception" in result.stderr
            and "Signal 6 (SIGABRT)" in result.stderr)


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_overhead_benchmark_prints_a_ratio(capfd):
    from topocoll.benchmarks import backend_overhead

    assert backend_overhead.main(["-n", "2", "--iters", "50"]) == 0
    line = [s for s in capfd.readouterr().out.splitlines() if s.startswith("{")][-1]
    row = json.loads(line)
    assert row["topocoll_us"] > 0 and row["gloo_us"] > 0 and row["ratio"] > 0
