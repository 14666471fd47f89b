"""The `topocoll` command: bench, cluster, profile, tune, simulate, report, topo, ...

Option names, algorithm names and JSON fields are the contract in the design notes;
scripts depend on them, so they stay stable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from topocoll import __version__

EXIT_USAGE = 2

COLLECTIVE_CHOICES = ("all_reduce", "all_to_all", "all_to_all_v", "reduce_scatter",
                      "all_gather")
DTYPE_CHOICES = ("float16", "bfloat16", "float32", "float64", "int32", "int64")
TIMING_CHOICES = ("call", "batch")  # benchmarks/harness.py: per call, or back-to-back
OP_CHOICES = ("sum", "prod", "min", "max", "avg")
TRANSPORT_CHOICES = ("gloo", "mpi", "ucx", "shm", "nccl")


class CommandError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


# ----- bench ----------------------------------------------------------------------------
def add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark algorithms and native baselines",
                       description="Run a size sweep of one collective for each algorithm "
                                   "(nccl-tests style rows, JSON lines with --json).")
    p.add_argument("--launcher", choices=("local", "mpirun", "torchrun"), default="local",
                   help="local: spawn -n ranks here; mpirun/torchrun: this process is one "
                        "rank of a job those started (default: local)")
    p.add_argument("-n", "--nranks", type=_positive_int, default=None,
                   help="ranks to start with --launcher local (default: sum of --layout, "
                        "else 4)")
    p.add_argument("--layout", default=None,
                   help="ranks per node for a local run, e.g. 2,3 or 2x4[:rails=2]")
    p.add_argument("--transport", choices=TRANSPORT_CHOICES, default="gloo",
                   help="transport between nodes (default: gloo)")
    p.add_argument("--intra", choices=("shm", "same"), default="shm",
                   help="transport inside a node: shared memory or the same as --transport")
    p.add_argument("--collective", choices=COLLECTIVE_CHOICES, default="all_reduce")
    p.add_argument("--algorithm", default="all",
                   help="comma-separated algorithm names, 'all', 'native', 'tuned'")
    p.add_argument("--sizes", default="1K:1M", help="e.g. 1K:64M (powers of two), 4K,1M")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32")
    p.add_argument("--op", choices=OP_CHOICES, default="sum")
    p.add_argument("--iters", type=_positive_int, default=5)
    p.add_argument("--warmup", type=_non_negative_int, default=1)
    p.add_argument("--check", action="store_true", help="verify every result (#wrong)")
    p.add_argument("--json", metavar="FILE", default=None, help="write JSON lines here")
    p.add_argument("--profile", metavar="FILE", default=None,
                   help="profile JSON: every row gets the cost model's predicted_us (a "
                        "tuning file in $TOPOCOLL_TUNING_FILE brings its own figures)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds before a stuck collective fails (and the job is killed)")
    p.add_argument("--timing", choices=TIMING_CHOICES, default="call",
                   help="call: a barrier before every timed call, slowest rank per call "
                        "(default); batch: back-to-back calls in up to 15 batches, nccl-tests "
                        "style")
    p.add_argument("--turns", type=_positive_int, default=None, metavar="N",
                   help="batch timing: N turns (batches per algorithm, taken in turns) "
                        "where a batch holds several calls, each batch keeping its size, "
                        "so more turns mean more calls (default: 15)")
    p.add_argument("--soak", type=float, default=None, metavar="MINUTES",
                   help="instead of a sweep: random collectives, algorithms, dtypes, ops and "
                        "sizes for MINUTES, every result verified; counts per collective and "
                        "algorithm, exit status 1 on any mismatch")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from topocoll.benchmarks.command import run_bench_command

    return run_bench_command(args)


# ----- profile, tune, simulate (issue #7) --------------------------------------------------
def add_tuning_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="measure alpha/beta per link class",
                       description="Ping-pong, concurrent and fan-out probes per link class "
                                   "(intra-node, inter-node per rail) plus reduce/copy cost; "
                                   "writes a profile JSON for the cost model and the tuner.")
    p.add_argument("--launcher", choices=("local", "mpirun", "torchrun"), default="local")
    p.add_argument("-n", "--nranks", type=_positive_int, default=None)
    p.add_argument("--layout", default=None, help="ranks per node for a local run, e.g. 2x2")
    p.add_argument("--transport", choices=TRANSPORT_CHOICES, default="gloo")
    p.add_argument("--intra", choices=("shm", "same"), default="shm")
    p.add_argument("--sizes", default="1K:4M")
    p.add_argument("--iters", type=_positive_int, default=5)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--out", default="profile.json")
    p.set_defaults(func=cmd_profile)
    p = sub.add_parser("tune", help="build the decision table",
                       description="Rank every algorithm by the cost model per collective "
                                   "and size bucket (1 B..1 GiB), refine with measured "
                                   "benchmark JSON, write the decision table JSON.")
    p.add_argument("--out", default=None, help="write the table here")
    p.add_argument("--show", default=None, metavar="FILE", help="print a table and exit")
    p.add_argument("--profile", default=None, help="profile JSON (from topocoll profile)")
    p.add_argument("--preset", default=None, help="nominal figures of a preset instead")
    p.add_argument("--layout", default=None,
                   help="topology to tune for (default: the profile's)")
    p.add_argument("--transport", default=None, help="default: the profile's")
    p.add_argument("--collective", default="all",
                   help="comma-separated collectives or 'all'")
    p.add_argument("--results", nargs="*", default=[], metavar="JSONL",
                   help="benchmark JSON lines whose measurements refine the model")
    p.add_argument("--measure", default=None, metavar="SIZES",
                   help="run `topocoll bench` over the model's top candidates at these "
                        "sizes (same launcher options as bench) and refine with it")
    p.add_argument("--top", type=_positive_int, default=3,
                   help="candidates per size to measure (default 3)")
    p.add_argument("--launcher", choices=("local", "mpirun", "torchrun"), default="local")
    p.add_argument("--model-only", action="store_true",
                   help="do not measure; ignore --measure")
    p.set_defaults(func=cmd_tune)
    p = sub.add_parser("simulate", help="price algorithms at scales we cannot run",
                       description="Predicted time and busbw of every algorithm from a "
                                   "preset's nominal figures or a measured profile.")
    p.add_argument("--preset", default=None, help="e.g. 8x-nvlink-400g (default)")
    p.add_argument("--profile", default=None, help="a measured profile JSON instead")
    p.add_argument("--nodes", type=_positive_int, default=None)
    p.add_argument("--layout", default=None, help="explicit layout, e.g. 3,5")
    p.add_argument("--collective", default="all_reduce,all_to_all")
    p.add_argument("--sizes", default="1K:1G")
    p.add_argument("--json", default=None, metavar="FILE")
    p.add_argument("--markdown", default=None, metavar="FILE")
    p.add_argument("--compare", nargs="+", default=None, metavar="JSONL",
                   help="instead of a table: simulated vs measured for every forced row of "
                        "this topology in these benchmark results")
    p.set_defaults(func=cmd_simulate)


def cmd_profile(args: argparse.Namespace) -> int:
    from topocoll.benchmarks.profiler import run_profile_command

    return run_profile_command(args)


def cmd_tune(args: argparse.Namespace) -> int:
    from topocoll.benchmarks.tune_command import run_tune_command

    return run_tune_command(args)


def cmd_simulate(args: argparse.Namespace) -> int:
    from topocoll.benchmarks.simulate_command import run_simulate_command

    return run_simulate_command(args)


# ----- pingpong -------------------------------------------------------------------------
def add_pingpong(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pingpong", help="point-to-point latency/bandwidth of one transport",
                       description="Ranks 0 and 1 bounce a uint8 tensor of each size through "
                                   "the transport's raw isend/irecv: one-way latency (median "
                                   "round trip / 2), bandwidth, round-trip min/median/max; "
                                   "the last round trip's payload is verified.")
    p.add_argument("--launcher", choices=("local", "mpirun", "torchrun"), default="local",
                   help="local: start 2 ranks here; mpirun/torchrun: this process is one "
                        "rank of a job those started (default: local)")
    p.add_argument("--transport", choices=("gloo", "mpi", "ucx", "shm"), default="gloo",
                   help="the transport measured (shm: shared memory; the others also carry "
                        "intra-node traffic, i.e. --intra same)")
    p.add_argument("--sizes", default="1K:64M", help="e.g. 1K:64M (powers of two), 4K,1M")
    p.add_argument("--iters", type=_positive_int, default=50,
                   help="timed round trips per size; sizes >= 4 MiB get at most 5 "
                        "(default: 50)")
    p.add_argument("--warmup", type=_non_negative_int, default=5,
                   help="untimed round trips per size, at most a fifth of --iters and at "
                        "least 1 (default: 5)")
    p.add_argument("--poll", choices=("backoff", "spin"), default="backoff",
                   help="between polls: the executor's backoff (yield, then short sleeps) or "
                        "a hot loop (default: backoff)")
    p.add_argument("--json", metavar="FILE", default=None, help="write JSON lines here")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds before a stuck round trip fails (and the job is killed)")
    p.set_defaults(func=cmd_pingpong)


def cmd_pingpong(args: argparse.Namespace) -> int:
    from topocoll.benchmarks.pingpong import run_pingpong_command

    return run_pingpong_command(args)


# ----- topo / algorithms / schedule ----------------------------------------------------
def add_topo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("topo", help="show a topology (layout, preset, file or environment)",
                       description="Describe the topology a job would use: from --layout, "
                                   "--preset, or TOPOCOLL_TOPOLOGY.")
    p.add_argument("--layout", default=None, help="e.g. 2,3 or 2x4:rails=2 or a JSON file")
    p.add_argument("--preset", default=None, help="a preset name (see --list-presets)")
    p.add_argument("--nodes", type=_positive_int, default=None, help="nodes for --preset")
    p.add_argument("--list-presets", action="store_true")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_topo)


def _topology_from_args(layout: str | None, preset: str | None = None,
                        nodes: int | None = None):
    from topocoll.topology import PRESETS, parse_topology, topology_from_env

    if preset:
        if preset not in PRESETS:
            raise CommandError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        return PRESETS[preset].topology(nodes)
    if layout:
        return parse_topology(layout)
    topo = topology_from_env()
    if topo is None:
        raise CommandError("give --layout, --preset or set TOPOCOLL_TOPOLOGY")
    return topo


def cmd_topo(args: argparse.Namespace) -> int:
    from topocoll.topology import PRESETS

    if args.list_presets:
        for preset in PRESETS.values():
            print(f"{preset.name:22s} {preset.description}")
        return 0
    topo = _topology_from_args(args.layout, args.preset, args.nodes)
    if args.json:
        print(json.dumps({**topo.to_dict(), "fingerprint": topo.fingerprint}, indent=2))
        return 0
    print(topo.describe())
    print(f"fingerprint {topo.fingerprint}")
    for index, ranks in enumerate(topo.nodes):
        rails = ", ".join(f"{r}:rail{topo.rail_of(r)}" for r in ranks)
        print(f"  node {index}: {rails}")
    return 0


def add_algorithms(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("algorithms", help="list the algorithm library",
                       description="List every algorithm of every collective.")
    p.add_argument("--collective", choices=(*COLLECTIVE_CHOICES, "broadcast"), default=None)
    p.set_defaults(func=cmd_algorithms)


def cmd_algorithms(args: argparse.Namespace) -> int:
    from topocoll.comm.algorithms import ALGORITHMS

    for (collective, name), algo in ALGORITHMS.items():
        if args.collective in (None, collective):
            tag = " [topology-aware]" if algo.topology_aware else ""
            print(f"{collective:15s} {name:20s} {algo.summary}{tag}")
    return 0


def add_schedule(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("schedule", help="build, verify and print one algorithm's schedule",
                       description="Build a schedule, check it with the verifier on random "
                                   "data, and print a summary (or the JSON with --json).")
    p.add_argument("--collective", choices=(*COLLECTIVE_CHOICES, "broadcast"),
                   default="all_reduce")
    p.add_argument("--algorithm", required=True)
    p.add_argument("--layout", required=True, help="e.g. 2,3 or 2x4:rails=2")
    p.add_argument("--count", type=_non_negative_int, default=16,
                   help="elements (per peer for all-to-all)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32")
    p.add_argument("--op", choices=OP_CHOICES, default="sum")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="algorithm parameter, e.g. inter=rabenseifner")
    p.add_argument("--json", action="store_true", help="print the schedule JSON")
    p.set_defaults(func=cmd_schedule)


def cmd_schedule(args: argparse.Namespace) -> int:
    from topocoll.comm import CollectiveSpec, build_schedule
    from topocoll.comm.verifier import verify

    topo = _topology_from_args(args.layout)
    p = topo.world_size
    spec = {
        "all_reduce": lambda: CollectiveSpec.all_reduce(p, args.count, args.op),
        "broadcast": lambda: CollectiveSpec.broadcast(p, args.count),
        "reduce_scatter": lambda: CollectiveSpec.reduce_scatter(p, args.count, args.op),
        "all_gather": lambda: CollectiveSpec.all_gather(p, args.count),
        "all_to_all": lambda: CollectiveSpec.all_to_all(p, args.count),
        "all_to_all_v": lambda: CollectiveSpec.all_to_all_v(
            [[(i + 2 * j) % 3 * args.count for j in range(p)] for i in range(p)]),
    }[args.collective]()
    params = {}
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep:
            raise CommandError(f"--param expects KEY=VALUE, got {item!r}")
        params[key] = value
    schedule = build_schedule(args.algorithm, topo, spec, **params)
    if args.json:
        print(schedule.to_json())
        return 0
    report = verify(schedule, args.dtype)
    phases = max(len(prog.phases) for prog in schedule.programs)
    print(f"{args.collective} {args.algorithm} on {topo.describe()}")
    print(f"schedule id {schedule.id}: {phases} phases (max over ranks), {report.messages} "
          f"messages, {report.elements_moved} elements moved; verified on random "
          f"{args.dtype} data (max error {report.max_error:.3g})")
    return 0


# ----- not yet landed ------------------------------------------------------------------
def add_cluster(sub: argparse._SubParsersAction) -> None:
    from topocoll.topology.cluster import add_tcp_arguments

    p = sub.add_parser("cluster", help="emulated multi-node cluster (network namespaces)",
                       description="Bring an emulated cluster up or down, or run a job on it.")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    up = actions.add_parser("up", help="create node namespaces, bridge(s), shaped uplinks")
    up.add_argument("--nodes", type=_positive_int, default=2)
    up.add_argument("--ranks-per-node", type=_positive_int, default=4)
    up.add_argument("--layout", default=None, help="uneven nodes, e.g. 3,5")
    up.add_argument("--rails", type=_positive_int, default=1)
    up.add_argument("--inter-node-rate", default="1gbit", help="tbf rate per uplink")
    up.add_argument("--burst", default="32kb",
                    help="tbf burst per uplink, let through at line speed (default: 32kb)")
    up.add_argument("--mtu", type=_positive_int, default=9000,
                    help="MTU of every emulated link (default: 9000, jumbo frames)")
    up.add_argument("--force", action="store_true",
                    help="replace a cluster even while a job runs on it (kills the job)")
    add_tcp_arguments(up)
    actions.add_parser("down", help="remove everything `up` created")
    actions.add_parser("status", help="show what exists")
    run = actions.add_parser("run", help="run a command across the nodes")
    run.add_argument("--launcher", choices=("mpirun", "torchrun"), required=True)
    run.add_argument("--timeout", type=float, default=600.0,
                     help="seconds before the job is killed (exit status 124)")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ...")
    p.set_defaults(func=cmd_cluster)


def cmd_cluster(args: argparse.Namespace) -> int:
    from topocoll.topology import cluster

    try:
        if args.action == "up":
            state = cluster.cluster_up(args.nodes, args.ranks_per_node, layout=args.layout,
                                       rails=args.rails, rate=args.inter_node_rate,
                                       burst=args.burst, mtu=args.mtu, force=args.force,
                                       quickack=args.quickack,
                                       congestion_control=args.congestion_control)
            print(cluster.format_status(state, state.namespaces))
            return 0
        if args.action == "down":
            removed = cluster.cluster_down()
            print(f"removed {', '.join(removed)}" if removed else "nothing to remove")
            return 0
        if args.action == "status":
            print(cluster.cluster_status())
            return 0
        cmd = list(args.cmd)
        if cmd and cmd[0] == "--":
            cmd = cmd[1:]
        if not cmd:
            raise CommandError("no command: topocoll cluster run --launcher L -- CMD ...")
        return cluster.cluster_run(args.launcher, cmd, args.timeout)
    except cluster.RootRequired as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    except cluster.ClusterError as exc:
        raise CommandError(str(exc)) from exc


def add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="HTML/PNG report from benchmark JSON",
                       description="Turn benchmark JSON, a profile and a tuning table into "
                                   "an HTML page and figures.")
    p.add_argument("results", nargs="+")
    p.add_argument("--out", required=True)
    from topocoll.reports.generate import cmd_report  # stdlib-only import; matplotlib later

    p.set_defaults(func=cmd_report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="topocoll",
        description="Topology-aware collectives: algorithms, benchmarks, tuner, reports.")
    parser.add_argument("--version", action="version", version=f"topocoll {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_bench, add_cluster, add_tuning_commands, add_report, add_topo,
                add_algorithms, add_schedule, add_pingpong):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CommandError as exc:
        print(f"topocoll {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ImportError as exc:  # a missing optional extra: one line, no traceback
        print(f"topocoll {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as exc:  # bad values that argparse cannot see (layouts, sizes...)
        print(f"topocoll {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
