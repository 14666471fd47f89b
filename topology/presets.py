"""Named cluster shapes with nominal link figures, for simulation and tests.

The link figures are nominal (datasheet-level) alpha/bandwidth numbers, meant for
pricing algorithms at scales we cannot run; a measured profile always replaces them.
"""

from __future__ import annotations

from dataclasses import dataclass

from .model import Topology


@dataclass(frozen=True)
class LinkFigures:
    """Latency in microseconds and bandwidth in GB/s of one link class."""

    alpha_us: float
    bandwidth_gbs: float


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    nodes: int
    ranks_per_node: int
    rails: int
    intra: LinkFigures
    inter: LinkFigures  # per rail
    intra_link: str
    inter_link: str

    def topology(self, nodes: int | None = None) -> Topology:
        return Topology.from_layout(
            [self.ranks_per_node] * (nodes or self.nodes),
            rails=self.rails,
            intra_link=self.intra_link,
            inter_link=self.inter_link,
        )


_NVLINK = LinkFigures(alpha_us=3.0, bandwidth_gbs=300.0)
_IB400 = LinkFigures(alpha_us=5.0, bandwidth_gbs=50.0)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("8x-nvlink-400g", "8-GPU NVLink nodes, 8 x 400 Gb/s rails (H100-class)",
               nodes=2, ranks_per_node=8, rails=8, intra=_NVLINK, inter=_IB400,
               intra_link="nvlink", inter_link="rdma"),
        Preset("8x-nvlink-4-nodes", "4 nodes of 8 NVLink GPUs, 8 x 400 Gb/s rails",
               nodes=4, ranks_per_node=8, rails=8, intra=_NVLINK, inter=_IB400,
               intra_link="nvlink", inter_link="rdma"),
        Preset("emulated-2x4-1gbit", "our emulated cluster: 2 namespaces x 4 ranks, 1 Gbit/s tbf",
               nodes=2, ranks_per_node=4, rails=1,
               intra=LinkFigures(alpha_us=20.0, bandwidth_gbs=3.0),
               inter=LinkFigures(alpha_us=60.0, bandwidth_gbs=0.125),
               intra_link="shm", inter_link="tcp"),
    )
}
