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


def run_simulate_command(args: argparse.Namespace) -> int:
    profile, topology = _setup(args)
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
