"""`topocoll pingpong`: point-to-point latency and bandwidth of one transport.

Ranks 0 and 1 of a job bounce a contiguous uint8 tensor of each size through the raw
`isend`/`irecv` of one transport (`job.communicator.transports.inter`), with no schedule,
executor or communicator in the timed path. Completion is driven the way the executor
drives it: `test()` every pending handle, `Backoff` between rounds, and handles that are
`blocking` (Gloo) finished with `wait(timeout)` once nothing pollable is left.

Per size: a barrier, `warmup` untimed round trips, `iters` timed ones (rank 0 posts its
receive, then its send, and times until both complete; rank 1 receives, then echoes the
same buffer back). One-way time = median round trip / 2, bandwidth = bytes / one-way
time. Large sizes get fewer iterations (`iterations()`), so a 1K:64M sweep stays short.

After the timed round trips one more (untimed) round trip carries fresh random bytes into
zeroed buffers: rank 1 checks what it received, rank 0 checks the echo, and any
difference fails the run on every rank (`PingPongError`).

The transport measured is the one named: `--transport shm` is shared memory on every
level; any other transport runs with `intra=same`, so no shared-memory path is involved
even though both ranks share a host.

Launching mirrors `topocoll bench` (`command.py`): with `--launcher local` the parent
re-runs the same command on 2 ranks (`--launcher torchrun` through our local launcher,
or through mpirun for the MPI transport).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import torch

from .launcher import launch_job
from .sizes import format_size, parse_sizes

TRANSPORTS = ("gloo", "mpi", "ucx", "shm")
POLL_MODES = ("backoff", "spin")
DEFAULT_SIZES = "1K:64M"
DEFAULT_ITERS = 50
DEFAULT_WARMUP = 5
DEFAULT_TIMEOUT = 120.0
LOCAL_RANKS = 2
PING, PONG = 0, 1
TAG = 7  # one tag for every size: transports that keep per-tag channels (shm) reuse them
# Timed bytes per size beyond which iterations are scaled down, never below LARGE_ITERS
# (sizes >= 4 MiB get LARGE_ITERS round trips, unless --iters asks for fewer).
ITER_BYTES = 16 << 20
LARGE_ITERS = 5

COLUMNS = ("size", "iters", "one-way(us)", "bw(GB/s)", "rtt min(us)", "rtt med(us)",
           "rtt max(us)")
_WIDTHS = (8, 7, 13, 11, 13, 13, 13)


class PingPongError(RuntimeError):
    """The payload that came back is not the payload that was sent."""


@dataclass(frozen=True)
class PingPongOptions:
    transport: str
    sizes: tuple[int, ...]
    iters: int = DEFAULT_ITERS
    warmup: int = DEFAULT_WARMUP
    timeout: float = DEFAULT_TIMEOUT
    poll: str = "backoff"


def intra_for(transport: str) -> str:
    """shm measures shared memory; every other transport also carries intra-node traffic."""
    return "shm" if transport == "shm" else "same"


def iterations(nbytes: int, iters: int) -> int:
    """Timed round trips for one size: `iters`, scaled down for large messages."""
    return min(iters, max(LARGE_ITERS, ITER_BYTES // max(nbytes, 1)))


def warmups(nbytes: int, warmup: int, iters: int) -> int:
    """Warm-up round trips: at most a fifth of the timed ones, at least one (if asked)."""
    return min(warmup, max(1, iterations(nbytes, iters) // 5))


# ----- moving bytes ---------------------------------------------------------------------
def complete(handles: Sequence[Any], deadline: float, poll: str = "backoff") -> None:
    """Drive `handles` to completion as the executor does (see the module docstring)."""
    from topocoll.comm.transports.base import Backoff, CollectiveTimeoutError

    backoff = Backoff()
    remaining = list(handles)
    while remaining:
        still = [h for h in remaining if not h.test()]
        if len(still) < len(remaining):
            backoff.reset()
        remaining = still
        if not remaining:
            return
        if all(h.blocking for h in remaining):
            for handle in remaining:
                handle.wait(max(deadline - time.monotonic(), 0.001))
            return
        if time.monotonic() > deadline:
            pending = "; ".join(h.describe() for h in remaining)
            raise CollectiveTimeoutError(f"pingpong timed out waiting on {pending}")
        if poll == "backoff":
            backoff.pause()


def ping(transport: Any, send: torch.Tensor, recv: torch.Tensor, timeout: float,
         poll: str) -> None:
    """Rank 0: one round trip (receive posted first, so the echo never waits for it)."""
    deadline = time.monotonic() + timeout
    handles = [transport.irecv(recv, PONG, TAG), transport.isend(send, PONG, TAG)]
    complete(handles, deadline, poll)


def pong(transport: Any, buf: torch.Tensor, timeout: float, poll: str) -> None:
    """Rank 1: receive into `buf`, send the same bytes back."""
    deadline = time.monotonic() + timeout
    complete([transport.irecv(buf, PING, TAG)], deadline, poll)
    complete([transport.isend(buf, PING, TAG)], deadline, poll)


def payload(nbytes: int, seed: int) -> torch.Tensor:
    """Random bytes (never a buffer of zeros that a no-op transfer would reproduce)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.empty(nbytes, dtype=torch.uint8).random_(0, 256, generator=gen)


def mismatch(expected: torch.Tensor, got: torch.Tensor) -> str | None:
    """None when equal, else how they differ (count, first offset, bytes there)."""
    if torch.equal(expected, got):
        return None
    wrong = (expected != got).nonzero().flatten()
    first = int(wrong[0])
    return (f"{wrong.numel()} of {expected.numel()} bytes differ, first at offset {first} "
            f"(expected {int(expected[first])}, got {int(got[first])})")


def _verify_seed(nbytes: int) -> int:
    return 0x5EED0000 + nbytes.bit_length() * 7919 + nbytes % 7919


# ----- one size, the sweep --------------------------------------------------------------
def measure(job: Any, opts: PingPongOptions, nbytes: int) -> dict[str, Any] | None:
    """One size on every rank; rank 0 returns the row, the others None."""
    transport = job.communicator.transports.inter
    rank = job.rank
    iters = iterations(nbytes, opts.iters)
    warmup = warmups(nbytes, opts.warmup, opts.iters)
    samples: list[float] = []
    if rank == PING:
        send, recv = payload(nbytes, nbytes), torch.zeros(nbytes, dtype=torch.uint8)
    elif rank == PONG:
        buf = torch.zeros(nbytes, dtype=torch.uint8)
    job.communicator.barrier()
    for i in range(warmup + iters):
        if rank == PING:
            start = time.perf_counter()
            ping(transport, send, recv, opts.timeout, opts.poll)
            if i >= warmup:
                samples.append((time.perf_counter() - start) * 1e6)
        elif rank == PONG:
            pong(transport, buf, opts.timeout, opts.poll)
    # The checked round trip: fresh bytes, zeroed receive buffers, untimed.
    problem = None
    if rank in (PING, PONG):
        expected = payload(nbytes, _verify_seed(nbytes))
    if rank == PING:
        send = expected
        recv.zero_()
    elif rank == PONG:
        buf.zero_()
    job.communicator.barrier()
    if rank == PING:
        ping(transport, send, recv, opts.timeout, opts.poll)
        bad = mismatch(expected, recv)
        problem = bad and f"rank 0: the echo of the {nbytes}-byte payload: {bad}"
    elif rank == PONG:
        pong(transport, buf, opts.timeout, opts.poll)
        bad = mismatch(expected, buf)
        problem = bad and f"rank 1: the {nbytes}-byte payload from rank 0: {bad}"
    problems = [p for p in job.bootstrap.all_gather_json(problem) if p]
    if problems:
        raise PingPongError(f"{job.transport}: payload corrupted in transit: "
                            + "; ".join(problems))
    if rank != PING:
        return None
    median = statistics.median(samples)
    one_way = median / 2
    return {
        "benchmark": "pingpong",
        "bytes": nbytes,
        "iters": iters,
        "warmup": warmup,
        "one_way_us": round(one_way, 3),
        "bandwidth_gbs": round(nbytes / one_way / 1e3, 6) if one_way > 0 else 0.0,
        "rtt_us": [round(s, 3) for s in samples],
        "rtt_min_us": round(min(samples), 3),
        "rtt_median_us": round(median, 3),
        "rtt_max_us": round(max(samples), 3),
        "verified": True,
    }


def run_pingpong(job: Any, opts: PingPongOptions, out: TextIO = sys.stdout,
                 json_out: TextIO | None = None) -> list[dict[str, Any]]:
    """Every size; rank 0 prints the table and writes JSON lines, and returns the rows."""
    if job.world_size < 2:
        raise ValueError(f"pingpong needs at least 2 ranks, the job has {job.world_size}")
    lead = job.rank == PING
    transport = job.communicator.transports.inter
    context = {
        "transport": job.transport,
        "transport_name": transport.name,
        "intra": job.intra,
        "launcher": job.launcher,
        "world_size": job.world_size,
        "poll": opts.poll,
        "versions": job.versions() if lead else {},
    }
    if lead:
        versions = ", ".join(f"{k} {v}" for k, v in context["versions"].items() if v)
        out.write(f"# topocoll pingpong: {job.transport} (intra {job.intra}), ranks 0<->1 "
                  f"of {job.world_size}, launcher {job.launcher}, poll {opts.poll}\n"
                  f"# {versions}\n")
        out.write(format_row(COLUMNS) + "\n")
        out.flush()
    rows = []
    for nbytes in opts.sizes:
        row = measure(job, opts, nbytes)
        if row is None:
            continue
        row = {**row, **context}
        rows.append(row)
        out.write(format_row(table_cells(row)) + "\n")
        out.flush()
        if json_out is not None:
            json_out.write(json.dumps(row, sort_keys=True) + "\n")
            json_out.flush()
    return rows


def table_cells(row: dict[str, Any]) -> tuple[str, ...]:
    return (format_size(row["bytes"]), str(row["iters"]), f"{row['one_way_us']:.1f}",
            f"{row['bandwidth_gbs']:.3f}", f"{row['rtt_min_us']:.1f}",
            f"{row['rtt_median_us']:.1f}", f"{row['rtt_max_us']:.1f}")


def format_row(cells: Sequence[str]) -> str:
    return "".join(c.rjust(w) for c, w in zip(cells, _WIDTHS))


# ----- the command: launcher side and rank side -----------------------------------------
def options_from_args(args: argparse.Namespace) -> PingPongOptions:
    if args.transport not in TRANSPORTS:
        raise ValueError(f"pingpong: unknown transport {args.transport!r}; choose from "
                         f"{', '.join(TRANSPORTS)}")
    return PingPongOptions(transport=args.transport, sizes=tuple(parse_sizes(args.sizes)),
                           iters=args.iters, warmup=args.warmup, timeout=args.timeout,
                           poll=args.poll)


def child_argv(args: argparse.Namespace, launcher: str) -> list[str]:
    """The same pingpong command, as one rank of a job started by `launcher`."""
    argv = ["-m", "topocoll", "pingpong", "--launcher", launcher,
            "--transport", args.transport, "--sizes", args.sizes,
            "--iters", str(args.iters), "--warmup", str(args.warmup),
            "--timeout", str(args.timeout), "--poll", args.poll]
    if args.json:
        argv += ["--json", os.path.abspath(args.json)]
    return argv


def run_pingpong_command(args: argparse.Namespace) -> int:
    options_from_args(args)  # validate everything before starting any process
    if args.launcher == "local":
        return _launch(args)
    return _run_rank(args)


def _launch(args: argparse.Namespace) -> int:
    if args.json:
        with open(args.json, "w"):
            pass  # truncate: rank 0 appends this run's rows
    return launch_job("pingpong", args.transport, LOCAL_RANKS,
                      lambda launcher: child_argv(args, launcher), args.timeout * 4 + 120)


def _run_rank(args: argparse.Namespace) -> int:
    from topocoll.comm.job import init_job

    torch.set_num_threads(1)  # ranks share the machine's cores
    opts = options_from_args(args)
    job = init_job(opts.transport, intra_for(opts.transport), opts.timeout, args.launcher)
    try:
        with contextlib.ExitStack() as stack:
            json_out = None
            if args.json and job.rank == PING:
                json_out = stack.enter_context(open(args.json, "a"))
            run_pingpong(job, opts, sys.stdout, json_out)
    finally:
        job.close()
    return 0
