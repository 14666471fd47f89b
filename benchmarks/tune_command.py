"""`topocoll tune`: the decision table from a profile, measurements, or both.

`--measure SIZES` runs `topocoll bench` (local launcher) over the model's top candidates
at those sizes and feeds the rows back in; on the emulated cluster run the benchmark
through `topocoll cluster run` yourself and pass its JSON with `--results`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from topocoll.comm.selection import env_override
from topocoll.comm.tuner import TUNABLE, build_table, format_table, rank_candidates
from topocoll.comm.tuning import load_tuning
from topocoll.topology import PRESETS, Topology, parse_topology
from topocoll.topology.profile import Profile, from_preset, load_profile

from .sizes import format_size, parse_sizes


def read_rows(paths: list[str]) -> list[dict[str, Any]]:
    """Benchmark JSON lines; a bad line is an error naming the file and line."""
    rows = []
    for path in paths:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as exc:
            raise ValueError(f"results {path}: cannot read: {exc.strerror or exc}") from None
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"results {path}:{number}: not JSON: {exc.msg}") from None
            if not isinstance(row, dict) or "collective" not in row or "time_us" not in row:
                raise ValueError(f"results {path}:{number}: not a benchmark row "
                                 "(needs 'collective' and 'time_us')")
            rows.append(row)
    return rows


def _profile(args: argparse.Namespace) -> Profile | None:
    if args.profile and args.preset:
        raise ValueError("give --profile or --preset, not both")
    if args.profile:
        return load_profile(args.profile)
    if args.preset:
        if args.preset not in PRESETS:
            raise ValueError(f"unknown preset {args.preset!r}; known: {', '.join(PRESETS)}")
        return from_preset(PRESETS[args.preset])
    return None


def _topology(args: argparse.Namespace, profile: Profile | None) -> Topology:
    if args.layout:
        return parse_topology(args.layout)
    if profile is not None and profile.topology is not None:
        return profile.topology
    raise ValueError("no topology: give --layout, or a --profile/--preset that has one")


def _collectives(text: str) -> list[str]:
    names = list(TUNABLE) if text == "all" else [c.strip() for c in text.split(",") if c]
    for name in names:
        if name not in TUNABLE:
            raise ValueError(f"cannot tune {name!r}; tunable: {', '.join(TUNABLE)}")
    return names


def run_tune_command(args: argparse.Namespace) -> int:
    if args.show:
        table = load_tuning(args.show)
        print(format_table(table))
        for name in table.collectives:
            forced = env_override(name)
            if forced:
                print(f"# note: TOPOCOLL_ALGO_{name.upper()}={forced} overrides this table")
        return 0
    if not args.out:
        raise ValueError("give --out FILE (or --show FILE)")
    profile = _profile(args)
    topology = _topology(args, profile)
    transport = args.transport or (profile.transport if profile else "") or "gloo"
    intra = (profile.intra if profile else "") or "shm"
    collectives = _collectives(args.collective)
    rows = read_rows(args.results)
    if args.measure and not args.model_only:
        if profile is None:
            raise ValueError("--measure needs a --profile or --preset to pick candidates")
        rows += measure(args, topology, transport, profile, collectives)
    table = build_table(topology, transport, intra, profile, collectives, rows)
    table.save(args.out)
    print(format_table(table))
    print(f"# tuning table written to {args.out}")
    return 0


def measure(args: argparse.Namespace, topology: Topology, transport: str, profile: Profile,
            collectives: list[str]) -> list[dict[str, Any]]:
    """Benchmark the model's top candidates with the local launcher."""
    sizes = parse_sizes(args.measure)
    layout = args.layout or ",".join(str(n) for n in topology.layout)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="topocoll-tune-") as tmp:
        for collective in collectives:
            picks: list[str] = []
            for s in sizes:
                for algo, _ in rank_candidates(collective, s, topology, profile)[:args.top]:
                    if algo not in picks:
                        picks.append(algo)
            out = os.path.join(tmp, f"{collective}.jsonl")
            print(f"# measuring {collective}: {', '.join(picks)} at "
                  f"{', '.join(format_size(s) for s in sizes)}", flush=True)
            cmd = [sys.executable, "-m", "topocoll", "bench", "--launcher", "local",
                   "--layout", layout, "--transport", transport, "--collective", collective,
                   "--algorithm", ",".join(picks), "--sizes", args.measure, "--json", out]
            done = subprocess.run(cmd, check=False)
            if done.returncode != 0:
                raise ValueError(f"measuring {collective} failed (exit {done.returncode})")
            rows += read_rows([out])
    return rows
