"""The simulator: every algorithm's predicted time at scales we cannot run.

It prices the same schedules the executor runs (`cost_model.price`). One schedule per
(algorithm, inner parameters) is built at the largest size that uses those parameters
and priced for the whole size sweep at once (every byte count scales with the size).

Schedules of flat algorithms grow as p^2 steps (a 1024-rank ring is 5 million steps,
half a minute to build in Python), so beyond `EXACT_MAX_RANKS` a uniform topology is
priced exactly at 2, 4, 8 and 16 nodes of the same shape and extrapolated per size on
the basis {1, N, log2 N, 1/N}: the alpha-beta costs of all our algorithms (ring
2(p-1)a + 2(p-1)/p nb, recursive doubling log p (a + nb), Rabenseifner, Bruck, pairwise,
the hierarchical forms over N nodes) are combinations of exactly these terms, so the
extrapolation is exact where the model is, and approximate only where link-sharing
maxima switch between terms. `tests/test_simulator.py` checks it against exact pricing.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from topocoll.topology import Topology
from topocoll.topology.profile import Profile

from .algorithms import algorithm_names, build_schedule
from .cost_model import price
from .selection import default_params
from .tuner import ITEMSIZE, spec_for

EXACT_MAX_RANKS = 128
EXTRAPOLATION_NODES = (2, 4, 8, 16)


@dataclass(frozen=True)
class SimRow:
    collective: str
    algorithm: str
    bytes: int
    predicted_us: float
    busbw_gbs: float
    method: str  # "exact" or "extrapolated"


def bus_factor(collective: str, world_size: int) -> float:
    """nccl-tests' factors, so simulated busbw compares with measured busbw."""
    p = world_size
    if p <= 1:
        return 0.0
    return 2.0 * (p - 1) / p if collective == "all_reduce" else (p - 1) / p


def price_sweep(collective: str, algorithm: str, topology: Topology, profile: Profile,
                sizes: Sequence[int], itemsize: int = ITEMSIZE,
                params_for: Topology | None = None) -> np.ndarray:
    """Predicted us per size, one schedule per distinct inner-parameter set.

    `params_for`: choose the inner parameters as the communicator would on that (larger)
    topology, so that every size keeps the regime of the target when extrapolating.
    """
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, s in enumerate(sizes):
        params = _regime_params(collective, algorithm, s, topology, params_for or topology)
        groups[tuple(sorted(params.items()))].append(i)
    out = np.zeros(len(sizes))
    for key, members in groups.items():
        ref = max(sizes[i] for i in members)
        # Build at a size where every chunk is whole, then scale to each member.
        ref_bytes = max(ref, topology.world_size * topology.world_size * itemsize * 4)
        spec = spec_for(collective, ref_bytes, topology.world_size, itemsize)
        schedule = build_schedule(algorithm, topology, spec, **dict(key))
        scales = np.array([sizes[i] / ref_bytes for i in members])
        out[members] = price(schedule, profile, itemsize, scales)
    return out


def _regime_params(collective: str, algorithm: str, nbytes: int, topology: Topology,
                   target: Topology) -> dict[str, object]:
    params = default_params(collective, algorithm, nbytes, target)
    if params.get("window") == target.world_size - 1:  # "every peer at once"
        params["window"] = max(topology.world_size - 1, 1)
    return params


def _basis(nodes: float) -> list[float]:
    return [1.0, nodes, math.log2(nodes), 1.0 / nodes]


def simulate(topology: Topology, profile: Profile, collective: str, sizes: Sequence[int],
             algorithms: Sequence[str] | None = None, itemsize: int = ITEMSIZE
             ) -> list[SimRow]:
    names = list(algorithms or algorithm_names(collective))
    p = topology.world_size
    exact = p <= EXACT_MAX_RANKS or not topology.is_uniform
    rows = []
    for algo in names:
        if exact:
            times = price_sweep(collective, algo, topology, profile, sizes, itemsize)
            method = "exact"
        else:
            times, method = _extrapolate(collective, algo, topology, profile, sizes), \
                "extrapolated"
        factor = bus_factor(collective, p)
        for s, t in zip(sizes, times):
            busbw = s / t / 1e3 * factor if t > 0 else 0.0
            rows.append(SimRow(collective, algo, int(s), float(t), busbw, method))
    return rows


def _extrapolate(collective: str, algorithm: str, topology: Topology, profile: Profile,
                 sizes: Sequence[int]) -> np.ndarray:
    """Price at 2..16 nodes of the target's shape and extrapolate to its node count.

    The per-step CPU overhead and the wire time are combined by a max inside every phase,
    which no smooth basis follows across a regime switch (the overhead of thousands of
    messages grows as N, the wire time of a fixed vector does not). So the two are priced
    and extrapolated apart (overhead alone; everything but the overhead) and recombined
    as max(A, B) + lambda * min(A, B), with lambda measured at the largest priced size.
    """
    per_node = topology.layout[0]
    target = topology.num_nodes
    quiet = replace(profile, overhead_us=0.0)
    only_overhead = replace(profile, overhead_us=profile.overhead_us, reduce_us_per_byte=0.0,
                            copy_us_per_byte=0.0,
                            links={k: replace(v, alpha_us=0.0, beta_us_per_byte=0.0,
                                              shared_beta_us_per_byte=0.0)
                                   for k, v in profile.links.items()})
    full, wire, steps = [], [], []
    for n in EXTRAPOLATION_NODES:
        small = Topology.from_layout([per_node] * n, rails=topology.rails,
                                     intra_link=topology.intra_link,
                                     inter_link=topology.inter_link)
        for out, prof in ((full, profile), (wire, quiet), (steps, only_overhead)):
            if prof is only_overhead and profile.overhead_us == 0:
                out.append(np.zeros(len(sizes)))
                continue
            out.append(price_sweep(collective, algorithm, small, prof, sizes,
                                   params_for=topology))
    design = np.array([_basis(n) for n in EXTRAPOLATION_NODES])
    at_target = np.array(_basis(target))

    def fit(values: list[np.ndarray]) -> np.ndarray:
        coeffs, *_ = np.linalg.lstsq(design, np.vstack(values), rcond=None)
        # Cost never falls as nodes are added: guard the fit against a sign flip.
        return np.maximum(at_target @ coeffs, values[-1])

    a, b = fit(wire), fit(steps)
    lo, hi = np.minimum(wire[-1], steps[-1]), np.maximum(wire[-1], steps[-1])
    overlap = np.clip(np.divide(full[-1] - hi, lo, out=np.zeros_like(lo), where=lo > 0), 0, 1)
    return np.maximum(a, b) + overlap * np.minimum(a, b)


def winners(rows: Sequence[SimRow]) -> list[tuple[int, str, float, str, float]]:
    """Per size: (bytes, best algorithm, its time, runner-up, runner-up's time)."""
    by_size: dict[int, list[SimRow]] = defaultdict(list)
    for r in rows:
        by_size[r.bytes].append(r)
    out = []
    for size in sorted(by_size):
        ranked = sorted(by_size[size], key=lambda r: r.predicted_us)
        second = ranked[1] if len(ranked) > 1 else ranked[0]
        out.append((size, ranked[0].algorithm, ranked[0].predicted_us, second.algorithm,
                    second.predicted_us))
    return out
