"""`topocoll pingpong --launcher local` on every installed transport, plus its helpers.

The sweep is short (1K, 32K, 1M with 3 timed round trips each); every transport's run
must exit 0, report one verified row per size with positive numbers, and show bandwidth
growing from 1K to 1M (latency-bound at 1K, bandwidth-bound at 1M on any transport).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from topocoll.benchmarks.pingpong import (
    LARGE_ITERS,
    TAG,
    PingPongError,
    child_argv,
    intra_for,
    iterations,
    mismatch,
    payload,
    warmups,
)
from topocoll.benchmarks.sizes import parse_sizes
from topocoll.cli import build_parser
from topocoll.comm.transports.shm import stale_segments
from topocoll.extras import available

TRANSPORTS = ["gloo", "mpi", "ucx", "shm"]
SIZES = "1K:1M:32"
ROW_FIELDS = {"transport", "intra", "bytes", "iters", "one_way_us", "bandwidth_gbs", "rtt_us",
              "rtt_min_us", "rtt_median_us", "rtt_max_us", "versions", "verified"}


def _pingpong_segments() -> set[Path]:
    """The ping-pong channels (ranks 0<->1, its tag) in /dev/shm.

    Narrower than the `no_leaked_segments` fixture, which counts every topocoll segment
    and so fails whenever another job runs on the machine at the same time.
    """
    return {p for p in stale_segments()
            if p.name.endswith((f"-0-1-{TAG}", f"-1-0-{TAG}"))}


@pytest.mark.multiprocess
@pytest.mark.timeout(180)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_pingpong_local(transport: str, tmp_path: Path) -> None:
    if transport == "mpi" and not available("mpi4py"):
        pytest.skip("mpi4py is not installed (extra 'mpi')")
    if transport == "ucx" and not available("ucxx"):
        pytest.skip("ucxx is not installed (extra 'ucx')")
    out = tmp_path / "pingpong.jsonl"
    cmd = [sys.executable, "-m", "topocoll", "pingpong", "--launcher", "local",
           "--transport", transport, "--sizes", SIZES, "--iters", "3", "--json", str(out),
           "--timeout", "30"]
    before = _pingpong_segments()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=150)
    assert result.returncode == 0, result.stderr[-3000:]
    leaked = _pingpong_segments() - before
    assert not leaked, f"pingpong left shared-memory segments behind: {sorted(leaked)}"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    sizes = parse_sizes(SIZES)
    assert [r["bytes"] for r in rows] == sizes
    for row in rows:
        assert set(row) >= ROW_FIELDS, ROW_FIELDS - set(row)
        assert row["transport"] == transport and row["intra"] == intra_for(transport)
        assert row["verified"] is True and row["iters"] == 3 and len(row["rtt_us"]) == 3
        assert row["one_way_us"] > 0 and row["bandwidth_gbs"] > 0
        assert 0 < row["rtt_min_us"] <= row["rtt_median_us"] <= row["rtt_max_us"]
        assert row["one_way_us"] == pytest.approx(row["rtt_median_us"] / 2, rel=1e-3)
        assert row["versions"]["torch"] == torch.__version__
    bandwidth = [r["bandwidth_gbs"] for r in rows]
    assert bandwidth[0] < bandwidth[-1], bandwidth
    assert bandwidth[0] < bandwidth[1], bandwidth
    # The table on rank 0's stdout: a header and one line per size.
    lines = result.stdout.splitlines()
    assert any("one-way(us)" in line for line in lines)
    assert [line.split()[0] for line in lines if line.strip() and not line.startswith("#")
            ][1:] == ["1K", "32K", "1M"]


def test_iterations_scale_down_for_large_sizes() -> None:
    assert iterations(1 << 10, 50) == 50
    assert iterations(1 << 20, 50) == 16
    assert iterations(4 << 20, 50) == LARGE_ITERS == 5
    assert iterations(64 << 20, 50) == 5
    assert iterations(64 << 20, 3) == 3  # never more than asked
    assert warmups(1 << 10, 5, 50) == 5
    assert warmups(64 << 20, 5, 50) == 1
    assert warmups(64 << 20, 0, 50) == 0


def test_payload_is_random_and_mismatch_is_reported() -> None:
    data = payload(4096, seed=3)
    assert data.dtype == torch.uint8 and data.any()
    assert torch.equal(data, payload(4096, seed=3))
    assert mismatch(data, data.clone()) is None
    bad = data.clone()
    bad[100] ^= 0xFF
    message = mismatch(data, bad)
    assert message is not None and "1 of 4096" in message and "offset 100" in message
    assert issubclass(PingPongError, RuntimeError)


def test_cli_defaults_and_child_command(tmp_path: Path) -> None:
    args = build_parser().parse_args(["pingpong", "--transport", "ucx",
                                      "--json", str(tmp_path / "x.jsonl")])
    assert (args.launcher, args.sizes, args.poll) == ("local", "1K:64M", "backoff")
    argv = child_argv(args, "torchrun")
    assert argv[:5] == ["-m", "topocoll", "pingpong", "--launcher", "torchrun"]
    assert argv[argv.index("--json") + 1] == str(tmp_path / "x.jsonl")
    assert intra_for("shm") == "shm" and intra_for("gloo") == "same"


class _ThreadBootstrap:
    """Two ranks as two threads of this process (all-gather through a shared list)."""

    def __init__(self, rank: int, shared: dict) -> None:
        self.rank, self.world_size, self.shared = rank, 2, shared

    def all_gather_json(self, value: object) -> list:
        self.shared["slots"][self.rank] = value
        self.shared["barrier"].wait(timeout=10)
        out = list(self.shared["slots"])
        self.shared["barrier"].wait(timeout=10)
        return out


class _Done:
    blocking = False

    def __init__(self, check=lambda: True) -> None:
        self.check = check

    def test(self) -> bool:
        return self.check()

    def describe(self) -> str:
        return "fake"


class _QueueTransport:
    """Messages through queues; `flip` corrupts one byte of every delivered message."""

    name = "fake"

    def __init__(self, rank: int, queues: dict, flip: bool) -> None:
        self.rank, self.queues, self.flip = rank, queues, flip

    def isend(self, tensor, peer, tag):
        self.queues[(self.rank, peer)].put(tensor.clone())
        return _Done()

    def irecv(self, tensor, peer, tag):
        queue = self.queues[(peer, self.rank)]

        def arrived() -> bool:
            if queue.empty():
                return False
            tensor.copy_(queue.get())
            if self.flip:
                tensor[-1] += 1  # two hops add 2: never cancels out
            return True

        return _Done(arrived)


def _run_two_fake_ranks(flip: bool) -> list:
    import queue
    import threading
    from types import SimpleNamespace

    from topocoll.benchmarks.pingpong import PingPongOptions, measure

    shared = {"slots": [None, None], "barrier": threading.Barrier(2)}
    queues = {(0, 1): queue.Queue(), (1, 0): queue.Queue()}
    results: list = [None, None]

    def rank_main(rank: int) -> None:
        boot = _ThreadBootstrap(rank, shared)
        comm = SimpleNamespace(barrier=lambda: boot.all_gather_json(None),
                               transports=SimpleNamespace(
                                   inter=_QueueTransport(rank, queues, flip)))
        job = SimpleNamespace(rank=rank, world_size=2, transport="fake", bootstrap=boot,
                              communicator=comm)
        opts = PingPongOptions("gloo", (4096,), iters=3, warmup=1, timeout=10)
        try:
            results[rank] = measure(job, opts, 4096)
        except PingPongError as exc:
            results[rank] = exc

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return results


def test_corrupted_payload_fails_on_every_rank() -> None:
    good = _run_two_fake_ranks(flip=False)
    assert good[0]["bytes"] == 4096 and good[0]["verified"] and good[1] is None
    bad = _run_two_fake_ranks(flip=True)
    assert all(isinstance(r, PingPongError) for r in bad), bad
    assert "rank 0: the echo" in str(bad[0]) and "rank 1: the 4096-byte payload" in str(bad[0])
    assert "offset 4095" in str(bad[1])
