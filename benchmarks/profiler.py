"""`topocoll profile`: measure alpha and beta per link class, and the CPU costs.

The probes are tiny schedules written directly in the IR and run by the same executor
and transports as every collective, so the figures include exactly the software path
the cost model will price (posting, polling, the shared-memory rings, Gloo/MPI/UCX):
- **ping-pong** per link class (`intra`: two ranks of node 0; `inter/k`: local rank k of
  node 0 and of node 1, for every rail k) over a size sweep -> alpha, beta (one flow);
- **duplex**: the same pair sending both ways at once -> `duplex_beta`;
- **concurrent**: every rank that uses the link class exchanges with its partner at
  once (both directions, all nodes) -> the slope per byte of the shared resource, divided
  by the flows that share it -> `shared_beta`;
- **fan-out**: k tiny messages per phase between a pair, k = 1..64 -> the executor's
  per-step overhead;
- **compute**: every rank reduces and copies a large vector at once -> gamma per byte
  under the same CPU contention the collectives see.
Rank 0 writes the profile JSON (`topology/profile.py`), raw samples included.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

import torch

from topocoll.comm.schedule import Phase, RankProgram, Recv, Region, Send
from topocoll.topology import Level, Topology, parse_topology
from topocoll.topology.profile import (
    LinkProfile,
    Machine,
    Profile,
    ProfileError,
    fit_alpha_beta,
    fit_with_burst,
)

from .launcher import launch_job
from .sizes import format_size, parse_sizes

TAG = 901
DEFAULT_SIZES = "1K:4M"
FANOUT = (1, 4, 16, 64)
# Up to 4 MiB a vector: in two full runs every rank copying 8 MiB at once ran 8x slower
# per byte than at 1-4 MiB in every round (6.5-10.7 ms), which no collective's copies
# showed; priced at that rate `node_leader` came out 28-51% slow.
COMPUTE_BYTES = (1 << 20, 2 << 20, 4 << 20)
COMPUTE_ROUNDS = 3
# A copy reads one operand and a reduce two: a copy this much slower means a stall.
COPY_OVER_REDUCE_SUSPECT = 2.0


@dataclass(frozen=True)
class ProfileOptions:
    sizes: tuple[int, ...]
    iters: int = 5
    warmup: int = 1


def _iters(nbytes: int, iters: int) -> int:
    return max(2, min(iters, int(iters * (1 << 20) / max(nbytes, 1)) or 2))


class Prober:
    """Runs probe programs on every rank and returns rank 0's view of the slowest time."""

    def __init__(self, job: Any) -> None:
        self.job = job
        self.comm = job.communicator
        self.topology: Topology = self.comm.topology
        self.rank = self.comm.rank

    def timed(self, programs: Callable[[int], list[Phase]], nbytes: int, iters: int,
              warmup: int, what: str) -> float:
        """Median over iterations of the slowest rank's time (us) for one probe."""
        phases = programs(self.rank)
        buffers = {"buf": torch.empty(max(nbytes, 1) * 2 + 64, dtype=torch.uint8)}
        buffers["buf"].random_(0, 255)
        program = RankProgram(self.rank, {"buf": buffers["buf"].numel()}, tuple(phases))
        samples = []
        for i in range(warmup + iters):
            self.comm.barrier()
            start = time.perf_counter()
            self.comm.executor.run(program, buffers, what)
            if i >= warmup:
                samples.append((time.perf_counter() - start) * 1e6)
        everyone = self.job.bootstrap.all_gather_json(samples)
        return statistics.median(max(r[i] for r in everyone) for i in range(len(samples)))

    # ----- probe programs ---------------------------------------------------------------
    def _level(self, a: int, b: int) -> Level:
        return self.topology.level(a, b)

    def pingpong(self, a: int, b: int, nbytes: int) -> Callable[[int], list[Phase]]:
        region = Region("buf", 0, nbytes)

        def programs(rank: int) -> list[Phase]:
            if rank == a:
                return [(Send(b, region, TAG, self._level(a, b)),),
                        (Recv(b, region, TAG, self._level(b, a)),)]
            if rank == b:
                return [(Recv(a, region, TAG, self._level(a, b)),),
                        (Send(a, region, TAG, self._level(b, a)),)]
            return []
        return programs

    def exchange(self, pairs: Sequence[tuple[int, int]], nbytes: int, messages: int = 1
                 ) -> Callable[[int], list[Phase]]:
        """Every pair swaps `messages` messages of `nbytes` each way in one phase."""
        partner = {a: b for a, b in pairs} | {b: a for a, b in pairs}

        def programs(rank: int) -> list[Phase]:
            if rank not in partner:
                return []
            peer = partner[rank]
            steps: list[Any] = []
            for k in range(messages):
                steps.append(Send(peer, Region("buf", k * nbytes, nbytes), TAG + k,
                                  self._level(rank, peer)))
            for k in range(messages):
                steps.append(Recv(peer, Region("buf", (messages + k) * nbytes, nbytes),
                                  TAG + k, self._level(peer, rank)))
            return [tuple(steps)]
        return programs


# ----- which ranks probe which link --------------------------------------------------------
def link_pairs(topology: Topology) -> dict[str, tuple[tuple[int, int], list[tuple[int, int]]]]:
    """link class -> (the ping-pong pair, every pair of the concurrent probe)."""
    out: dict[str, tuple[tuple[int, int], list[tuple[int, int]]]] = {}
    intra_pairs = [(ranks[i], ranks[i + 1]) for ranks in topology.nodes
                   for i in range(0, len(ranks) - 1, 2)]
    if intra_pairs:
        out["intra"] = (intra_pairs[0], intra_pairs)
    if topology.num_nodes >= 2:
        first, second = topology.nodes[0], topology.nodes[1]
        for rail in range(topology.rails):
            pairs = [(first[i], second[i]) for i in range(min(len(first), len(second)))
                     if i % topology.rails == rail]
            if pairs:
                out[f"inter/{rail}"] = (pairs[0], pairs)
    return out


def run_profile(job: Any, opts: ProfileOptions, out: TextIO = sys.stdout) -> Profile:
    prober = Prober(job)
    topology = prober.topology
    lead = prober.rank == 0
    samples: list[dict[str, Any]] = []
    links: dict[str, LinkProfile] = {}

    def say(text: str) -> None:
        if lead:
            out.write(text + "\n")
            out.flush()

    say(f"# topocoll profile: {topology.describe()}, transport {job.transport} "
        f"(intra {job.intra})")
    say(f"{'link':<9}{'mode':<12}{'size':>8}{'time(us)':>14}{'GB/s':>10}")
    for link, (pair, pairs) in link_pairs(topology).items():
        ping, duplex, conc = [], [], []
        for nbytes in opts.sizes:
            iters = _iters(nbytes, opts.iters)
            t = prober.timed(prober.pingpong(*pair, nbytes), nbytes, iters, opts.warmup,
                             f"profile {link} ping-pong") / 2
            ping.append((nbytes, t))
            t_d = prober.timed(prober.exchange([pair], nbytes), nbytes, iters, opts.warmup,
                               f"profile {link} duplex")
            duplex.append((nbytes, t_d))
            t_c = prober.timed(prober.exchange(pairs, nbytes), nbytes, iters, opts.warmup,
                               f"profile {link} concurrent")
            conc.append((nbytes, t_c))
            for mode, value, flows in (("pingpong", t, 1), ("duplex", t_d, 1),
                                       ("concurrent", t_c, len(pairs))):
                samples.append({"link": link, "mode": mode, "bytes": nbytes, "pairs": flows,
                                "time_us": round(value, 3)})
                say(f"{link:<9}{mode:<12}{format_size(nbytes):>8}{value:>14.1f}"
                    f"{nbytes / value / 1e3 if value else 0:>10.3f}")
        links[link] = _link_figures(link, topology, ping, duplex, conc, pairs)
    overhead = _overhead(prober, opts, samples)
    reduce_cost, copy_cost = _compute(prober, samples)
    profile = Profile(
        links=links, reduce_us_per_byte=reduce_cost, copy_us_per_byte=copy_cost,
        overhead_us=overhead, topology=topology, transport=job.transport, intra=job.intra,
        versions=job.versions(), samples=tuple(samples),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), source="measured",
        machines=machines_of_job(job.bootstrap))
    for name, fig in sorted(links.items()):
        say(f"# {name}: alpha {fig.alpha_us:.1f} us ({fig.alpha_with(fig.flows):.1f} us under "
            f"{fig.flows} flows), {fig.bandwidth_gbs:.3f} GB/s one flow "
            f"({1e-3 / fig.duplex_beta:.3f} each way when a pair swaps), "
            f"{1e-3 / fig.shared_beta_us_per_byte:.3f} GB/s aggregate under {fig.flows} "
            f"flows, fit r2 {fig.r2:.3f}"
            + (f", {fig.burst_bytes / 1024:.0f} KiB pass at once after a rest (a shaper's "
               "burst)" if fig.burst_bytes else ""))
    say(f"# per-step overhead {overhead:.1f} us, reduce {1e-3 / reduce_cost:.2f} GB/s, "
        f"copy {1e-3 / copy_cost:.2f} GB/s")
    if copy_cost > COPY_OVER_REDUCE_SUSPECT * reduce_cost:
        say(f"# warning: a copy measured {copy_cost / reduce_cost:.1f}x slower per byte than a "
            "reduce, which reads twice as much: the machine was likely busy during the "
            "compute probe; profile again on a quiet machine")
    for machine in profile.machines:
        say(f"# machine: ranks {list(machine.ranks)} share {machine.cores} core(s)")
    return profile


def machines_of_job(bootstrap: Any) -> tuple[Machine, ...]:
    """Which ranks share a machine (same kernel boot id: network namespaces and
    containers of one host do) and how many cores they may use together (the union of
    their CPU affinity sets). A collective step: every rank calls it."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = f"pid-{os.getpid()}"  # unknown: a machine of its own
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    everyone = bootstrap.all_gather_json({"boot": boot, "cpus": cpus or [-1 - bootstrap.rank]})
    groups: dict[str, tuple[list[int], set[int]]] = {}
    for rank, entry in enumerate(everyone):
        ranks, cores = groups.setdefault(entry["boot"], ([], set()))
        ranks.append(rank)
        cores.update(entry["cpus"])
    return tuple(Machine(tuple(ranks), len(cores)) for ranks, cores in groups.values())


def _link_figures(link: str, topology: Topology, ping: list[tuple[int, float]],
                  duplex: list[tuple[int, float]], conc: list[tuple[int, float]],
                  pairs: list[tuple[int, int]]) -> LinkProfile:
    # Only a network link can sit behind a rate shaper; shared memory has no token
    # bucket, and its noisy sweep (r2 0.4-0.9 on 8 ranks over 2 cores) would find one.
    fit, burst = fit_with_burst(ping) if link.startswith("inter") else (fit_alpha_beta(ping), 0.0)
    both_ways = fit_alpha_beta(duplex)
    shared = fit_alpha_beta(conc)
    # Flows through one shared resource at once: on the network each pair crosses its
    # node's uplink both ways, so a node carries one flow per pair it takes part in; in
    # memory every rank of the node copies (both directions of each pair).
    if link == "intra":
        flows = max(2 * sum(1 for a, _ in pairs if topology.node_of[a] == 0), 1)
    else:
        flows = max(sum(1 for a, _ in pairs if topology.node_of[a] == 0), 1)
    shared_beta = max(shared.beta_us_per_byte / flows, 0.0) or fit.beta_us_per_byte
    return LinkProfile(fit.alpha_us, fit.beta_us_per_byte, shared_beta, round(fit.r2, 4),
                       flows, max(both_ways.beta_us_per_byte, fit.beta_us_per_byte),
                       max(shared.alpha_us, fit.alpha_us), burst)


def _overhead(prober: Prober, opts: ProfileOptions, samples: list[dict[str, Any]]) -> float:
    """Per-step cost: the slope of a pair's exchange time over messages per phase."""
    pairs = link_pairs(prober.topology)
    name = next((k for k in pairs if k.startswith("inter")), next(iter(pairs), None))
    if name is None:
        return 0.0
    pair = pairs[name][0]
    points = []
    for k in FANOUT:
        t = prober.timed(prober.exchange([pair], 8, k), 8 * k, opts.iters, opts.warmup,
                         "profile fan-out")
        points.append((2 * k, t))  # each side posts k sends and k receives
        samples.append({"link": name, "mode": "fanout", "bytes": 8, "pairs": k,
                        "time_us": round(t, 3)})
    try:
        return fit_alpha_beta(points).beta_us_per_byte  # slope per step
    except ProfileError:
        return 0.0


def _compute(prober: Prober, samples: list[dict[str, Any]]) -> tuple[float, float]:
    """gamma for reduce and copy, every rank at once (they share the cores).

    One stall of the machine while the probe runs (another job, the kernel reclaiming
    memory) once made a copy look 8x slower than a reduce, and the model then priced every
    algorithm that copies 30-50% high. So the whole probe runs `COMPUTE_ROUNDS` times,
    rounds outermost, and each point is the median over rounds of the slowest rank's
    median: a stall spoils one round of a few points, not the figure.
    """
    vectors = {n: (torch.rand(n // 4), torch.rand(n // 4)) for n in COMPUTE_BYTES}
    rounds: dict[tuple[str, int], list[float]] = {}
    for _ in range(COMPUTE_ROUNDS):
        for kind in ("reduce", "copy"):
            for nbytes in COMPUTE_BYTES:
                a, b = vectors[nbytes]
                times = []
                for _ in range(5):
                    prober.comm.barrier()
                    start = time.perf_counter()
                    if kind == "reduce":
                        a.add_(b)
                    else:
                        a.copy_(b)
                    times.append((time.perf_counter() - start) * 1e6)
                everyone = prober.job.bootstrap.all_gather_json(statistics.median(times))
                rounds.setdefault((kind, nbytes), []).append(max(everyone))
    costs = {}
    for kind in ("reduce", "copy"):
        per_size = {nbytes: rounds[kind, nbytes] for nbytes in COMPUTE_BYTES}
        costs[kind] = gamma_of_rounds(per_size)
        for nbytes, per_round in per_size.items():
            samples.append({"link": "self", "mode": kind, "bytes": nbytes, "pairs": 1,
                            "time_us": round(statistics.median(per_round), 3),
                            "rounds_us": [round(t, 3) for t in per_round]})
    return costs["reduce"], costs["copy"]


def gamma_of_rounds(per_size: dict[int, list[float]]) -> float:
    """us per byte from {bytes: that size's time in each round}: the median over sizes of
    each size's median time per byte.

    At 1-4 MiB a reduce or copy has no fixed cost worth a term (a call is ~10 us beside
    150+), so every size measures gamma on its own, and the median keeps one slow size out.
    A slope between the two largest sizes did not: in one run 4 MiB copies were slow in two
    rounds of three, and the slope said 0.00032 us/B where 1 and 2 MiB said 0.00018."""
    per_byte = [statistics.median(times) / nbytes for nbytes, times in per_size.items()]
    return max(statistics.median(per_byte), 1e-9)


# ----- command ----------------------------------------------------------------------------
def _child_argv(args: argparse.Namespace, launcher: str) -> list[str]:
    import os

    return ["-m", "topocoll", "profile", "--launcher", launcher, "--transport", args.transport,
            "--intra", args.intra, "--sizes", args.sizes, "--iters", str(args.iters),
            "--timeout", str(args.timeout), "--out", os.path.abspath(args.out)]


def run_profile_command(args: argparse.Namespace) -> int:
    opts = ProfileOptions(tuple(parse_sizes(args.sizes)), args.iters)
    if args.launcher == "local":
        env: dict[str, str] = {}
        n = args.nranks
        if args.layout:
            topo = parse_topology(args.layout)
            n = topo.world_size
            env["TOPOCOLL_TOPOLOGY"] = args.layout
        return launch_job("profile", args.transport, n or 4,
                          lambda launcher: _child_argv(args, launcher),
                          args.timeout * 4 + 300, env)
    from topocoll.comm.job import init_job

    torch.set_num_threads(1)
    job = init_job(args.transport, args.intra, args.timeout, args.launcher)
    try:
        profile = run_profile(job, opts)
        if job.rank == 0:
            profile.save(args.out)
            print(f"# profile written to {args.out}")
    finally:
        with contextlib.suppress(Exception):
            job.close()
    return 0
