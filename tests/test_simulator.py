"""The simulator: exact pricing agrees with the cost model, extrapolation with exact."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from topocoll.comm import simulator
from topocoll.comm.algorithms import algorithm_names, build_schedule
from topocoll.comm.cost_model import price
from topocoll.comm.selection import default_params
from topocoll.comm.tuner import spec_for
from topocoll.topology import PRESETS, Topology
from topocoll.topology.profile import from_preset

PROFILE = from_preset(PRESETS["8x-nvlink-400g"])
CASES = [(c, a) for c in ("all_reduce", "all_to_all") for a in algorithm_names(c)]


@pytest.mark.parametrize("collective,algorithm", CASES, ids=[f"{c}-{a}" for c, a in CASES])
def test_sweep_matches_pricing_each_size(collective: str, algorithm: str) -> None:
    """One schedule scaled over sizes = the exact schedule of each size (whole chunks)."""
    topo = Topology.from_layout([4, 4], rails=2)
    sizes = [1 << k for k in (12, 16, 20, 24)]
    swept = simulator.price_sweep(collective, algorithm, topo, PROFILE, sizes)
    for size, got in zip(sizes, swept):
        params = default_params(collective, algorithm, size, topo)
        schedule = build_schedule(algorithm, topo, spec_for(collective, size, 8), **params)
        want = price(schedule, PROFILE, 4)[0]
        assert got == pytest.approx(want, rel=1e-6), f"{algorithm} at {size} bytes"


@pytest.mark.parametrize("collective,algorithm", CASES, ids=[f"{c}-{a}" for c, a in CASES])
def test_extrapolation_agrees_with_exact(collective: str, algorithm: str) -> None:
    """Priced at 2..16 nodes and extrapolated to 32 = priced exactly at 32, within 15%."""
    topo = Topology.from_layout([2] * 32, rails=2, intra_link="nvlink", inter_link="rdma")
    sizes = [1 << k for k in range(10, 31, 4)]
    exact = simulator.price_sweep(collective, algorithm, topo, PROFILE, sizes)
    guessed = simulator._extrapolate(collective, algorithm, topo, PROFILE, sizes)
    error = np.abs(guessed / exact - 1)
    worst = int(error.argmax())
    assert error.max() <= 0.15, (f"{algorithm}: {error.max():.1%} off at {sizes[worst]} "
                                 f"bytes ({guessed[worst]:.1f} vs {exact[worst]:.1f} us)")


def test_large_topology_is_extrapolated_and_ranked() -> None:
    topo = PRESETS["8x-nvlink-400g"].topology(64)
    rows = simulator.simulate(topo, PROFILE, "all_reduce", [1 << 10, 1 << 30])
    assert {r.method for r in rows} == {"extrapolated"}
    assert {r.algorithm for r in rows} == set(algorithm_names("all_reduce"))
    best = dict((size, algo) for size, algo, *_ in simulator.winners(rows))
    # Latency-bound 1 KiB: a log-step algorithm; 1 GiB: never the flat latency-bound tree.
    assert best[1 << 10] in ("recursive_doubling", "hierarchical_leader", "rabenseifner")
    assert best[1 << 30] != "tree"


def test_simulate_command_writes_markdown_and_json(tmp_path) -> None:
    md, js = tmp_path / "sim.md", tmp_path / "sim.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "topocoll", "simulate", "--preset", "8x-nvlink-400g",
         "--nodes", "4", "--sizes", "1K:1M:32", "--markdown", str(md), "--json", str(js)],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    text = md.read_text()
    for algo in algorithm_names("all_reduce") + algorithm_names("all_to_all"):
        assert algo in text
    rows = [json.loads(line) for line in js.read_text().splitlines()]
    assert len(rows) == 3 * (6 + 4)  # 3 sizes x (6 all-reduce + 4 all-to-all algorithms)
    assert all(r["predicted_us"] > 0 and r["world_size"] == 32 for r in rows)


def test_simulate_bad_profile_is_one_line(tmp_path) -> None:
    bad = tmp_path / "p.json"
    bad.write_text('{"schema": "topocoll.profile", "version": 1}')
    done = subprocess.run([sys.executable, "-m", "topocoll", "simulate", "--profile", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "p.json" in done.stderr and "links" in done.stderr
    assert "Traceback" not in done.stderr
