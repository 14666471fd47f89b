"""`topocoll bench`: the launcher side (local runs) and the rank side (inside a job)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from topocoll.topology import parse_topology

from .harness import BenchOptions, expand_algorithms, run_sweep
from .launcher import launch_job
from .sizes import parse_sizes

DEFAULT_LOCAL_RANKS = 4


def _options(args: argparse.Namespace) -> BenchOptions:
    return BenchOptions(
        collective=args.collective,
        algorithms=expand_algorithms(args.algorithm, args.collective),
        sizes=tuple(parse_sizes(args.sizes)),
        dtype=args.dtype,
        op=args.op,
        iters=args.iters,
        warmup=args.warmup,
        check=args.check,
        profile=getattr(args, "profile", None),
    )


def _child_argv(args: argparse.Namespace, launcher: str) -> list[str]:
    """The same bench command, as one rank of a job started by `launcher`."""
    argv = ["-m", "topocoll", "bench", "--launcher", launcher,
            "--transport", args.transport, "--intra", args.intra,
            "--collective", args.collective, "--algorithm", args.algorithm,
            "--sizes", args.sizes, "--dtype", args.dtype, "--op", args.op,
            "--iters", str(args.iters), "--warmup", str(args.warmup),
            "--timeout", str(args.timeout)]
    if args.check:
        argv.append("--check")
    if args.json:
        argv += ["--json", os.path.abspath(args.json)]
    if getattr(args, "profile", None):
        argv += ["--profile", os.path.abspath(args.profile)]
    return argv


def run_bench_command(args: argparse.Namespace) -> int:
    _options(args)  # validate everything before starting any process
    if args.launcher == "local":
        return _launch(args)
    return _run_rank(args)


def _launch(args: argparse.Namespace) -> int:
    env: dict[str, str] = {}
    n = args.nranks
    if args.layout:
        topo = parse_topology(args.layout)
        if n is not None and n != topo.world_size:
            raise ValueError(f"-n {n} does not match --layout {args.layout} "
                             f"({topo.world_size} ranks)")
        n = topo.world_size
        env["TOPOCOLL_TOPOLOGY"] = args.layout
    n = n or DEFAULT_LOCAL_RANKS
    if args.json:
        with open(args.json, "w"):
            pass  # truncate: rank 0 appends this run's rows
    return launch_job("bench", args.transport, n, lambda launcher: _child_argv(args, launcher),
                      args.timeout * 4 + 120, env)


def _run_rank(args: argparse.Namespace) -> int:
    import torch

    from topocoll.comm.job import init_job

    torch.set_num_threads(1)  # ranks share the machine's cores
    if args.layout:
        parse_topology(args.layout)  # a bad layout fails here, with its own message
        os.environ.setdefault("TOPOCOLL_TOPOLOGY", args.layout)
    job = init_job(args.transport, args.intra, args.timeout, args.launcher)
    try:
        with contextlib.ExitStack() as stack:
            json_out = None
            if args.json and job.rank == 0:
                json_out = stack.enter_context(open(args.json, "a"))
            run_sweep(job, _options(args), sys.stdout, json_out)
    finally:
        job.close()
    return 0
