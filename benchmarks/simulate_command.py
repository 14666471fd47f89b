"""`topocoll simulate`: every algorithm's predicted time and busbw at any scale."""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from collections.abc import Sequence

from topocoll.comm.simulator import SimRow, simulate, winners
from topocoll.topology import PRESETS, Topology, parse_topology
from topocoll.topology.profile import Profile, from_preset, load_profile

from .sizes import format_size, parse_sizes

DEFAULT_PRESET = "8x-nvlink-400g"


def _setup(args: argparse.Namespace) -> tuple[Profile, Topology]:
    if args.profile and args.preset:
        raise ValueError("give --profile or --preset, not both")
    if args.profile:
        profile = load_profile(args.profile)
        base = profile.topology
        if base is None and not args.layout:
            raise ValueError(f"profile {args.profile} has no topology: give --layout")
    else:
        name = args.preset or DEFAULT_PRESET
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        profile = from_preset(PRESETS[name])
        base = PRESETS[name].topology()
    if args.layout:
        return profile, parse_topology(args.layout)
    assert base is not None
    if args.nodes:
        if not base.is_uniform:
            raise ValueError("--nodes needs a uniform base topology; give --layout")
        return profile, Topology.from_layout([base.layout[0]] * args.nodes, rails=base.rails,
                                             intra_link=base.intra_link,
                                             inter_link=base.inter_link)
    return profile, base


def markdown(collective: str, topology: Topology, rows: Sequence[SimRow]) -> str:
    algos = list(dict.fromkeys(r.algorithm for r in rows))
    times: dict[tuple[int, str], float] = {(r.bytes, r.algorithm): r.predicted_us for r in rows}
    lines = [f"**{collective}**, {topology.describe()} ({rows[0].method} pricing), "
             "predicted time in us (best in bold), winner's margin over the runner-up:", "",
             "| size | " + " | ".join(algos) + " | best | margin |",
             "|---:|" + "---:|" * len(algos) + "---|---:|"]
    for size, best, t_best, _second, t_second in winners(rows):
        cells = []
        for a in algos:
            value = f"{times[size, a]:,.0f}" if times[size, a] >= 100 else \
                f"{times[size, a]:.1f}"
            cells.append(f"**{value}**" if a == best else value)
        margin = f"{t_second / t_best:.2f}x" if t_best > 0 else "-"
        lines.append(f"| {format_size(size)} | " + " | ".join(cells) + f" | {best} | {margin} |")
    return "\n".join(lines) + "\n"


def compare(topology: Topology, profile: Profile, paths: Sequence[str]) -> str:
    """Simulated vs measured for every forced row of this topology shape (>= 1 MiB judged)."""
    from .regret import ACCURACY_FROM
    from .tune_command import read_rows

    rows = [r for r in read_rows(list(paths))
            if (r.get("topology") or {}).get("fingerprint") == topology.fingerprint
            and r.get("algorithm") not in ("native", "tuned")]
    if not rows:
        return (f"# compare: no measured rows of this topology ({topology.fingerprint}) "
                f"in {', '.join(paths)}")
    lines = [f"# simulated vs measured ({topology.describe()})",
             f"{'collective':<14}{'size':>8}  {'algorithm':<22}{'measured(us)':>14}"
             f"{'simulated(us)':>15}{'error':>9}"]
    judged = []
    for r in sorted(rows, key=lambda r: (r["collective"], r["bytes"], r["algorithm"])):
        size = int(r["bytes"])
        itemsize = max(size // max(int(r.get("count") or 1), 1), 1)
        simulated = simulate(topology, profile, r["collective"], [size], [r["algorithm"]],
                             itemsize)[0].predicted_us
        err = simulated / float(r["time_us"]) - 1
        lines.append(f"{r['collective']:<14}{format_size(size):>8}  {r['algorithm']:<22}"
                     f"{r['time_us']:>14.1f}{simulated:>15.1f}{err * 100:>+8.1f}%")
        if size >= ACCURACY_FROM:
            judged.append(abs(err))
    if judged:
        within = sum(1 for e in judged if e <= 0.25)
        lines.append(f"# from 1M: {within}/{len(judged)} rows within 25% "
                     f"(median error {sorted(judged)[len(judged) // 2] * 100:.0f}%, "
                     f"worst {max(judged) * 100:.0f}%)")
    return "\n".join(lines)


def run_simulate_command(args: argparse.Namespace) -> int:
    profile, topology = _setup(args)
    if args.compare:
        print(compare(topology, profile, args.compare))
        return 0
    sizes = parse_sizes(args.sizes)
    collectives = [c.strip() for c in args.collective.split(",") if c.strip()]
    started = time.perf_counter()
    all_rows: dict[str, list[SimRow]] = defaultdict(list)
    for collective in collectives:
        all_rows[collective] = simulate(topology, profile, collective, sizes)
    elapsed = time.perf_counter() - started
    text = "\n".join(markdown(c, topology, rows) for c, rows in all_rows.items())
    print(f"# topocoll simulate: {topology.describe()}, figures from {profile.source}")
    print(text)
    print(f"# priced {sum(len(r) for r in all_rows.values())} (algorithm, size) points in "
          f"{elapsed:.1f} s")
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(f"Simulated with `topocoll simulate`: {topology.describe()}, figures "
                     f"from {profile.source}.\n\n{text}")
    if args.json:
        with open(args.json, "w") as fh:
            for rows in all_rows.values():
                for r in rows:
                    fh.write(json.dumps({**r.__dict__, "world_size": topology.world_size,
                                         "topology": {**topology.to_dict(),
                                                      "fingerprint": topology.fingerprint},
                                         "profile": profile.source}, sort_keys=True) + "\n")
    return 0
