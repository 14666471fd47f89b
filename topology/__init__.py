"""What the job looks like: ranks, nodes, rails and link classes."""

from .model import INTER, INTRA, SELF, Level, Topology
from .presets import PRESETS, LinkFigures, Preset
from .spec import (
    ENV_VAR,
    TopologySpecError,
    parse_layout,
    parse_topology,
    topology_from_env,
)

__all__ = [
    "ENV_VAR",
    "INTER",
    "INTRA",
    "PRESETS",
    "SELF",
    "Level",
    "LinkFigures",
    "Preset",
    "Topology",
    "TopologySpecError",
    "parse_layout",
    "parse_topology",
    "topology_from_env",
]
