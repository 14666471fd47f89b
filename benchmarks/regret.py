"""Regret: how far a pick is from the measured best forced algorithm, per size.

For each size of a sweep: the best of our forced algorithms (measured in the same run),
and three views of the tuner, each as regret = time / best - 1:
- **pick**: the forced row of the algorithm the tuner chose (the autotuning literature's
  regret: the choice judged on the same measurements as the best);
- **tuned run**: the `tuned` row's own time (the pick as the backend runs it, which adds
  the run-to-run noise of two separate measurements);
- **model pick**: the forced row of the cost model's own first choice (no measurement).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from topocoll.comm.algorithms import NATIVE, TUNED

from .sizes import format_size

WITHIN = 0.10  # the acceptance line: within 10% of the best
# A ratio computed exactly on a line lands a rounding error off it (110 / 100 - 1 is
# 0.10000000000000009): it counts as on the line.
ON_THE_LINE = 1e-9


@dataclass(frozen=True)
class RegretRow:
    bytes: int
    best: str
    best_us: float
    tuned_us: float | None
    tuned_pick: str | None
    model_pick: str | None
    model_us: float | None
    pick_us: float | None = None

    @property
    def pick_regret(self) -> float | None:
        return None if self.pick_us is None else self.pick_us / self.best_us - 1

    @property
    def tuned_regret(self) -> float | None:
        return None if self.tuned_us is None else self.tuned_us / self.best_us - 1

    @property
    def model_regret(self) -> float | None:
        return None if self.model_us is None else self.model_us / self.best_us - 1


def regret_rows(rows: Iterable[Mapping[str, Any]]) -> list[RegretRow]:
    forced: dict[int, dict[str, float]] = defaultdict(dict)
    tuned: dict[int, Mapping[str, Any]] = {}
    for row in rows:
        algo, size = row.get("algorithm"), int(row.get("bytes", 0))
        if algo == TUNED:
            tuned[size] = row
        elif algo != NATIVE and row.get("time_us"):
            forced[size][str(algo)] = float(row["time_us"])
    out = []
    for size in sorted(forced):
        times = forced[size]
        best = min(times, key=lambda a: times[a])
        t_row = tuned.get(size)
        model = t_row.get("model_pick") if t_row else None
        pick = str(t_row.get("chosen")) if t_row else None
        out.append(RegretRow(size, best, times[best],
                             float(t_row["time_us"]) if t_row else None, pick,
                             model, times.get(model) if model else None,
                             times.get(pick) if pick else None))
    return out


def format_regret(rows: list[RegretRow]) -> str:
    if not rows or all(r.tuned_us is None and r.model_us is None for r in rows):
        return ""
    lines = ["# regret against the best forced algorithm of this run",
             f"{'size':>8}  {'best':<20}{'best(us)':>12}  {'tuned pick':<20}{'pick':>8}"
             f"{'tuned(us)':>12}{'run':>8}  {'model pick':<20}{'regret':>8}"]

    def pct(value: float | None) -> str:
        return f"{value * 100:+.1f}%" if value is not None else "-"

    for r in rows:
        tuned = f"{r.tuned_us:.1f}" if r.tuned_us is not None else "-"
        lines.append(f"{format_size(r.bytes):>8}  {r.best:<20}{r.best_us:>12.1f}  "
                     f"{r.tuned_pick or '-':<20}{pct(r.pick_regret):>8}{tuned:>12}"
                     f"{pct(r.tuned_regret):>8}  {r.model_pick or '-':<20}"
                     f"{pct(r.model_regret):>8}")
    lines.append(summary(rows))
    return "\n".join(lines)


def summary(rows: list[RegretRow]) -> str:
    parts = []
    for label, values in (("tuner's pick", [r.pick_regret for r in rows]),
                          ("tuned run", [r.tuned_regret for r in rows]),
                          ("model pick", [r.model_regret for r in rows])):
        known = [v for v in values if v is not None]
        if known:
            ok = sum(1 for v in known if v <= WITHIN + ON_THE_LINE)
            parts.append(f"{label} within {WITHIN:.0%} of the best at {ok}/{len(known)} sizes "
                         f"({ok / len(known):.0%}), worst {max(known) * 100:+.1f}%")
    return "# regret summary: " + "; ".join(parts) if parts else ""


ACCURACY_FROM = 1 << 20  # the model is judged from 1 MiB up (below, latency noise rules)
ACCURACY_WITHIN = 0.25  # the acceptance line: predicted within 25% of measured


def format_accuracy(rows: Iterable[Mapping[str, Any]]) -> str:
    """The cost model's error per row that has a prediction, and its worst from 1 MiB.

    The error is judged on the row's time. Where that is a mean of back-to-back batches,
    the error against the median batch is shown beside it. Why: the model prices a call
    without stalls, and on a shared machine a few batches that a stall lands in move the
    mean. In one full run every all-to-all algorithm at 1-2 MiB came out 25-31% above
    its price while the machine slowed for a few seconds, and `pairwise` at 1 MiB had
    batches of 100+ ms among ones of 18-20 ms in every run while the emulated cluster
    ran this VM's `bbr` congestion control (reports/pairwise_delayed_ack.md). The two
    figures side by side say whether a miss is the model's or a stall's."""
    judged = [r for r in rows if r.get("predicted_us") and r.get("time_us")]
    if not judged:
        return ""
    lines = ["# cost model: predicted vs measured",
             f"{'size':>8}  {'algorithm':<22}{'measured(us)':>14}{'predicted(us)':>15}"
             f"{'error':>9}{'vs median':>11}"]
    worst: list[tuple[float, str, int]] = []
    worst_median: list[tuple[float, str, int]] = []
    for r in judged:
        predicted = float(r["predicted_us"])
        err = predicted / float(r["time_us"]) - 1
        median = _median_if_mean(r)
        err_median = err if median is None else predicted / median - 1
        name = str(r.get("chosen") or r["algorithm"])
        beside = "-" if median is None else f"{err_median * 100:+.1f}%"
        lines.append(f"{format_size(int(r['bytes'])):>8}  {name:<22}{r['time_us']:>14.1f}"
                     f"{r['predicted_us']:>15.1f}{err * 100:>+8.1f}%{beside:>11}")
        if int(r["bytes"]) >= ACCURACY_FROM:
            worst.append((abs(err), name, int(r["bytes"])))
            worst_median.append((abs(err_median), name, int(r["bytes"])))
    if worst:
        line = f"# model accuracy from 1M: {_within(worst)}"
        if any(_median_if_mean(r) is not None for r in judged
               if int(r["bytes"]) >= ACCURACY_FROM):
            line += f"; against the median batch {_within(worst_median)}"
        lines.append(line)
    return "\n".join(lines)


def _median_if_mean(row: Mapping[str, Any]) -> float | None:
    """The row's median sample where its time is a mean of batches, else None."""
    if row.get("timing") != "batch" or not row.get("median_us"):
        return None
    return float(row["median_us"])


def _within(errors: list[tuple[float, str, int]]) -> str:
    """'k/n rows within 25%, worst E% (algorithm at size)' of (|error|, name, bytes)."""
    ok = sum(1 for e, _, _ in errors if e <= ACCURACY_WITHIN + ON_THE_LINE)
    e, name, size = max(errors)
    return (f"{ok}/{len(errors)} rows within {ACCURACY_WITHIN:.0%}, worst {e * 100:.0f}% "
            f"({name} at {format_size(size)})")
