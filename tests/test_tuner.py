"""The tuner: model ranking refined by measurements, defaults without a profile, printing.

Measurements are fake benchmark JSON rows (the shape `topocoll bench --json` writes), so
each test states exactly what was "measured" and checks the decision that follows.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from topocoll.comm.algorithms import algorithm_names
from topocoll.comm.selection import default_choice
from topocoll.comm.tuner import (
    TUNABLE,
    build_table,
    format_table,
    predict,
    rank_candidates,
)
from topocoll.comm.tuning import TuningTable
from topocoll.topology import PRESETS, Topology
from topocoll.topology.profile import from_preset

PRESET = PRESETS["emulated-2x4-1gbit"]
TOPO = PRESET.topology()
PROFILE = from_preset(PRESET)
TRANSPORT = "gloo"
MAX_BUCKET = 21
AR = "all_reduce"
MIB = 1 << 20


def row(algorithm: str, nbytes: int, time_us: float, *, collective: str = AR,
        transport: str = TRANSPORT, wrong: int | None = 0,
        topology: Topology = TOPO) -> dict[str, Any]:
    """One line of `topocoll bench --json` output (the fields the tuner reads and more)."""
    return {"collective": collective, "algorithm": algorithm, "transport": transport,
            "world_size": topology.world_size, "layout": list(topology.layout),
            "bytes": nbytes, "dtype": "float32", "op": "sum", "time_us": time_us,
            "algbw_gbs": 0.0, "busbw_gbs": 0.0, "wrong": wrong, "bound_us": None,
            "predicted_us": None,
            "topology": {**topology.to_dict(), "fingerprint": topology.fingerprint}}


def tune(rows: list[dict[str, Any]] = (), profile=PROFILE, collectives=(AR,)) -> TuningTable:
    return build_table(TOPO, TRANSPORT, "shm", profile, collectives, rows,
                       max_bucket=MAX_BUCKET)


def pred(algorithm: str, nbytes: int) -> float:
    return predict(AR, algorithm, nbytes, TOPO, PROFILE)


@pytest.fixture(scope="module")
def model_only() -> TuningTable:
    return tune()


def decisions(table: TuningTable, collective: str = AR) -> list[tuple[int, str, str]]:
    return [(r.lo, r.algorithm, r.source) for r in table.collectives[collective].ranges]


# ----- measurement overrides the model ---------------------------------------------------
def test_model_only_table_follows_the_model(model_only: TuningTable) -> None:
    for r in model_only.collectives[AR].ranges:
        best = rank_candidates(AR, max(r.lo, 1), TOPO, PROFILE)[0][0]
        assert (r.algorithm, r.source) == (best, "model"), f"[{r.lo}, {r.hi})"


def test_measured_best_beats_the_models_pick(model_only: TuningTable) -> None:
    model_pick = model_only.lookup(AR, MIB)
    other = "ring" if model_pick != "ring" else "tree"
    rows = [row(model_pick, MIB, 3 * pred(model_pick, MIB)),
            row(other, MIB, pred(model_pick, MIB))]
    table = tune(rows)
    found = table.explain(AR, MIB)
    assert (found.algorithm, found.source) == (other, "measurement"), (
        f"model picked {model_pick}, measured {other} faster; table says {found}")
    assert found.candidates[other].measured_us == pytest.approx(pred(model_pick, MIB))
    assert found.candidates[model_pick].predicted_us == pytest.approx(pred(model_pick, MIB))


def test_native_measured_fastest_is_picked() -> None:
    best = rank_candidates(AR, MIB, TOPO, PROFILE)[0]
    rows = [row(best[0], MIB, best[1]), row("native", MIB, best[1] / 2)]
    found = tune(rows).explain(AR, MIB)
    assert (found.algorithm, found.source) == ("native", "measurement"), found
    assert found.candidates["native"].predicted_us is None


def test_batch_rows_rank_by_their_mean_so_rare_stalls_count() -> None:
    """Two algorithms at 1 MiB in back-to-back batches: `ring`'s median is lower, but a
    few of its batches stalled, so its mean (the time per call a loop pays) is higher
    and the table takes `tree`. The same figures from per-call rows (barrier before each
    call) are ranked by their median, where an outlier is mostly barrier skew."""
    base = pred("tree", MIB)
    stalls = [0.95 * base] * 11 + [8 * base] * 4          # median 0.95x, mean ~2.8x
    steady = [1.0 * base] * 15
    slow = [3 * base] * 15                                 # every other one measured slow
    batch = [row("ring", MIB, 0.95 * base) | {"timing": "batch", "samples_us": stalls},
             row("tree", MIB, base) | {"timing": "batch", "samples_us": steady}]
    batch += [row(a, MIB, 3 * base) | {"timing": "batch", "samples_us": slow}
              for a in algorithm_names(AR) if a not in ("ring", "tree")]
    found = tune(batch).explain(AR, MIB)
    assert (found.algorithm, found.source) == ("tree", "measurement"), found
    assert found.candidates["ring"].measured_us == pytest.approx(sum(stalls) / 15)
    per_call = [r | {"timing": "call"} for r in batch]
    assert tune(per_call).explain(AR, MIB).algorithm == "ring"
    bad = [r | {"samples_us": [0.0, "x"]} if r["algorithm"] == "ring" else r for r in batch]
    assert tune(bad).explain(AR, MIB).algorithm == "ring"


IGNORED = {
    "other-fingerprint": dict(topology=Topology.from_layout([4, 4], rails=2)),
    "other-transport": dict(transport="mpi"),
    "tuned-rows": dict(algorithm="tuned"),
    "wrong-results": dict(wrong=3),
    "other-collective": dict(collective="all_gather"),
    "zero-time": dict(time_us=0.0),
}


@pytest.mark.parametrize("change", IGNORED.values(), ids=IGNORED.keys())
def test_rows_that_do_not_apply_are_ignored(model_only: TuningTable,
                                            change: dict[str, Any]) -> None:
    """A row that would make `tree` (or `tuned`) absurdly fast everywhere, if it counted."""
    fields = {"algorithm": "tree", "time_us": 0.001, **change}
    algorithm, time_us = fields.pop("algorithm"), fields.pop("time_us")
    rows = [row(algorithm, n, time_us, **fields) for n in (1024, MIB)]
    assert decisions(tune(rows)) == decisions(model_only), f"{change} changed the table"


# ----- interpolation between measured sizes ----------------------------------------------
LOW, HIGH = 12, 20  # measured at 4 KiB and 1 MiB only


@pytest.fixture(scope="module")
def trend() -> tuple[TuningTable, float, float]:
    """Every algorithm measured exactly as predicted, except ring: 10x faster than the
    best prediction at 4 KiB, 10x slower than its own prediction at 1 MiB."""
    rows = []
    for k in (LOW, HIGH):
        n = 1 << k
        for algo in algorithm_names(AR):
            rows.append(row(algo, n, pred(algo, n)))
    best_low = min(pred(a, 1 << LOW) for a in algorithm_names(AR))
    ring_low, ring_high = best_low / 10, 10 * pred("ring", 1 << HIGH)
    rows = [r for r in rows if r["algorithm"] != "ring"]
    rows += [row("ring", 1 << LOW, ring_low), row("ring", 1 << HIGH, ring_high)]
    r_low = math.log(ring_low / pred("ring", 1 << LOW))
    r_high = math.log(ring_high / pred("ring", 1 << HIGH))
    return tune(rows), r_low, r_high


def test_measured_sizes_take_the_measurement(trend) -> None:
    table, _, _ = trend
    low, high = table.explain(AR, 1 << LOW), table.explain(AR, 1 << HIGH)
    assert (low.algorithm, low.source) == ("ring", "measurement"), low
    assert high.algorithm != "ring" and high.source == "measurement", high


@pytest.mark.parametrize("k", range(LOW + 1, HIGH), ids=lambda k: f"2^{k}B")
def test_unmeasured_sizes_interpolate_the_correction(trend, k: int) -> None:
    """Between measured sizes ring's measured/predicted ratio is interpolated in log-size
    (geometric in the ratio); the others were measured as predicted (ratio 1)."""
    table, r_low, r_high = trend
    n = 1 << k
    w = (k - LOW) / (HIGH - LOW)
    costs = {a: pred(a, n) for a in algorithm_names(AR)}
    costs["ring"] *= math.exp(r_low * (1 - w) + r_high * w)
    want = min(costs, key=costs.__getitem__)
    found = table.explain(AR, n)
    assert (found.algorithm, found.source) == (want, "model+measurement"), (
        f"{n} B: corrected costs {costs}; table picked {found.algorithm}")


def test_the_pick_follows_the_measured_trend(trend) -> None:
    """ring wins near 4 KiB where it was measured fast, loses near 1 MiB, switching once."""
    table, _, _ = trend
    picks = [table.lookup(AR, 1 << k) for k in range(LOW, HIGH + 1)]
    assert picks[0] == "ring" and picks[1] == "ring" and picks[-1] != "ring", picks
    switch = picks.index(next(p for p in picks if p != "ring"))
    assert "ring" not in picks[switch:], f"ring comes back after losing: {picks}"


def test_sizes_beyond_the_measurements_keep_the_nearest_correction(trend) -> None:
    """Outside the measured span the nearest measured ratio holds (clamped, not
    extrapolated): above 1 MiB ring stays 10x slower than predicted, so it never wins."""
    table, _, _ = trend
    for k in range(HIGH + 1, MAX_BUCKET + 1):
        assert table.lookup(AR, 1 << k) != "ring", f"2^{k} B"


# ----- no profile ------------------------------------------------------------------------
@pytest.mark.parametrize("collective", TUNABLE)
def test_without_a_profile_the_defaults_rule(collective: str) -> None:
    table = tune(profile=None, collectives=(collective,))
    for r in table.collectives[collective].ranges:
        want = default_choice(collective, 1 << (max(r.lo, 1).bit_length() - 1), TOPO).algorithm
        assert (r.algorithm, r.source) == (want, "default"), f"{collective} [{r.lo}, {r.hi})"
        assert all(c.predicted_us is None for c in r.candidates.values())


def test_without_a_profile_measurements_still_decide_where_measured() -> None:
    rows = [row("ring", MIB, 50.0), row("hierarchical", MIB, 80.0)]
    table = tune(rows, profile=None)
    found = table.explain(AR, MIB)
    assert (found.algorithm, found.source) == ("ring", "measurement"), found
    assert table.explain(AR, 4 * MIB).source == "default"


# ----- printing --------------------------------------------------------------------------
def test_format_table_shows_every_collective_and_its_fallback() -> None:
    table = build_table(TOPO, TRANSPORT, "shm", PROFILE, TUNABLE, max_bucket=12)
    text = format_table(table)
    assert table.fingerprint in text and TRANSPORT in text
    sections = {block.split(" ", 1)[0]: block for block in text.split("\n\n")[1:]}
    assert sorted(sections) == sorted(TUNABLE), text
    for name, coll in table.collectives.items():
        block = sections[name]
        assert block.startswith(f"{name} (fallback {coll.fallback})"), block
        assert "[0, " in block and "inf)" in block, f"{name}: sizes not all covered\n{block}"
        for r in coll.ranges:
            assert r.algorithm in block, f"{name}: pick {r.algorithm} not shown\n{block}"
