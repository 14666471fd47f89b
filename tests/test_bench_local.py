"""`topocoll bench --launcher local` for every transport and collective: wrong = 0 everywhere.

This is the acceptance command of the transports issue, with fewer iterations to keep CI
short; every algorithm of the library must appear in the JSON.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from topocoll.benchmarks.sizes import parse_sizes
from topocoll.comm import algorithm_names
from topocoll.extras import available

TRANSPORTS = ["gloo", "mpi", "ucx", "shm"]
COLLECTIVES = ["all_reduce", "all_to_all", "all_to_all_v"]
REQUIRED_FIELDS = {"collective", "algorithm", "transport", "world_size", "layout", "bytes",
                   "dtype", "op", "time_us", "algbw_gbs", "busbw_gbs", "wrong", "bound_us",
                   "predicted_us"}


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
@pytest.mark.parametrize("collective", COLLECTIVES)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_bench_every_algorithm_verified(transport, collective, tmp_path: Path,
                                        no_leaked_segments) -> None:
    if transport == "mpi" and not available("mpi4py"):
        pytest.skip("mpi4py is not installed (extra 'mpi')")
    if transport == "ucx" and not available("ucxx"):
        pytest.skip("ucxx is not installed (extra 'ucx')")
    out = tmp_path / "rows.jsonl"
    cmd = [sys.executable, "-m", "topocoll", "bench", "--launcher", "local", "-n", "5",
           "--layout", "2,3", "--transport", transport, "--collective", collective,
           "--algorithm", "all", "--sizes", "1K:1M", "--check", "--json", str(out),
           "--iters", "2", "--warmup", "0", "--timeout", "120"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    sizes = parse_sizes("1K:1M")
    assert {r["algorithm"] for r in rows} == set(algorithm_names(collective))
    assert len(rows) == len(sizes) * len(algorithm_names(collective))
    for row in rows:
        assert set(row) >= REQUIRED_FIELDS, REQUIRED_FIELDS - set(row)
        assert row["wrong"] == 0, row
        assert row["transport"] == transport and row["world_size"] == 5
        assert row["layout"] == [2, 3] and row["time_us"] > 0
    assert "#wrong" in result.stdout  # the nccl-tests style table header


@pytest.mark.multiprocess
@pytest.mark.timeout(200)
def test_wrong_column_catches_a_planted_error(tmp_path: Path, no_leaked_segments) -> None:
    """One element of rank 0's result is corrupted after the call: #wrong must say 1."""
    out = tmp_path / "rows.jsonl"
    cmd = [sys.executable, "-m", "topocoll", "bench", "--launcher", "local", "-n", "3",
           "--collective", "all_reduce", "--algorithm", "ring,native", "--sizes", "4K",
           "--check", "--json", str(out), "--iters", "1", "--warmup", "0"]
    env = {**os.environ, "TOPOCOLL_BENCH_PLANT_WRONG": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["wrong"] for r in rows] == [1, 1]


@pytest.mark.multiprocess
@pytest.mark.timeout(200)
def test_batch_timing_runs_back_to_back_batches(tmp_path: Path, no_leaked_segments) -> None:
    """`--timing batch`: rows say so, carry one sample per batch and are still verified
    (all-reduce in place with prod: inputs refreshed per call, so no overflow)."""
    from topocoll.benchmarks.harness import BATCHES
    from topocoll.benchmarks.suite import Sweep, _bench_args

    out = tmp_path / "rows.jsonl"
    for collective, op in (("all_to_all", "sum"), ("all_reduce", "prod")):
        cmd = [sys.executable, "-m", "topocoll", "bench", "--launcher", "local",
               "--layout", "2,3", "--collective", collective, "--op", op,
               "--algorithm", "native,all", "--sizes", "4K", "--iters", "1", "--warmup",
               "1", "--timing", "batch", "--check", "--json", str(out), "--timeout", "120"]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "back-to-back batches" in result.stdout
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert {r["algorithm"] for r in rows} == {"native", *algorithm_names(collective)}
        for row in rows:
            assert row["timing"] == "batch" and row["wrong"] == 0, row
            assert len(row["samples_us"]) == BATCHES and row["time_us"] > 0
            assert row["time_us"] == pytest.approx(statistics.fmean(row["samples_us"]),
                                                   rel=1e-3, abs=1e-3)
            assert row["median_us"] == pytest.approx(statistics.median(row["samples_us"]),
                                                     rel=1e-3, abs=1e-3)
    sweep = Sweep("x", "gloo", "all_to_all", "all", "8K", timing="batch")
    args = _bench_args(sweep, "torchrun", tmp_path / "x.jsonl")
    assert args[args.index("--timing") + 1] == "batch"
    assert "--timing" not in _bench_args(Sweep("y", "gloo", "all_to_all", "all", "8K"),
                                         "torchrun", tmp_path / "y.jsonl")


def test_batch_timing_splits_the_calls_into_at_most_BATCHES_batches() -> None:
    """Every timed call is made once: 180 calls are 15 batches of 12, 3 calls (a large
    size) are 3 batches of 1, each after one barrier; all-reduce inputs refreshed per call."""
    from topocoll.benchmarks.harness import BATCHES, _time_batches

    class _Counter:
        def __init__(self) -> None:
            self.barriers = self.resets = self.runs = 0

        def barrier(self) -> None:
            self.barriers += 1

        def reset(self) -> None:
            self.resets += 1

        def run(self) -> None:
            self.runs += 1

    for calls, batches in ((180, BATCHES), (3, 3), (1, 1)):
        fake = _Counter()
        samples = _time_batches(fake, fake, fake.run, "all_reduce", calls)
        assert len(samples) == batches and all(s > 0 for s in samples)
        assert (fake.runs, fake.barriers) == (calls, batches)
        assert fake.resets == calls + batches  # one per call plus one per batch


def test_small_sizes_get_more_calls_up_to_twenty_times() -> None:
    from topocoll.benchmarks.harness import iterations

    assert iterations(1 << 10, 3) == 60        # capped at 20x
    assert iterations(256 << 10, 3) == 12      # 3 x 1 MiB / 256 KiB
    assert iterations(1 << 20, 3) == 3         # from 1 MiB: as asked
    assert iterations(256 << 20, 1) == 1
    assert iterations(1 << 10, 3, 60) == 180   # a larger cap


def test_batch_timing_gives_more_calls_up_to_16_mib() -> None:
    """Back-to-back batches of more than one call up to 16 MiB: the regret sweep's
    tuned-vs-best comparison is noise when both run one algorithm."""
    from topocoll.benchmarks.harness import BATCHES, BenchOptions, _calls

    def calls(nbytes: int, iters: int = 3) -> int:
        return _calls(nbytes, BenchOptions("all_to_all", ("pairwise",), (nbytes,),
                                           iters=iters, timing="batch"))

    assert calls(1 << 10) == 360                 # capped at 120x
    assert calls(256 << 10) == 192               # 3 x 16 MiB / 256 KiB
    assert calls(256 << 10) // BATCHES >= 12     # batches of 12 calls, not one
    assert calls(4 << 20) == 12
    assert calls(16 << 20) == 3                  # from 16 MiB: as asked
    assert calls(1 << 10, iters=2) == 240
    call_timed = BenchOptions("all_to_all", ("pairwise",), (256 << 10,), iters=3)
    assert _calls(256 << 10, call_timed) == 12   # per-call timing keeps the 1 MiB rule


def test_batch_rows_take_the_mean_and_call_rows_the_median() -> None:
    """A stall in one batch of four counts in a batch row (a loop pays it) and not in a
    per-call row (there it is barrier skew)."""
    from topocoll.benchmarks.harness import row_time

    samples = [2.0, 1.0, 9.0, 1.0]
    assert row_time(samples, "batch") == pytest.approx(3.25)
    assert row_time(samples, "call") == pytest.approx(1.5)


def test_batch_timing_takes_the_algorithms_in_turns(monkeypatch) -> None:
    """Batch k of every algorithm before batch k+1 of any, on one set of buffers; an
    algorithm the transport lacks gets no row and no turns."""
    from types import SimpleNamespace

    from topocoll.benchmarks import harness

    order: list[str] = []
    runs = {"ring": lambda: None, "tree": lambda: None, "native": None}
    names = {id(run): name for name, run in runs.items() if run is not None}
    cases: set[int] = set()

    def warmed_up(job, opts, case, algorithm):
        cases.add(id(case))
        return runs[algorithm]

    def time_batches(comm, case, run, collective, calls, batches):
        assert batches == 1
        order.append(names[id(run)])
        return [float(calls)]

    monkeypatch.setattr(harness, "_warmed_up", warmed_up)
    monkeypatch.setattr(harness, "_time_batches", time_batches)
    monkeypatch.setattr(harness, "_row", lambda job, opts, nbytes, case, a, chosen, run,
                        samples, budget, profile: {"algorithm": a, "samples": samples})
    job = SimpleNamespace(rank=0, world_size=2, communicator=SimpleNamespace(last_choice=None))
    opts = harness.BenchOptions("all_reduce", ("ring", "native", "tree"), (4096,), iters=3,
                                timing="batch")
    rows = harness.measure_interleaved(job, opts, 4096, opts.algorithms)
    turns = [order[2 * k:2 * k + 2] for k in range(harness.BATCHES)]
    assert all(sorted(turn) == ["ring", "tree"] for turn in turns)  # one batch each per turn
    assert {tuple(turn) for turn in turns} == {("ring", "tree"), ("tree", "ring")}  # shuffled
    assert turns == [harness._turn_order(["ring", "tree"], 4096, k)  # alike on every rank
                     for k in range(harness.BATCHES)]
    assert rows[1] is None and [r["algorithm"] for r in (rows[0], rows[2])] == ["ring", "tree"]
    calls = harness._calls(4096, opts)
    assert rows[0]["samples"] == [calls // harness.BATCHES] * harness.BATCHES
    assert len(cases) == 1


@pytest.mark.parametrize(("nbytes", "turns", "per_batch"),
                         [(4096, 45, 24), (1 << 20, 45, 3), (64 << 20, 3, 1)],
                         ids=["4K-45-turns", "1M-45-turns", "64M-keeps-3"])
def test_more_turns_keep_each_batch_size_where_batches_hold_several_calls(
        monkeypatch, nbytes: int, turns: int, per_batch: int) -> None:
    """`--turns 45`: 45 turns of the same batch size (more calls) where a batch holds
    several calls; a large size timed one call per batch keeps its `iters` calls."""
    from types import SimpleNamespace

    from topocoll.benchmarks import harness

    taken: list[int] = []

    def time_batches(comm, case, run, collective, calls, batches):
        taken.append(calls)
        return [1.0]

    monkeypatch.setattr(harness, "_warmed_up", lambda job, opts, case, a: lambda: None)
    monkeypatch.setattr(harness, "_time_batches", time_batches)
    monkeypatch.setattr(harness, "_row", lambda job, opts, n, case, a, chosen, run,
                        samples, budget, profile: {"samples": samples})
    job = SimpleNamespace(rank=0, world_size=2, communicator=SimpleNamespace(last_choice=None))
    opts = harness.BenchOptions("all_to_all", ("pairwise", "bruck"), (nbytes,), iters=3,
                                timing="batch", turns=45)
    rows = harness.measure_interleaved(job, opts, nbytes, opts.algorithms)
    assert [len(r["samples"]) for r in rows] == [turns, turns]
    assert taken == [per_batch] * (2 * turns)
    plain = harness.BenchOptions("all_to_all", ("pairwise",), (nbytes,), iters=3,
                                 timing="batch")
    calls = harness._calls(nbytes, plain)
    assert per_batch == calls // harness._batch_count(calls)  # the batch size of 15 turns


def test_turns_are_refused_without_batch_timing(tmp_path: Path) -> None:
    from topocoll.benchmarks.harness import BenchOptions
    from topocoll.benchmarks.suite import Sweep, _bench_args, tuning_sweeps

    with pytest.raises(ValueError, match=r"--turns 9: .*--timing batch"):
        BenchOptions("all_reduce", ("ring",), (4096,), turns=9)
    with pytest.raises(ValueError, match="--turns 0"):
        BenchOptions("all_reduce", ("ring",), (4096,), timing="batch", turns=0)
    sweep = Sweep("r", "gloo", "all_reduce", "all,tuned", "4K", timing="batch", turns=45)
    args = _bench_args(sweep, "torchrun", tmp_path / "r.jsonl")
    assert args[args.index("--turns") + 1] == "45"
    for full, turns, limit in ((True, 45, 1200), (False, None, 600)):
        measure, regret = tuning_sweeps(full, tmp_path / "profile.json")
        assert {(s.turns, s.timeout_s) for s in measure + regret} == {(turns, limit)}


def test_the_suite_warns_when_the_machine_is_already_busy() -> None:
    from topocoll.benchmarks.suite import busy_machine_warning

    assert busy_machine_warning(0.4, 2) is None
    assert busy_machine_warning(1.0, 2) is None
    warning = busy_machine_warning(3.1, 2)
    assert warning is not None and "load average 3.1 on 2 core(s)" in warning
    assert busy_machine_warning(3.1, 8) is None


@pytest.mark.parametrize(("quickack", "congestion"), [(False, None), (True, "reno")])
def test_suite_gives_every_cluster_of_the_run_the_same_links(
        quickack: bool, congestion: str | None, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """2x4 and 3+5 (and 2 rails in a full run) are brought up with the run's rate, burst,
    quickack and congestion control (cubic unless told): a 3+5 sweep on other links than
    the 2x4 ones would not compare."""
    from topocoll.benchmarks import suite
    from topocoll.reports import generate
    from topocoll.topology import cluster

    ups: list[dict] = []
    monkeypatch.setattr(suite, "cluster_possible", lambda: True)
    monkeypatch.setattr(cluster, "cluster_up", lambda *a, **kw: ups.append(kw))
    monkeypatch.setattr(cluster, "cluster_down", lambda *a, **kw: [])
    monkeypatch.setattr(suite, "run_sweep", lambda sweep, out, *a: out / f"{sweep.name}.jsonl")
    monkeypatch.setattr(suite, "check_simulator", lambda out: None)
    monkeypatch.setattr(generate, "write_report", lambda paths, out: out / "index.html")
    argv = ["--quick", "--out", str(tmp_path), "--rate", "2gbit", "--burst", "64kb"]
    argv += ["--quickack"] if quickack else []
    argv += ["--congestion-control", congestion] if congestion else []
    assert suite.main(argv) == 0
    assert len(ups) == 2  # 2x4, then 3+5 (no rails in a quick run)
    assert all(kw["rate"] == "2gbit" and kw["burst"] == "64kb" and kw["quickack"] is quickack
               and kw["congestion_control"] == (congestion or "cubic") for kw in ups), ups
    assert ups[1]["layout"] == "3,5"
