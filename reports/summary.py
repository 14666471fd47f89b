"""The summary tables, as plain strings, for both the HTML page and the Markdown summary.

Kept apart from the renderers so the page and the Markdown say exactly the same thing;
each renderer escapes the strings for its own format.
"""

from __future__ import annotations

from dataclasses import dataclass

from topocoll.reports.analysis import BASELINE, TUNED, Analysis, Group
from topocoll.reports.units import (
    percent_label,
    range_label,
    ratio_label,
    size_label,
    sizes_label,
    time_label,
)


@dataclass(frozen=True)
class Table:
    headers: tuple[str, ...]
    rows: list[tuple[str, ...]]


def _where(g: Group) -> tuple[str, str, str]:
    return g.key.collective, g.key.transport, f"{g.topology.describe()} [{g.key.fingerprint}]"


def headline_table(analysis: Analysis) -> Table:
    """Per group: the contender against the native baseline at the largest common size."""
    rows = []
    for g in analysis.groups:
        head = g.headline()
        if head is None:
            continue
        n, speedup = head
        speeds = [s for m in g.sizes if (s := g.speedup(m)) is not None]
        rows.append((*_where(g), size_label(n), _contender_name(g, n),
                     time_label(g.contender_time(n)), time_label(g.time(BASELINE, n)),
                     ratio_label(speedup), _spread(speeds)))
    return Table(("collective", "transport", "topology", "size", "ours", "our time",
                  "native time", "speedup", "speedup over all sizes"), rows)


def _contender_name(g: Group, n: int) -> str:
    if g.has_tuned:
        row = g.rows[TUNED][n]
        return f"tuned (ran {row.chosen})"
    best = g.best_ours(n)
    return f"{best[0] if best else '?'} (best of ours)"


def _spread(values: list[float]) -> str:
    """`1.20x` for one value (or several that round alike), `0.72x .. 1.46x` otherwise."""
    if not values:
        return "-"
    lo, hi = ratio_label(min(values)), ratio_label(max(values))
    return lo if lo == hi else f"{lo} .. {hi}"


def best_table(analysis: Analysis) -> Table:
    """Per group: the best forced algorithm of ours over runs of measured sizes."""
    rows = []
    for g in analysis.groups:
        for lo, hi, algorithm in g.best_ranges():
            speeds = [s for n in g.sizes if lo <= n <= hi
                      and (s := _vs_native(g, algorithm, n)) is not None]
            rows.append((*_where(g), sizes_label(lo, hi), algorithm, _spread(speeds)))
    return Table(("collective", "transport", "topology", "measured sizes", "best of ours",
                  "vs native (x faster)"), rows)


def _vs_native(g: Group, algorithm: str, n: int) -> float | None:
    base, ours = g.time(BASELINE, n), g.time(algorithm, n)
    return base / ours if base and ours else None


def environment_table(analysis: Analysis) -> Table:
    rows = [(name, ", ".join(values)) for name, values in analysis.environment.items()]
    rows += [(f"topology {fp}", t.describe() + (f"; links intra {t.intra_link}, inter "
                                                f"{t.inter_link}" if t.inter_link else ""))
             for fp, t in analysis.topologies.items()]
    return Table(("environment", "value"), rows)


def tuning_table(g: Group) -> Table | None:
    """The decision table's ranges for a group, with each pick's predicted/measured cost."""
    decision = g.decision
    if decision is None:
        return None
    rows = []
    for r in decision.ranges:
        cand = r.candidates.get(r.algorithm)
        others = ", ".join(f"{name} {time_label(c.predicted_us)}"
                           for name, c in r.candidates.items() if name != r.algorithm)
        rows.append((range_label(r.lo, r.hi), r.algorithm, r.source,
                     time_label(cand.predicted_us if cand else None),
                     time_label(cand.measured_us if cand else None), others or "-"))
    return Table(("size range", "pick", "source", "predicted", "measured (tuning sweep)",
                  "other candidates (predicted)"), rows)


def times_table(g: Group) -> Table:
    """Every measured time of the group (the numbers behind its figures); * marks our best."""
    sizes = g.sizes
    rows = []
    for algorithm in [*g.ours, TUNED, BASELINE]:
        if algorithm not in g.rows:
            continue
        cells = []
        for n in sizes:
            t = g.time(algorithm, n)
            best = g.best_ours(n)
            mark = " *" if best and best[0] == algorithm else ""
            cells.append(time_label(t) + mark)
        rows.append((algorithm, *cells))
    return Table(("algorithm", *(size_label(n) for n in sizes)), rows)


def regret_table(g: Group) -> Table | None:
    rows = [(size_label(n), percent_label(g.tuned_regret(n)), percent_label(g.model_regret(n)))
            for n in g.sizes
            if g.tuned_regret(n) is not None or g.model_regret(n) is not None]
    if not rows:
        return None
    return Table(("size", "regret of tuned (measured)", "regret of the table's pick"), rows)


def link_table(analysis: Analysis) -> Table | None:
    rows = []
    for p in analysis.profiles:
        for link in p.links.values():
            bw = link.bandwidth_gbs
            rows.append((p.fingerprint, p.transport, link.name, f"{link.alpha_us:.3g}",
                         f"{link.beta_us_per_byte:.4g}", "-" if bw is None else f"{bw:.3g}",
                         "-" if link.r2 is None else f"{link.r2:.3f}",
                         "-" if link.flows is None else str(link.flows)))
    if not rows:
        return None
    return Table(("topology", "transport", "link class", "alpha (us)", "beta (us/byte)",
                  "1/beta (GB/s)", "r2", "flows"), rows)
