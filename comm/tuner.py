"""The tuner: rank algorithms with the cost model, refine with measurements, write a table.

Per collective and power-of-two size bucket (1 B .. 1 GiB) every algorithm's schedule is
built exactly as the communicator would build it (same default parameters) and priced on
the topology with the profile. Measurements (benchmark JSON rows of the same topology
shape and transport) then refine the model: at a measured size the measured time is the
cost; between measured sizes each algorithm's predicted cost is multiplied by its
measured/predicted ratio, interpolated in log-size, so one sparse measured sweep corrects
every bucket. The pick per bucket is the cheapest; the order of authority is built-in
defaults < model < measurement < user override (`TOPOCOLL_ALGO_<COLLECTIVE>`, applied at
call time by `selection.choose`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from topocoll.topology import Topology
from topocoll.topology.profile import Profile

from .algorithms import NATIVE, algorithm_names, build_schedule
from .collectives import CollectiveSpec
from .cost_model import price
from .selection import default_choice, default_params
from .tuning import Candidate, CollectiveTable, SizeRange, TuningTable

TUNABLE = ("all_reduce", "all_to_all", "all_to_all_v", "reduce_scatter", "all_gather")
MAX_BUCKET = 30  # 1 GiB
ITEMSIZE = 4  # float32, the benchmark's default dtype


def bucket_sizes(max_bucket: int = MAX_BUCKET) -> list[int]:
    return [1 << k for k in range(max_bucket + 1)]


def spec_for(collective: str, nbytes: int, world_size: int,
             itemsize: int = ITEMSIZE) -> CollectiveSpec:
    """The call the benchmark makes at `nbytes` (its `bytes` column), as a spec."""
    p = world_size
    elements = max(nbytes // itemsize, 1)
    if collective == "all_reduce":
        return CollectiveSpec.all_reduce(p, elements)
    per = max(elements // p, 1)
    if collective == "reduce_scatter":
        return CollectiveSpec.reduce_scatter(p, per)
    if collective == "all_gather":
        return CollectiveSpec.all_gather(p, per)
    if collective == "all_to_all":
        return CollectiveSpec.all_to_all(p, per)
    if collective == "all_to_all_v":
        from topocoll.benchmarks.collectives import uneven_splits

        return CollectiveSpec.all_to_all_v([uneven_splits(p, r, per * p) for r in range(p)])
    raise ValueError(f"{collective} is not tunable; tunable: {', '.join(TUNABLE)}")


def predict(collective: str, algorithm: str, nbytes: int, topology: Topology,
            profile: Profile, itemsize: int = ITEMSIZE) -> float | None:
    """The model's time for one call, or None for `native` (a library's black box)."""
    if algorithm == NATIVE:
        return None
    spec = spec_for(collective, nbytes, topology.world_size, itemsize)
    params = default_params(collective, algorithm, nbytes, topology)
    schedule = build_schedule(algorithm, topology, spec, **params)
    return float(price(schedule, profile, itemsize)[0])


def rank_candidates(collective: str, nbytes: int, topology: Topology, profile: Profile
                    ) -> list[tuple[str, float]]:
    """Every algorithm with its predicted time, cheapest first."""
    priced = [(a, predict(collective, a, nbytes, topology, profile))
              for a in algorithm_names(collective)]
    return sorted(((a, t) for a, t in priced if t is not None), key=lambda x: x[1])


# ----- measurements --------------------------------------------------------------------
Measured = dict[str, dict[int, float]]  # algorithm -> bytes -> time (us), measured_time


def measurements_from_rows(rows: Iterable[Mapping[str, Any]], collective: str,
                           topology: Topology, transport: str) -> Measured:
    """Times of forced algorithms (not `tuned`) on this shape and transport."""
    out: Measured = defaultdict(dict)
    for row in rows:
        if (row.get("collective") != collective or row.get("algorithm") in (None, "tuned")
                or row.get("transport") != transport):
            continue
        fingerprint = (row.get("topology") or {}).get("fingerprint")
        if fingerprint != topology.fingerprint:
            continue
        time_us = measured_time(row)
        if time_us is not None and row.get("wrong") in (0, None):
            out[str(row["algorithm"])][int(row["bytes"])] = time_us
    return dict(out)


def measured_time(row: Mapping[str, Any]) -> float | None:
    """What a call of this row costs a training loop, in microseconds.

    Back-to-back batches (`timing: batch`): the mean of the batches, i.e. the row's
    total time over its calls, stalls included (why: `benchmarks.harness.row_time`);
    computed from the samples, so rows written when a batch row's `time_us` was its
    median rank the same way. Per-call rows (a barrier before each call): `time_us`, the
    median, since there an outlier is mostly the barrier's exit skew, which no loop pays.
    """
    samples = row.get("samples_us")
    if row.get("timing") == "batch" and isinstance(samples, list) and samples and all(
            isinstance(v, (int, float)) and v > 0 for v in samples):
        return float(sum(samples) / len(samples))
    time_us = row.get("time_us")
    if isinstance(time_us, (int, float)) and time_us > 0:
        return float(time_us)
    return None


def _log_ratio_at(points: Mapping[int, float], nbytes: int) -> float | None:
    """Measured/predicted log-ratio at `nbytes`, interpolated in log-size, clamped."""
    if not points:
        return None
    xs = sorted(points)
    x = math.log2(max(nbytes, 1))
    logs = [math.log2(max(s, 1)) for s in xs]
    if x <= logs[0]:
        return points[xs[0]]
    if x >= logs[-1]:
        return points[xs[-1]]
    for i in range(1, len(xs)):
        if x <= logs[i]:
            w = (x - logs[i - 1]) / (logs[i] - logs[i - 1])
            return points[xs[i - 1]] * (1 - w) + points[xs[i]] * w
    return points[xs[-1]]  # pragma: no cover


def _corrections(predicted: Mapping[str, Mapping[int, float | None]], measured: Measured
                 ) -> dict[str, dict[int, float]]:
    """Per algorithm: measured sizes -> ln(measured / predicted)."""
    out: dict[str, dict[int, float]] = {}
    for algo, times in measured.items():
        points = {}
        for nbytes, t in times.items():
            model = _predicted_near(predicted.get(algo, {}), nbytes)
            if model:
                points[nbytes] = math.log(t / model)
        out[algo] = points
    return out


def _predicted_near(table: Mapping[int, float | None], nbytes: int) -> float | None:
    if nbytes in table:
        return table[nbytes]
    bucket = 1 << (max(nbytes, 1).bit_length() - 1)
    return table.get(bucket)


# ----- the table -----------------------------------------------------------------------
def tune_collective(collective: str, topology: Topology, profile: Profile | None,
                    measured: Measured | None = None, max_bucket: int = MAX_BUCKET
                    ) -> CollectiveTable:
    sizes = bucket_sizes(max_bucket)
    algos = algorithm_names(collective)
    measured = measured or {}
    predicted: dict[str, dict[int, float | None]] = {
        a: {s: (predict(collective, a, s, topology, profile) if profile else None)
            for s in sizes} for a in algos}
    corrections = _corrections(predicted, measured)
    ranges = []
    for k, s in enumerate(sizes):
        hi = sizes[k + 1] if k + 1 < len(sizes) else None
        lo = 0 if k == 0 else s
        candidates: dict[str, Candidate] = {}
        costs: dict[str, float] = {}
        for algo in [*algos, *([NATIVE] if NATIVE in measured else [])]:
            model = predicted.get(algo, {}).get(s)
            seen = _measured_in(measured.get(algo, {}), lo, hi)
            corrected = _corrected(model, corrections, algo, s) if corrections else None
            candidates[algo] = Candidate(model, seen, corrected)
            cost = seen if seen is not None else (corrected if corrected is not None
                                                  else model)
            if cost is not None:
                costs[algo] = cost
        default = default_choice(collective, s, topology).algorithm
        if costs:
            pick = min(costs, key=lambda a: costs[a])
            measured_here = sum(1 for c in candidates.values() if c.measured_us is not None)
            if measured_here >= 2 and candidates[pick].measured_us is not None:
                source = "measurement"
            elif candidates[pick].predicted_us is None:
                source = "measurement"  # no model: the one measured candidate
            else:
                source = "model+measurement" if corrections else "model"
        else:
            pick, source = default, "default"
        ranges.append(SizeRange(lo, hi, pick, source, candidates))
    return CollectiveTable(default_choice(collective, 1 << 20, topology).algorithm,
                           tuple(ranges))


def _measured_in(times: Mapping[int, float], lo: int, hi: int | None) -> float | None:
    inside = [t for b, t in times.items() if b >= lo and (hi is None or b < hi)]
    return min(inside) if inside else None


def _corrected(model: float | None, corrections: Mapping[str, Mapping[int, float]],
               algo: str, nbytes: int) -> float | None:
    """The model's cost scaled by this algorithm's measured/predicted ratio (or the
    median ratio of the measured algorithms when this one was never measured)."""
    if model is None:
        return None
    own = _log_ratio_at(corrections.get(algo, {}), nbytes)
    if own is None:
        others = sorted(r for r in (_log_ratio_at(c, nbytes) for c in corrections.values())
                        if r is not None)
        own = others[len(others) // 2] if others else 0.0
    return model * math.exp(own)


def build_table(topology: Topology, transport: str, intra: str, profile: Profile | None,
                collectives: Sequence[str] = TUNABLE,
                rows: Iterable[Mapping[str, Any]] = (), max_bucket: int = MAX_BUCKET
                ) -> TuningTable:
    rows = list(rows)
    tables = {c: tune_collective(c, topology, profile,
                                 measurements_from_rows(rows, c, topology, transport),
                                 max_bucket)
              for c in collectives}
    return TuningTable(topology, transport, intra, tables, profile,
                       datetime.now(timezone.utc).isoformat(timespec="seconds"))


def format_table(table: TuningTable) -> str:
    """`topocoll tune --show`: runs of buckets with the same pick merged into one range,
    with the pick's source and cost at the range's start and the runner-up's margin."""
    from topocoll.benchmarks.sizes import format_size

    lines = [f"# tuning table for {table.topology.describe()}",
             f"# fingerprint {table.fingerprint}, transport {table.transport or '?'}, "
             f"intra {table.intra or '?'}, created {table.created or '?'}"]
    for name, coll in table.collectives.items():
        lines.append(f"\n{name} (fallback {coll.fallback})")
        lines.append(f"  {'range':<20} {'algorithm':<20} {'source':<18} {'cost(us)':>12}  "
                     "runner-up")
        runs: list[list[SizeRange]] = []
        for r in coll.ranges:
            if runs and runs[-1][-1].algorithm == r.algorithm and runs[-1][-1].source == r.source:
                runs[-1].append(r)
            else:
                runs.append([r])
        for run in runs:
            first, last = run[0], run[-1]
            hi = "inf" if last.hi is None else format_size(last.hi)
            span = f"[{format_size(first.lo)}, {hi})"
            cost = _cost(first.candidates.get(first.algorithm))
            others = sorted(((a, _cost(c)) for a, c in first.candidates.items()
                             if a != first.algorithm and _cost(c) is not None),
                            key=lambda x: x[1])
            runner = (f"{others[0][0]} +{(others[0][1] / cost - 1) * 100:.0f}%"
                      if others and cost else "-")
            shown = f"{cost:.1f}" if cost is not None else "-"
            lines.append(f"  {span:<20} {first.algorithm:<20} {first.source:<18} "
                         f"{shown:>12}  {runner}")
    return "\n".join(lines)


def _cost(c: Candidate | None) -> float | None:
    return None if c is None else c.cost_us
