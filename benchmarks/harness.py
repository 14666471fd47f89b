"""The benchmark harness: warm-up, size sweep, timing (slowest rank wins), checking, output.

Per (size, algorithm): `warmup` untimed calls, then `iters` timed calls (up to 20x more
below 1 MiB, and up to 120x below 16 MiB in batch timing, as OSU does). Two timings:
- `call` (default): each call starts after a barrier on fresh input; a call's time is the
  slowest rank's, the row's time is the median over calls. Strict: on an oversubscribed
  machine the barrier's exit skew (ranks leave it as the scheduler wakes them) lands in
  the time of every call, milliseconds on 8 ranks over 2 cores.
- `batch` (nccl-tests style): up to `BATCHES` batches of back-to-back calls, a barrier before
  each batch only; a batch's per-call time is the slowest rank's batch time over its
  calls, the row's time the mean over batches (all calls' time over their number, as
  nccl-tests reports it; `median_us` holds the median). What a training loop that issues
  one collective after another sees, rare stalls included (`row_time`). The algorithms
  of one size take their batches in turns (`measure_interleaved`), so the machine's
  drift over a sweep hits them alike.
In-place all-reduce inputs are refreshed before every call (in both timings), so sums
never overflow into slow arithmetic.
With `check`, one more call on fresh input is compared element by element with the
expected result on every rank and `#wrong` is the sum over ranks.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TextIO

from topocoll.comm.algorithms import NATIVE, TUNED, algorithm_names
from topocoll.comm.job import Job
from topocoll.comm.transports.base import NotSupportedError
from topocoll.comm.tuner import predict, rank_candidates
from topocoll.topology import Topology
from topocoll.topology.profile import Profile, load_profile

from .bound import LinkBudget, bound_us, link_budget
from .collectives import ENTRIES, Case, count_wrong, uneven_splits
from .regret import format_accuracy, format_regret, regret_rows
from .sizes import format_size

PLANT_WRONG = "TOPOCOLL_BENCH_PLANT_WRONG"
COLUMNS = ("size", "count", "type", "redop", "algorithm", "time(us)", "algbw(GB/s)",
           "busbw(GB/s)", "#wrong", "bound(us)", "%bound")


@dataclass(frozen=True)
class BenchOptions:
    collective: str
    algorithms: tuple[str, ...]
    sizes: tuple[int, ...]
    dtype: str = "float32"
    op: str = "sum"
    iters: int = 5
    warmup: int = 1
    check: bool = False
    params: dict[str, Any] = field(default_factory=dict)
    inter_rate_bps: float | None = None  # bytes/s of one inter-node link, for the bound
    profile: str | None = None  # profile JSON: rows get the cost model's predicted_us
    timing: str = "call"  # "call" (barrier before every call) or "batch" (see module doc)
    turns: int | None = None  # batch timing: turns where a batch holds several calls

    def __post_init__(self) -> None:
        if self.turns is not None and (self.timing != "batch" or self.turns < 1):
            raise ValueError(f"--turns {self.turns}: takes a count >= 1 and --timing batch "
                             "(call timing has no batches to take in turns)")


BATCHES = 15  # at most: large sizes are timed `iters` times, one call per batch


SMALL_BYTES = 1 << 20
MAX_SMALL_FACTOR = 20
# Batch timing (back-to-back calls) scales calls up to 16 MiB, up to 120x: 3 x 120 calls
# are 15 batches of 24 below 128 KiB, and a 256 KiB all-to-all gets 192 calls, not 12.
BATCH_SMALL_BYTES = 16 << 20
BATCH_SMALL_FACTOR = 120


def iterations(nbytes: int, iters: int, factor: int = MAX_SMALL_FACTOR,
               small_bytes: int = SMALL_BYTES) -> int:
    """OSU-style: messages below `small_bytes` get more timed calls (up to `factor` x
    `iters`), as many as move `iters` x `small_bytes`.

    Small collectives take milliseconds here and jitter by as much, so a median of three
    says little; their extra calls cost almost nothing next to one large size.

    Batch timing asks for more, and up to 16 MiB: the regret sweep compares the tuned
    backend with the best forced algorithm at every size, and when both run the same
    algorithm what it measures is noise. With one call per batch (a 256 KiB all-to-all
    had 12 calls in 12 batches) single batches ranged 4.6-11.4 ms and two medians of the
    same algorithm differed by 30%; with 15 batches of 12 calls, by up to 15%. Each
    size's calls now take about a second per algorithm up to 16 MiB, which adds ~4
    minutes to the full suite.
    """
    if nbytes >= small_bytes:
        return iters
    return min(max(iters, iters * small_bytes // max(nbytes, 1)), factor * iters)


def _calls(nbytes: int, opts: BenchOptions) -> int:
    if opts.timing == "batch":
        return iterations(nbytes, opts.iters, BATCH_SMALL_FACTOR, BATCH_SMALL_BYTES)
    return iterations(nbytes, opts.iters)


def expand_algorithms(names: str | list[str], collective: str) -> tuple[str, ...]:
    """`all` -> every generator for the collective; `native` and `tuned` pass through."""
    items = names.split(",") if isinstance(names, str) else list(names)
    known = algorithm_names(collective)
    out: list[str] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        if item == "all":
            out += [a for a in known if a not in out]
        elif item in (NATIVE, TUNED) or item in known:
            if item not in out:
                out.append(item)
        else:
            raise ValueError(f"unknown algorithm {item!r} for {collective}; known: "
                             f"{', '.join(known)}, native, tuned, all")
    if not out:
        raise ValueError("no algorithm selected")
    return tuple(out)


def _call(job: Job, collective: str, case: Case, algorithm: str, op: str
          ) -> Callable[[], None]:
    comm = job.communicator
    algo = None if algorithm == TUNED else algorithm
    if collective == "all_reduce":
        return lambda: comm.all_reduce(case.work[0], op, algorithm=algo)
    if collective == "reduce_scatter":
        return lambda: comm.reduce_scatter(case.work[0], case.work[1], op, algorithm=algo)
    if collective == "all_gather":
        return lambda: comm.all_gather(case.work[0], case.work[1], algorithm=algo)
    if collective == "all_to_all":
        return lambda: comm.all_to_all_v(case.work[0], case.work[1], algorithm=algo)
    ins, outs = case.extra["in_splits"], case.extra["out_splits"]
    return lambda: comm.all_to_all_v(case.work[0], case.work[1], outs, ins, algorithm=algo)


def measure(job: Job, opts: BenchOptions, nbytes: int, algorithm: str,
            budget: LinkBudget | None = None, profile: Profile | None = None
            ) -> dict[str, Any] | None:
    """One row (on every rank; rank 0's is the one reported). None if not supported."""
    if opts.timing == "batch":
        return measure_interleaved(job, opts, nbytes, (algorithm,), budget, profile)[0]
    entry = ENTRIES[opts.collective]
    case = entry.make(nbytes, job.rank, job.world_size, opts.dtype, opts.op)
    run = _warmed_up(job, opts, case, algorithm)
    if run is None:
        return None
    samples = _time_calls(job.communicator, case, run, _calls(nbytes, opts))
    return _row(job, opts, nbytes, case, algorithm, _chosen(job, algorithm), run, samples,
                budget, profile)


def measure_interleaved(job: Job, opts: BenchOptions, nbytes: int,
                        algorithms: tuple[str, ...], budget: LinkBudget | None = None,
                        profile: Profile | None = None) -> list[dict[str, Any] | None]:
    """Rows of every algorithm at one size, their batches taken in turns (batch k of
    each algorithm, in a shuffled order, then batch k+1 of each), on one shared set of
    buffers.

    Why: on a shared machine the speed drifts by tens of percent over seconds (other
    ranks' phases, the kernel's network work, frequency); timed one after the other,
    algorithms a tenth apart swap places with that drift, and a tuner's pick made from
    one sweep misses the best of the next. In turns, every algorithm sees the same
    drift. Batch timing only (each turn is a barrier and a batch).

    `opts.turns` sets how many turns where a batch holds several calls (small sizes,
    where calls are cheap), each batch keeping its size. Why: the drift is not only
    slow. Two arms running the same algorithm (`node_leader`, 2-64 KiB all-to-all on 2x4)
    still differed by up to 9% over 15 turns of 96 calls, and by at most 4% over 90
    turns of 10: more turns cancel more of it than longer batches do."""
    entry = ENTRIES[opts.collective]
    case = entry.make(nbytes, job.rank, job.world_size, opts.dtype, opts.op)
    runs = {a: _warmed_up(job, opts, case, a) for a in algorithms}
    timed = [a for a in algorithms if runs[a] is not None]
    calls = _calls(nbytes, opts)
    batches = _batch_count(calls)
    per_batch = calls // batches
    if opts.turns is not None and per_batch > 1:
        batches = opts.turns  # each batch keeps its size: more turns, more calls
    samples: dict[str, list[float]] = {a: [] for a in timed}
    chosen: dict[str, str] = {}
    for turn in range(batches):
        for algorithm in _turn_order(timed, nbytes, turn):
            samples[algorithm] += _time_batches(job.communicator, case, runs[algorithm],
                                                opts.collective, per_batch, 1)
            chosen[algorithm] = _chosen(job, algorithm)
    return [_row(job, opts, nbytes, case, a, chosen[a], runs[a], samples[a], budget, profile)
            if a in chosen else None for a in algorithms]


def _turn_order(algorithms: list[str], nbytes: int, turn: int) -> list[str]:
    """The algorithms in a shuffled order per turn, the same on every rank (seeded by
    size and turn): whoever runs after a particular algorithm, or first after the
    barrier, pays for it in a different turn each time, so no algorithm carries a
    position's cost in every sample."""
    order = list(algorithms)
    random.Random(nbytes * 1000 + turn).shuffle(order)
    return order


def _chosen(job: Job, algorithm: str) -> str:
    """What the last call ran (`tuned` resolves to a table's pick)."""
    last = job.communicator.last_choice
    return last.algorithm if last else algorithm


def _warmed_up(job: Job, opts: BenchOptions, case: Case, algorithm: str
               ) -> Callable[[], None] | None:
    """The call of `algorithm` on `case`, after its warm-up; None if not supported."""
    run = _call(job, opts.collective, case, algorithm, opts.op)
    try:
        for _ in range(opts.warmup):
            case.reset()
            run()
    except NotSupportedError:
        return None
    return run


def _row(job: Job, opts: BenchOptions, nbytes: int, case: Case, algorithm: str, chosen: str,
         run: Callable[[], None], samples: list[float], budget: LinkBudget | None,
         profile: Profile | None) -> dict[str, Any]:
    """The row of `algorithm` from its timed samples (checked first, with --check)."""
    entry = ENTRIES[opts.collective]
    comm = job.communicator
    wrong = 0
    if opts.check:
        case.reset()
        run()
        result = case.result()
        if PLANT_WRONG in os.environ and job.rank == 0 and result.numel():
            result.view(-1)[0] += 1  # test hook: the #wrong column must catch this
        wrong = count_wrong(result, case.expected(), opts.dtype, opts.op)
    everyone = job.bootstrap.all_gather_json({"samples": samples, "wrong": wrong})
    slowest = [max(r["samples"][i] for r in everyone) for i in range(len(samples))]
    time_us = row_time(slowest, opts.timing)
    element = case.work[0].element_size()
    total_bytes = case.count * element
    algbw = total_bytes / time_us / 1e3 if time_us > 0 else 0.0
    topology = comm.topology
    splits = None
    if opts.collective == "all_to_all_v":
        splits = [uneven_splits(job.world_size, r, case.count) for r in range(job.world_size)]
    bound = bound_us(opts.collective, total_bytes, topology, budget, splits, element)
    return {
        "collective": opts.collective,
        "algorithm": algorithm,
        "chosen": chosen,
        "bytes": total_bytes,
        "count": case.count,
        "dtype": opts.dtype,
        "op": opts.op if entry.reduces else None,
        "time_us": round(time_us, 3),
        "median_us": round(statistics.median(slowest), 3),
        "algbw_gbs": round(algbw, 6),
        "busbw_gbs": round(algbw * entry.bus_factor(job.world_size), 6),
        "wrong": sum(r["wrong"] for r in everyone) if opts.check else None,
        "samples_us": [round(s, 3) for s in slowest],
        "iters": len(samples),
        "timing": opts.timing,
        "predicted_us": _predicted(opts.collective, chosen, nbytes, topology, profile,
                                   element) if job.rank == 0 else None,
        "model_pick": _model_pick(opts.collective, nbytes, topology, profile)
        if job.rank == 0 and algorithm == TUNED else None,
        "bound_us": None if bound is None else round(bound, 3),
    }


def row_time(samples: list[float], timing: str) -> float:
    """A row's time from its samples: the median of per-call samples, the mean of batches.

    Per call (a barrier before each), an outlier is mostly the barrier's exit skew, which
    no training loop pays, so the median. Back to back, a batch that a stall lands in is
    what a loop pays too: on the 2x4 cluster a 256 KiB all-to-all `hierarchical_2d` had
    a median batch of 4.6 ms, 3% ahead of `node_leader`, but batches of up to 38 ms and a
    mean of 9.6 ms against 5.0. The tuner ranks batch rows by the same mean
    (`tuner.measured_time`), so the regret sweep judges its picks on what it optimised."""
    return statistics.fmean(samples) if timing == "batch" else statistics.median(samples)


def _time_calls(comm: Any, case: Case, run: Callable[[], None], calls: int) -> list[float]:
    """Microseconds of each call, each after a barrier on fresh input."""
    samples = []
    for _ in range(calls):
        case.reset()
        comm.barrier()
        start = time.perf_counter()
        run()
        samples.append((time.perf_counter() - start) * 1e6)
    return samples


def _batch_count(calls: int) -> int:
    """Up to `BATCHES` batches, at least one call each."""
    return max(1, min(BATCHES, calls))


def _time_batches(comm: Any, case: Case, run: Callable[[], None], collective: str,
                  calls: int, batches: int | None = None) -> list[float]:
    """Microseconds per call of each of `batches` (default: up to `BATCHES`) batches of
    back-to-back calls (`calls` in all: a large size timed three times is three batches
    of one)."""
    batches = _batch_count(calls) if batches is None else batches
    per_batch = max(1, calls // batches)
    refresh = case.reset if collective == "all_reduce" else None  # in place: inputs change
    samples = []
    for _ in range(batches):
        case.reset()
        comm.barrier()
        start = time.perf_counter()
        for _ in range(per_batch):
            if refresh is not None:
                refresh()
            run()
        samples.append((time.perf_counter() - start) * 1e6 / per_batch)
    return samples


def _predicted(collective: str, algorithm: str, nbytes: int, topology: Topology,
               profile: Profile | None, itemsize: int) -> float | None:
    if profile is None or algorithm == NATIVE:
        return None
    value = predict(collective, algorithm, nbytes, topology, profile, itemsize)
    return None if value is None else round(value, 3)


def _model_pick(collective: str, nbytes: int, topology: Topology, profile: Profile | None
                ) -> str | None:
    if profile is None:
        return None
    ranked = rank_candidates(collective, nbytes, topology, profile)
    return ranked[0][0] if ranked else None


def sweep_profile(job: Job, opts: BenchOptions) -> Profile | None:
    """The figures predicted_us comes from: --profile, else the tuning table's own."""
    if opts.profile:
        return load_profile(opts.profile)
    tuning = job.communicator.tuning
    return getattr(tuning, "profile", None)


def run_sweep(job: Job, opts: BenchOptions, out: TextIO = sys.stdout,
              json_out: TextIO | None = None) -> list[dict[str, Any]]:
    """Run every (size, algorithm); rank 0 prints the table and writes JSON lines."""
    lead = job.rank == 0
    topology = job.communicator.topology
    context = {
        "transport": job.transport,
        "intra": job.intra,
        "launcher": job.launcher,
        "world_size": job.world_size,
        "layout": list(topology.layout),
        "topology": {**topology.to_dict(), "fingerprint": topology.fingerprint},
        "versions": job.versions(),
        "warmup": opts.warmup,
    }
    if lead:
        timing = ", back-to-back batches" if opts.timing == "batch" else ""
        out.write(f"# topocoll bench: {opts.collective} over {job.transport} "
                  f"(intra {job.intra}), {topology.describe()}{timing}\n")
        out.write(_format_row(COLUMNS) + "\n")
        out.flush()
    budget = link_budget(topology)
    context["link_budget"] = None if budget is None else {
        "rate_bytes_per_s": budget.rate_bytes_per_s, "burst_bytes": budget.burst_bytes,
        "source": budget.source}
    profile = sweep_profile(job, opts)
    rows = []
    total = len(opts.sizes) * len(opts.algorithms)
    with _progress(lead and total > 1, total) as advance:
        for nbytes in opts.sizes:
            if opts.timing == "batch":  # algorithms in turns (see measure_interleaved)
                measured = measure_interleaved(job, opts, nbytes, opts.algorithms, budget,
                                               profile)
            else:
                measured = [measure(job, opts, nbytes, a, budget, profile)
                            for a in opts.algorithms]
            for algorithm, row in zip(opts.algorithms, measured):
                advance()
                if row is None:
                    if lead:
                        out.write(f"# {algorithm}: not supported by {job.transport}\n")
                    continue
                row = {**row, **context}
                rows.append(row)
                if lead:
                    out.write(_format_row(_table_cells(row)) + "\n")
                    out.flush()
                    if json_out is not None:
                        json_out.write(json.dumps(row, sort_keys=True) + "\n")
                        json_out.flush()
    if lead:
        for section in (format_regret(regret_rows(rows)), format_accuracy(rows)):
            if section:
                out.write(section + "\n")
        out.flush()
    return rows


def _table_cells(row: dict[str, Any]) -> tuple[str, ...]:
    bound = row.get("bound_us")
    name = row["algorithm"]
    if row.get("chosen") and row["chosen"] != name:
        name = f"{name}:{row['chosen']}"
    return (
        format_size(row["bytes"]), str(row["count"]), row["dtype"], row["op"] or "none", name,
        f"{row['time_us']:.1f}", f"{row['algbw_gbs']:.3f}", f"{row['busbw_gbs']:.3f}",
        "-" if row["wrong"] is None else str(row["wrong"]),
        "-" if bound is None else f"{bound:.1f}",
        "-" if not bound else f"{100.0 * bound / row['time_us']:.0f}",
    )


_WIDTHS = (8, 10, 9, 6, 34, 12, 12, 12, 7, 11, 7)


def _format_row(cells: tuple[str, ...]) -> str:
    return "".join(c.rjust(w) if i != 4 else "  " + c.ljust(w - 2)
                   for i, (c, w) in enumerate(zip(cells, _WIDTHS)))


@contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Callable[[], None]]:
    """A progress bar on stderr (rich if installed, else nothing)."""
    if not enabled:
        yield lambda: None
        return
    try:
        from rich.console import Console
        from rich.progress import Progress
    except ImportError:
        yield lambda: None
        return
    with Progress(transient=True, console=Console(stderr=True)) as progress:
        task = progress.add_task("benchmark", total=total)
        yield lambda: progress.advance(task)
