"""The report's figures, drawn with matplotlib's object API (no pyplot, no global backend).

Each builder takes analysed data and returns a Figure, or None when its input is missing
(the page then says why). Sizes are on a log2 axis labelled 1K, 64K, 1M; colours are fixed
per algorithm name so one algorithm looks the same in every figure. Every string that comes
from an input file is passed through `_text` first, because matplotlib would otherwise
read `$...$` in an algorithm name as math.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from topocoll.extras import require
from topocoll.reports.analysis import BASELINE, TUNED, Analysis, Group
from topocoll.reports.inputs import LinkFit, Profile, Topology
from topocoll.reports.units import size_label, time_label

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

KNOWN_COLORS = {
    "ring": "#1f77b4", "recursive_doubling": "#ff7f0e", "rabenseifner": "#2ca02c",
    "tree": "#9467bd", "hierarchical": "#d62728", "hierarchical_leader": "#8c564b",
    "pairwise": "#1f77b4", "bruck": "#ff7f0e", "hierarchical_2d": "#d62728",
    "direct": "#2ca02c", BASELINE: "#000000", TUNED: "#e377c2",
}
_SPARE = ("#17becf", "#bcbd22", "#7f7f7f", "#aec7e8", "#ffbb78", "#98df8a", "#c5b0d5",
          "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5")
RAIL_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#17becf")
DPI = 110
MAX_NODES_DRAWN = 8


@dataclass(frozen=True)
class FigureFile:
    """A figure written beside the page, as PNG (embedded) and SVG (linked)."""

    key: str
    title: str
    caption: str
    png: Path
    svg: Path


def figure_key(kind: str, group: Group) -> str:
    """The key the page looks a group's figure up by (whole fingerprint: no collisions)."""
    k = group.key
    return f"{kind}:{k.collective}|{k.transport}|{k.fingerprint}"


def color(algorithm: str) -> str:
    if algorithm in KNOWN_COLORS:
        return KNOWN_COLORS[algorithm]
    digest = hashlib.sha1(algorithm.encode("utf-8", "replace")).digest()
    return _SPARE[digest[0] % len(_SPARE)]


def _text(value: str, limit: int = 48) -> str:
    """An input string made safe for matplotlib text: no mathtext, bounded length."""
    value = value if len(value) <= limit else value[: limit - 3] + "..."
    return value.replace("\\", "\\\\").replace("$", r"\$")


# ----- axes helpers -----------------------------------------------------------------------
def _new_figure(width: float, height: float) -> Figure:
    figure_cls = require("matplotlib.figure", "topocoll report").Figure
    return figure_cls(figsize=(width, height), dpi=DPI, layout="constrained")


def _size_axis(ax: Axes, lo: float, hi: float) -> None:
    """Log2 byte axis from lo to hi with at most ~9 ticks labelled 1K, 64K, 1M."""
    ticker = require("matplotlib.ticker")
    lo, hi = max(lo, 1.0), max(hi, 2.0)
    e_lo, e_hi = math.floor(math.log2(lo)), math.ceil(math.log2(hi))
    step = max(1, math.ceil((e_hi - e_lo) / 8))
    ticks = [2.0 ** e for e in range(e_lo, e_hi + 1) if e % step == 0]
    ax.set_xscale("log", base=2)
    ax.set_xlim(lo, hi)
    ax.xaxis.set_major_locator(ticker.FixedLocator(ticks))
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: size_label(x)))
    ax.set_xlabel("message size per rank (bytes, log scale)")


def _log_y(ax: Axes, fmt: Callable[[float], str]) -> None:
    """Log y with ticks at 1, 2, 5 per decade; call after plotting (it widens a range
    narrower than 4x so that at least two ticks are labelled)."""
    ticker = require("matplotlib.ticker")
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()  # autoscaled for log now
    if lo > 0 and hi / lo < 4:
        mid = math.sqrt(lo * hi)
        ax.set_ylim(mid / 2, mid * 2)
    ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: fmt(y)))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def _size_span(sizes: Sequence[int]) -> tuple[float, float]:
    return min(sizes) / 1.6, max(sizes) * 1.6


def _group_title(group: Group, what: str) -> str:
    k = group.key
    return (f"{_text(k.collective)}: {what}\n{_text(k.transport)} transport, "
            f"{_text(group.topology.describe())}, topology {_text(k.fingerprint, 16)}")


def _legend(ax: Axes) -> None:
    ax.legend(fontsize=8, loc="best", framealpha=0.85)


# ----- the figures ------------------------------------------------------------------------
def busbw_figure(group: Group) -> Figure:
    """Bus bandwidth per algorithm and baseline, with the physical bound of each size."""
    fig = _new_figure(7.5, 4.6)
    ax = fig.add_subplot()
    for algorithm in [*group.ours, TUNED, BASELINE]:
        rows = group.series(algorithm)
        if not rows:
            continue
        style = {BASELINE: dict(ls="--", marker="s", lw=2.2), TUNED: dict(marker="*", lw=2.6,
                                                                         ms=10)}
        label = {BASELINE: f"{_text(group.key.transport)} native (baseline)",
                 TUNED: "tuned (topocoll's pick)"}.get(algorithm, _text(algorithm))
        ax.plot([r.bytes for r in rows], [r.busbw_gbs for r in rows], label=label,
                color=color(algorithm), **style.get(algorithm, dict(marker="o", lw=1.4)))
    bound = sorted({(r.bytes, r.busbw_gbs * r.time_us / r.bound_us)
                    for by_size in group.rows.values() for r in by_size.values()
                    if r.bound_us and r.busbw_gbs > 0})
    if bound:
        ax.plot([b[0] for b in bound], [b[1] for b in bound], color="#555555", ls=":",
                lw=2, marker="_", ms=14, label="physical bound (link budget)")
    _size_axis(ax, *_size_span(group.sizes))
    _log_y(ax, lambda y: f"{y:g}")
    ax.set_ylabel("bus bandwidth (GB/s, log scale)")
    ax.grid(True, which="major", alpha=0.3)
    ax.set_title(_group_title(group, "bus bandwidth vs. message size"), fontsize=10)
    _legend(ax)
    return fig


def choice_figure(group: Group) -> Figure | None:
    """The tuner's pick as coloured bands over the size axis, predicted vs. measured cost
    above, regret per size below. None when there is no tuning table and no tuned row."""
    choices = group.choices()
    if not choices or not group.sizes:
        return None
    fig = _new_figure(7.5, 6.0)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    lo, hi = _size_span(group.sizes)
    seen: set[str] = set()
    for choice in choices:
        left, right = max(choice.lo, lo), min(choice.hi or hi, hi)
        if right <= left:
            continue
        for ax in (top, bottom):
            ax.axvspan(left, right, color=color(choice.algorithm), alpha=0.16, lw=0,
                       label=None if ax is bottom or choice.algorithm in seen
                       else f"pick: {_text(choice.algorithm)}")
        seen.add(choice.algorithm)
    sizes = group.sizes
    decision = group.decision

    def predicted(n: int) -> float | None:
        """The model's price of the pick: the tuned row's own, else the table range's."""
        row = group.rows.get(TUNED, {}).get(n)
        if row is not None and row.predicted_us is not None:
            return row.predicted_us
        r = decision.at(n) if decision else None
        cand = r.candidates.get(r.algorithm) if r else None
        return cand.predicted_us if cand else None

    def forced_pick(n: int) -> float | None:
        r = decision.at(n) if decision else None
        return group.time(r.algorithm, n) if r else None

    _plot_points(top, sizes, predicted, "predicted cost of the pick (model)", "#444444",
                 dict(ls="--", marker="D"))
    if group.has_tuned:
        _plot_points(top, sizes, lambda n: group.time(TUNED, n), "measured: tuned backend",
                     color(TUNED), dict(marker="*", ms=11, lw=2.2))
    else:
        _plot_points(top, sizes, forced_pick, "measured: the pick, forced", color(TUNED),
                     dict(marker="*", ms=11, lw=2.2))
    _plot_points(top, sizes, lambda n: (b[1] if (b := group.best_ours(n)) else None),
                 "measured: best of our forced algorithms", "#2ca02c",
                 dict(marker="o", ls=":"))
    _log_y(top, time_label)
    top.set_ylabel("time per call (log scale)")
    top.grid(True, alpha=0.3)
    top.set_title(_group_title(group, "the tuner's choice per size"), fontsize=10)
    _legend(top)
    has_regret = False
    for fn, label, c in ((group.tuned_regret, "regret of tuned (measured)", "#e377c2"),
                         (group.model_regret, "regret of the table's pick", "#444444")):
        points = [(n, v * 100) for n in sizes if (v := fn(n)) is not None]
        if points:
            has_regret = True
            bottom.plot(*zip(*points), marker="o", color=c, label=label)
    bottom.axhline(0, color="black", lw=0.8)
    bottom.set_ylabel("regret (% slower than\nthe measured best)")
    bottom.grid(True, alpha=0.3)
    if has_regret:
        _legend(bottom)
    else:
        bottom.text(0.5, 0.5, "no forced measurements at the tuned sizes: regret unknown",
                    transform=bottom.transAxes, ha="center", va="center", fontsize=9)
    _size_axis(bottom, lo, hi)
    top.set_xlabel("")
    return fig


def _plot_points(ax: Axes, sizes: Sequence[int], value: Callable[[int], float | None],
                 label: str, c: str, style: dict) -> None:
    points = [(n, v) for n in sizes if (v := value(n)) is not None]
    if points:
        ax.plot(*zip(*points), color=c, label=label, **style)


def speedup_figure(collective: str, groups: Sequence[Group]) -> Figure | None:
    """Speedup of the tuned backend (else our best) over each baseline, per size."""
    lines = [(g, [(n, s) for n in g.sizes if (s := g.speedup(n)) is not None])
             for g in groups]
    lines = [(g, pts) for g, pts in lines if pts]
    if not lines:
        return None
    fig = _new_figure(7.5, 4.6)
    ax = fig.add_subplot()
    sizes: list[int] = []
    for i, (g, pts) in enumerate(lines):
        sizes += [p[0] for p in pts]
        label = (f"{g.contender} vs {_text(g.key.transport)} native, "
                 f"{_text(g.topology.describe())}")
        ax.plot(*zip(*pts), marker="os^Dv<>"[i % 7], lw=1.8, label=label,
                color=RAIL_COLORS[i % len(RAIL_COLORS)] if i < len(RAIL_COLORS)
                else _SPARE[i % len(_SPARE)])
    ax.axhline(1.0, color="black", lw=1, ls="--", label="parity with the baseline")
    _size_axis(ax, *_size_span(sizes))
    ticker = require("matplotlib.ticker")
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}x"))
    ax.set_ylim(bottom=0)
    ax.set_ylabel("speedup over the library's native\ncollective (x; > 1 = faster)")
    ax.grid(True, alpha=0.3)
    ax.set_title(f"{_text(collective)}: speedup over each native baseline", fontsize=10)
    _legend(ax)
    return fig


def topology_figure(topology: Topology, profiles: Sequence[Profile]) -> Figure:
    """Nodes, ranks, rails and link classes, with the measured alpha/beta when profiled."""
    patches = require("matplotlib.patches")
    nodes = sorted(set(topology.node_of))
    shown = nodes[:MAX_NODES_DRAWN]
    widths = [0.5 + 0.45 * topology.node_of.count(n) for n in shown]
    total = sum(widths) + 0.4 * (len(shown) - 1)
    rails = topology.rails
    legend = _link_lines(topology, profiles)
    rail_y = [-0.5 - 0.55 * j for j in range(rails)]
    x_lo, x_hi = -0.5, max(total + (3.0 if profiles else 1.9), 7.0)
    y_lo, y_hi = rail_y[-1] - 0.5 - 0.3 * len(legend), 1.95
    scale = min(0.95, 14.0 / (x_hi - x_lo))  # inches per data unit, equal in x and y
    fig = _new_figure((x_hi - x_lo) * scale, (y_hi - y_lo) * scale + 0.6)
    ax = fig.add_subplot()
    ax.set_axis_off()
    for j, y in enumerate(rail_y):
        ax.plot([-0.2, total + 0.2], [y, y], color=RAIL_COLORS[j % 6], lw=5,
                solid_capstyle="round")
        fit = _fit(profiles, f"inter/{j}") or _fit(profiles, "inter")
        ax.text(total + 0.35, y, f"rail {j} switch" + (f"\n{_short_fit(fit)}" if fit else ""),
                va="center", fontsize=8)
    x = 0.0
    for node, width in zip(shown, widths):
        ranks = [r for r, n in enumerate(topology.node_of) if n == node]
        ax.add_patch(patches.FancyBboxPatch((x, 0.3), width, 1.2,
                                            boxstyle="round,pad=0.03", fc="#f2f2f2",
                                            ec="#333333"))
        ax.text(x + width / 2, 1.62, f"node {node}", ha="center", fontsize=9,
                fontweight="bold")
        for local, rank in enumerate(ranks):
            cx = x + 0.45 + 0.45 * local
            ax.add_patch(patches.Circle((cx, 1.05), 0.17, fc=RAIL_COLORS[local % rails % 6],
                                        ec="black", alpha=0.85))
            ax.text(cx, 1.05, str(rank), ha="center", va="center", fontsize=7,
                    color="white", fontweight="bold")
        for j, y in enumerate(rail_y):
            ux = x + width * (j + 1) / (rails + 1)
            ax.plot([ux, ux], [0.3, y], color=RAIL_COLORS[j % 6], lw=1.6)
        intra = _fit(profiles, "intra")
        ax.text(x + width / 2, 0.5, f"intra: {_text(topology.intra_link or 'local', 12)}"
                + (f"\n{_short_fit(intra)}" if intra else ""), ha="center", va="center",
                fontsize=7, color="#333333")
        x += width + 0.4
    if len(nodes) > len(shown):
        ax.text(total + 0.1, 0.9, f"... {len(nodes) - len(shown)} more nodes", fontsize=8)
    ax.text(x_lo + 0.1, rail_y[-1] - 0.4, "\n".join(legend), fontsize=8, va="top",
            family="monospace")
    ax.set_xlim(x_lo, x_hi)
    ax.set_ylim(y_lo, y_hi)
    rail_note = f"rank colour = its rail (local rank mod {rails}); " if rails > 1 else ""
    ax.set_title(f"topology {_text(topology.fingerprint, 20)}: {_text(topology.describe())}\n"
                 f"{rail_note}inter-node link: {_text(topology.inter_link or '?', 12)}",
                 fontsize=10)
    return fig


def _fit(profiles: Sequence[Profile], name: str) -> LinkFit | None:
    return next((p.links[name] for p in profiles if name in p.links), None)


def _short_fit(link: LinkFit) -> str:
    bw = link.bandwidth_gbs
    return f"alpha {link.alpha_us:.3g} us, {'-' if bw is None else f'{bw:.3g}'} GB/s"


def _link_lines(topology: Topology, profiles: Sequence[Profile]) -> list[str]:
    if not profiles:
        return ["link classes not profiled (no topocoll.profile input): no measured "
                "alpha/beta"]
    lines = []
    for profile in profiles:
        lines.append(f"link classes measured by {_text(Path(profile.source).name, 32)} "
                     f"({_text(profile.transport, 12)} transport):")
        lines += [_link_line(link) for link in profile.links.values()]
    return lines


def _link_line(link: LinkFit) -> str:
    bw = link.bandwidth_gbs
    bw_text = "-" if bw is None else f"{bw:.3g} GB/s"
    r2 = "" if link.r2 is None else f", r2 {link.r2:.3f}"
    return (f"  {_text(link.name, 12):<10} alpha {link.alpha_us:9.3g} us   "
            f"beta {link.beta_us_per_byte:.3g} us/B (1/beta = {bw_text}){r2}")


# ----- writing ----------------------------------------------------------------------------
def save(fig: Figure, directory: Path, stem: str) -> tuple[Path, Path]:
    """Write PNG and SVG without timestamps, so a re-run gives the same files."""
    matplotlib = require("matplotlib", "topocoll report")
    directory.mkdir(parents=True, exist_ok=True)
    png, svg = directory / f"{stem}.png", directory / f"{stem}.svg"
    with matplotlib.rc_context({"svg.hashsalt": "topocoll", "svg.fonttype": "none"}):
        fig.savefig(png, format="png", metadata={"Software": None})
        fig.savefig(svg, format="svg", metadata={"Date": None})
    return png, svg


def render_all(analysis: Analysis, directory: Path) -> tuple[list[FigureFile], list[str]]:
    """Every figure the inputs allow, and one note per figure that had to be skipped."""
    files: list[FigureFile] = []
    notes: list[str] = []
    used: set[str] = set()

    def emit(key: str, fig: Figure, stem: str, title: str, caption: str) -> None:
        stem = _unique(_slug(stem), used)
        png, svg = save(fig, directory, stem)
        files.append(FigureFile(key, title, caption, png, svg))

    no_choice: list[str] = []
    for collective, groups in analysis.by_collective().items():
        fig = speedup_figure(collective, groups)
        if fig is None:
            notes.append(f"{collective}: no speedup figure (no size has both a native baseline "
                         f"and one of our algorithms).")
        else:
            emit(f"speedup:{collective}", fig, f"speedup-{collective}",
                 f"{collective}: speedup over the native baselines",
                 "time(native) / time(contender) per size; the contender is the tuned "
                 "backend where tuned rows exist, else the best of our forced algorithms "
                 "at that size.")
        for g in groups:
            k = g.key
            stem = f"{k.collective}-{k.transport}-{k.fingerprint[:8]}"
            label = f"{k.collective}, {k.transport}, {g.topology.describe()}"
            emit(figure_key("busbw", g), busbw_figure(g), f"busbw-{stem}",
                 f"bus bandwidth: {label}",
                 "nccl-tests bus bandwidth per algorithm; dotted: the physical bound of the "
                 "link budget at that size (not drawn where the bound is 0 or unknown).")
            fig = choice_figure(g)
            if fig is None:
                no_choice.append(label)
            else:
                emit(figure_key("choice", g), fig, f"choice-{stem}", f"tuner's choice: {label}",
                     "Bands: the algorithm the tuner picks per size range. Regret = "
                     "time(pick) / time(best forced algorithm of ours) - 1.")
    if no_choice:
        which = ("any group" if len(no_choice) == len(analysis.groups)
                 else "; ".join(no_choice))
        notes.append(f"No tuner-choice or regret figure for {which}: no tuning table "
                     f"(topocoll.tuning) for its topology and transport, and no `tuned` rows.")
    unprofiled: list[str] = []
    for fingerprint, topology in analysis.topologies.items():
        profiles = [p for p in analysis.profiles if p.fingerprint == fingerprint]
        emit(f"topology:{fingerprint}", topology_figure(topology, profiles),
             f"topology-{fingerprint[:12]}", f"topology {fingerprint}",
             "Nodes, ranks (numbered globally, coloured by rail) and rails; the link classes "
             "with their measured alpha (latency) and beta (time per byte).")
        if not profiles:
            unprofiled.append(fingerprint)
    if unprofiled:
        notes.append(f"No profile (topocoll.profile) for topology {', '.join(unprofiled)}: "
                     f"its diagram has no measured alpha/beta per link class.")
    return files, notes


def _slug(text: str) -> str:
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "_" for c in text)
    return safe.strip("._")[:80] or "figure"


def _unique(stem: str, used: set[str]) -> str:
    candidate, i = stem, 2
    while candidate.lower() in used:
        candidate, i = f"{stem}-{i}", i + 1
    used.add(candidate.lower())
    return candidate
