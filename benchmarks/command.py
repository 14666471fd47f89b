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
        timing=getattr(args, "timing", "call"),
        turns=getattr(args, "turns", None),
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
    if getattr(args, "soak", None) is not None:
        argv += ["--soak", str(args.soak)]
    if getattr(args, "timing", "call") != "call":
        argv += ["--timing", args.timing]
    if getattr(args, "turns", None) is not None:
        argv += ["--turns", str(args.turns)]
    return argv


def run_bench_command(args: argparse.Namespace) -> int:
    _options(args)  # validate everything before starting any process
    soak = getattr(args, "soak", None)
    if soak is not None and not (soak >= 0 and soak < float("inf")):
        raise ValueError(f"--soak takes minutes >= 0, got {soak}")
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
    soak_s = 60.0 * (getattr(args, "soak", None) or 0.0)  # the soak's own length on top
    return launch_job("bench", args.transport, n, lambda launcher: _child_argv(args, launcher),
                      soak_s + args.timeout * 4 + 120, env)


def _run_rank(args: argparse.Namespace) -> int:
    import torch

    from topocoll.comm.job import init_job

    torch.set_num_threads(1)  # ranks share the machine's cores
    if getattr(args, "soak", None) is None:
        # The `native` baseline is MPI's blocking collective, as MPI users call it; by
        # default the transport bounds natives with the slower nonblocking forms.
        from topocoll.comm.transports.mpi import BLOCKING_NATIVES_ENV

        os.environ.setdefault(BLOCKING_NATIVES_ENV, "1")
    if args.layout:
        parse_topology(args.layout)  # a bad layout fails here, with its own message
        os.environ.setdefault("TOPOCOLL_TOPOLOGY", args.layout)
    job = init_job(args.transport, args.intra, args.timeout, args.launcher)
    failed = True
    try:
        with contextlib.ExitStack() as stack:
            json_out = None
            if args.json and job.rank == 0:
                json_out = stack.enter_context(open(args.json, "a"))
            if getattr(args, "soak", None) is not None:
                from .soak import soak

                status = soak(job, args.soak, sys.stdout, json_out)
            else:
                run_sweep(job, _options(args), sys.stdout, json_out)
                status = 0
        failed = False
    finally:
        # After a failure the ranks are out of step: close()'s barrier would only wait
        # out the timeout, so release locally and let the error through at once.
        if failed:
            job.abort()
        else:
            job.close()
    return status
