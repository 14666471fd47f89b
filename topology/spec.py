"""Parsing topology declarations: layouts, spec files, `TOPOCOLL_TOPOLOGY` and presets.

Strings are parsed once, here, into a `Topology`; nothing downstream sees raw text.
Accepted forms (the same for `--layout`, the environment variable and files):

- `2,3` or `2+3`: consecutive ranks per node;
- `2x4` / `2x4:rails=2`: 2 nodes of 4 ranks, optionally with 2 rails;
- `hosts=a,a,b,b`: one hostname per rank;
- a path to a JSON file with `layout` or `node_of` (and optional `rails`, `hostnames`);
- a preset name (see `topology.presets`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .model import Topology
from .presets import PRESETS

ENV_VAR = "TOPOCOLL_TOPOLOGY"

_NODES_X_RANKS = re.compile(r"^(\d+)x(\d+)$")


class TopologySpecError(ValueError):
    """A topology declaration that cannot be understood; the message says which part."""


def parse_layout(text: str) -> tuple[int, ...]:
    """`2,3` / `2+3` / `2x4` -> ranks per node."""
    text = text.strip()
    match = _NODES_X_RANKS.match(text)
    if match:
        nodes, per = int(match[1]), int(match[2])
        if nodes < 1 or per < 1:
            raise TopologySpecError(f"layout {text!r}: nodes and ranks must be >= 1")
        return (per,) * nodes
    parts = [p for p in re.split(r"[,+]", text) if p.strip()]
    if not parts:
        raise TopologySpecError(f"empty layout {text!r}")
    try:
        layout = tuple(int(p) for p in parts)
    except ValueError as exc:
        raise TopologySpecError(
            f"layout {text!r}: expected ranks per node like '2,3' or '2x4'"
        ) from exc
    if any(n < 1 for n in layout):
        raise TopologySpecError(f"layout {text!r}: every node needs at least one rank")
    return layout


def parse_topology(text: str, world_size: int | None = None) -> Topology:
    """Parse any accepted form; check it matches `world_size` when given."""
    text = text.strip()
    try:
        topo = _parse(text)
    except TopologySpecError:
        raise
    except (TypeError, ValueError) as exc:
        raise TopologySpecError(f"topology {text!r}: {exc}") from exc
    if world_size is not None and topo.world_size != world_size:
        raise TopologySpecError(
            f"topology {text!r} declares {topo.world_size} ranks but the job has {world_size}"
        )
    return topo


def _parse(text: str) -> Topology:
    base, sep, options = text.partition(":rails=")
    rails = 1
    if sep:
        try:
            rails = int(options)
        except ValueError as exc:
            raise TopologySpecError(f"topology {text!r}: rails must be an integer") from exc
    if base in PRESETS:
        topo = PRESETS[base].topology()
    elif base.startswith("hosts="):
        hosts = [h.strip() for h in base[len("hosts="):].split(",") if h.strip()]
        topo = Topology.from_hosts(hosts, rails=rails)
    elif base.endswith(".json") or os.path.sep in base:
        topo = load_topology_file(Path(base))
    else:
        topo = Topology.from_layout(parse_layout(base), rails=rails)
    if sep and topo.rails != rails:
        topo = Topology(topo.node_of, rails, topo.hostnames, topo.intra_link, topo.inter_link)
    return topo


def load_topology_file(path: Path) -> Topology:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise TopologySpecError(f"topology file {path} does not exist") from exc
    except json.JSONDecodeError as exc:
        raise TopologySpecError(f"topology file {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise TopologySpecError(f"topology file {path}: expected a JSON object")
    try:
        return Topology.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise TopologySpecError(f"topology file {path}: {exc}") from exc


def topology_from_env(world_size: int | None = None) -> Topology | None:
    """The explicit override in `TOPOCOLL_TOPOLOGY`, or None when unset."""
    text = os.environ.get(ENV_VAR, "").strip()
    if not text:
        return None
    return parse_topology(text, world_size)
