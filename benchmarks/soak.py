"""`topocoll bench --soak MINUTES`: random collectives for minutes, every result verified.

The size sweep checks each algorithm at a few shapes chosen in advance; a soak looks for
what those miss: a call shape no sweep tried (odd or zero sizes, uneven all-to-all-v
splits with empty peers, a reduce-scatter block of 0 elements), a state left behind by
one call that breaks the next (a ring position, a cached schedule, a tag reused across
algorithms), rounding that only shows in some dtype/op pairs. Every rank draws the same
call from one seeded RNG (lockstep, no coordination per call): collective, algorithm
(every applicable one, `native` where the transport has one, and the library's default
choice), dtype, op and size (log-uniform from 0 to `TOPOCOLL_SOAK_MAX_BYTES`, 4 MiB by
default, so most calls are small and some are large). Each rank generates every rank's
input from the call's seed (`comm.reference.random_inputs`), runs the call through the
Communicator, and compares its own output with the numpy reference
(`comm.reference.compare`: exact for integers, min and max; a summation-error bound for
floating sums). Outputs start filled with a sentinel, so an element nobody wrote is
caught, and a NaN or infinity counts as wrong.

At the end rank 0 prints, per (collective, algorithm): calls, calls with a mismatch on any
rank, wrong elements summed over ranks, errors; the exit status is 1 if anything
mismatched. A call that fails on a transport without a native collective is counted as
unsupported and that pair is dropped from the draw; any other error ends the soak (the job
is no longer in step) with that error.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np
import torch

from topocoll.comm.algorithms import NATIVE, algorithm_names
from topocoll.comm.collectives import CollectiveSpec
from topocoll.comm.job import Job
from topocoll.comm.ops import DTYPES
from topocoll.comm.reference import abs_bound, compare, random_inputs, reference
from topocoll.comm.transports.base import NotSupportedError

COLLECTIVES = ("all_reduce", "all_to_all", "all_to_all_v", "reduce_scatter", "all_gather",
               "broadcast")
SOAK_DTYPES = ("int32", "int64", "float32", "float64", "bfloat16", "float16")
TORCH_DTYPES = {"int32": torch.int32, "int64": torch.int64, "float32": torch.float32,
                "float64": torch.float64, "bfloat16": torch.bfloat16,
                "float16": torch.float16}
REDUCING = ("all_reduce", "reduce_scatter")
NATIVE_TRANSPORTS = ("gloo", "mpi", "nccl")  # transports with native collectives
MAX_BYTES_ENV = "TOPOCOLL_SOAK_MAX_BYTES"
SEED_ENV = "TOPOCOLL_SOAK_SEED"
DEFAULT_MAX_BYTES = 4 << 20
STOP_CHECK_EVERY = 8  # calls between the ranks' agreement on whether time is up
SENTINEL = 1000  # what outputs start as; no reference value comes near it


@dataclass(frozen=True)
class Call:
    """One drawn call: what every rank runs at this step."""

    index: int
    seed: int
    collective: str
    algorithm: str | None  # None: the library's default choice
    dtype: str
    op: str
    spec: CollectiveSpec


@dataclass
class Tally:
    calls: int = 0
    mismatches: int = 0  # calls with at least one wrong element on this rank
    wrong: int = 0  # wrong elements on this rank
    errors: int = 0
    unsupported: int = 0
    bytes: int = 0


@dataclass
class SoakState:
    tallies: dict[tuple[str, str], Tally] = field(default_factory=dict)
    first_mismatch: dict[str, Any] | None = None

    def tally(self, collective: str, algorithm: str) -> Tally:
        return self.tallies.setdefault((collective, algorithm), Tally())


def _log_uniform(rng: random.Random, top: int) -> int:
    """An integer in [0, top], log-uniform: as many calls below 1 KiB as in 1-4 MiB."""
    if top <= 0:
        return 0
    return min(int(2 ** rng.uniform(0, math.log2(top + 1))) - 1, top)


def algorithm_choices(collective: str, transport: str) -> list[str | None]:
    """Every algorithm of the collective, `native` where it exists, and the default
    (broadcast has one algorithm and no choice: `Communicator.broadcast` takes none)."""
    names: list[str | None] = list(algorithm_names(collective))
    if collective == "broadcast":
        return names
    names.append(None)
    if transport in NATIVE_TRANSPORTS:
        names.append(NATIVE)
    return names


def draw(rng: random.Random, index: int, world: int, transport: str, max_bytes: int,
         dropped: set[tuple[str, str | None]]) -> Call:
    """The next call; the same on every rank given the same RNG state and `dropped`."""
    collective = rng.choice(COLLECTIVES)
    dtype = rng.choice(SOAK_DTYPES)
    info = DTYPES[dtype]
    ops = ["sum", "prod", "min", "max"] + (["avg"] if info.is_float else [])
    op = rng.choice(ops) if collective in REDUCING else "sum"
    choices = [a for a in algorithm_choices(collective, transport)
               if (collective, a) not in dropped]
    algorithm = rng.choice(choices)
    elements = _log_uniform(rng, max_bytes // info.itemsize)
    p = world
    if collective == "all_reduce":
        spec = CollectiveSpec.all_reduce(p, elements, op)
    elif collective == "reduce_scatter":
        spec = CollectiveSpec.reduce_scatter(p, elements // p, op)
    elif collective == "all_gather":
        spec = CollectiveSpec.all_gather(p, elements // p)
    elif collective == "broadcast":
        spec = CollectiveSpec.broadcast(p, elements, rng.randrange(p))
    elif collective == "all_to_all":
        spec = CollectiveSpec.all_to_all(p, elements // (p * p))
    else:  # uneven splits, about a quarter of them empty (MoE-like)
        mean = max(elements // (p * p), 1)
        spec = CollectiveSpec.all_to_all_v(
            [[0 if rng.random() < 0.25 else rng.randint(0, 2 * mean) for _ in range(p)]
             for _ in range(p)])
    return Call(index, rng.getrandbits(32), collective, algorithm, dtype, op, spec)


def _tensor(values: np.ndarray, dtype: str) -> torch.Tensor:
    """Exact: bfloat16 inputs are float32 already rounded to bfloat16."""
    return torch.from_numpy(np.ascontiguousarray(values)).to(TORCH_DTYPES[dtype])


def _output(count: int, dtype: str) -> torch.Tensor:
    return torch.full((count,), SENTINEL, dtype=TORCH_DTYPES[dtype])


def run_call(job: Job, call: Call, inputs: Sequence[np.ndarray]) -> torch.Tensor:
    """Run `call` on this rank through the Communicator; returns this rank's output."""
    comm, rank, spec = job.communicator, job.rank, call.spec
    mine = _tensor(inputs[rank], call.dtype)
    if call.collective == "all_reduce":
        return comm.all_reduce(mine.clone(), call.op, algorithm=call.algorithm)
    if call.collective == "broadcast":
        return comm.broadcast(mine.clone(), spec.root)
    out = _output(spec.output_count(rank), call.dtype)
    if call.collective == "reduce_scatter":
        return comm.reduce_scatter(out, mine, call.op, algorithm=call.algorithm)
    if call.collective == "all_gather":
        return comm.all_gather(out, mine, algorithm=call.algorithm)
    if call.collective == "all_to_all":
        return comm.all_to_all_v(out, mine, algorithm=call.algorithm)
    send = list(spec.matrix[rank])
    recv = [spec.matrix[src][rank] for src in range(spec.world_size)]
    return comm.all_to_all_v(out, mine, recv, send, algorithm=call.algorithm)


def check(call: Call, rank: int, inputs: Sequence[np.ndarray], result: torch.Tensor
          ) -> tuple[int, float]:
    """(wrong elements, max error) of this rank's `result` against the reference."""
    expected = reference(call.spec, list(inputs))[rank]
    rounds = DTYPES[call.dtype].is_float and call.op not in ("min", "max")
    bound = (abs_bound(call.spec, list(inputs))[rank] if rounds  # only rounding needs it
             else np.zeros(expected.shape))
    wide = torch.float64 if DTYPES[call.dtype].is_float else torch.int64
    actual = result.reshape(-1).to(wide).numpy()
    mismatch = compare(actual, expected, bound, call.dtype, call.op, call.spec.world_size)
    wrong = mismatch.wrong
    if DTYPES[call.dtype].is_float and actual.size:
        wrong += int(np.count_nonzero(~np.isfinite(actual)))  # NaN never compares wrong
    return wrong, mismatch.max_error


def soak(job: Job, minutes: float, out: TextIO = sys.stdout, json_out: TextIO | None = None,
         seed: int | None = None, max_bytes: int | None = None) -> int:
    """Run the soak on this rank (every rank calls it); rank 0 reports. Exit status."""
    lead = job.rank == 0
    if seed is None:
        seed = int(os.environ.get(SEED_ENV, "0")) or random.SystemRandom().randrange(1 << 31)
    seed = int(job.bootstrap.broadcast_json(seed))
    limit = max_bytes or int(os.environ.get(MAX_BYTES_ENV, DEFAULT_MAX_BYTES))
    rng = random.Random(seed)
    state = SoakState()
    dropped: set[tuple[str, str | None]] = set()
    comm = job.communicator
    if lead:
        out.write(f"# topocoll soak: {job.world_size} ranks over {job.transport} (intra "
                  f"{job.intra}), {minutes:g} min, sizes 0..{limit} bytes, seed {seed} "
                  f"({SEED_ENV}={seed} repeats it)\n")
        out.flush()
    deadline = time.monotonic() + minutes * 60
    started = time.monotonic()
    index = 0
    while True:
        # Every few calls rank 0's clock decides, for every rank, whether time is up.
        if index % STOP_CHECK_EVERY == 0 and job.bootstrap.broadcast_json(
                time.monotonic() >= deadline):
            break
        call = draw(rng, index, job.world_size, job.transport, limit, dropped)
        index += 1
        inputs = random_inputs(call.spec, call.dtype, seed=call.seed)
        label = call.algorithm or "default"
        try:
            result = run_call(job, call, inputs)
        except NotSupportedError:
            dropped.add((call.collective, call.algorithm))
            state.tally(call.collective, label).unsupported += 1
            continue
        except Exception as exc:
            state.tally(call.collective, label).errors += 1
            if lead:
                _report(job, state, out, json_out, seed, minutes, started, gather=False)
            raise RuntimeError(f"rank {job.rank}: soak call {call.index} ({_describe(call)}) "
                               f"failed: {exc}") from exc
        if call.algorithm is None and comm.last_choice is not None:
            label = f"default:{comm.last_choice.algorithm}"
        tally = state.tally(call.collective, label)
        tally.calls += 1
        tally.bytes += int(inputs[job.rank].size) * DTYPES[call.dtype].itemsize
        wrong, max_error = check(call, job.rank, inputs, result)
        if wrong:
            tally.mismatches += 1
            tally.wrong += wrong
            if state.first_mismatch is None:
                state.first_mismatch = {"rank": job.rank, "call": call.index,
                                        "what": _describe(call), "wrong": wrong,
                                        "max_error": max_error, "seed": seed}
    return _report(job, state, out, json_out, seed, minutes, started)


def _describe(call: Call) -> str:
    spec = call.spec
    size = (f"matrix {[list(r) for r in spec.matrix]}" if call.collective == "all_to_all_v"
            else f"count {spec.count or list(spec.counts)}")
    root = f", root {spec.root}" if call.collective == "broadcast" else ""
    return (f"{call.collective} {call.algorithm or 'default'} {call.dtype} {call.op} "
            f"{size}{root}")


def _report(job: Job, state: SoakState, out: TextIO, json_out: TextIO | None, seed: int,
            minutes: float, started: float, gather: bool = True) -> int:
    """Merge every rank's tallies (rank 0 prints) and return the exit status."""
    mine = {f"{c}|{a}": vars(t) for (c, a), t in state.tallies.items()}
    if gather:
        everyone = job.bootstrap.all_gather_json({"tallies": mine,
                                                  "first": state.first_mismatch})
    else:  # after an error: the others may not get here; report what this rank saw
        everyone = [{"tallies": mine, "first": state.first_mismatch}]
    merged: dict[str, Tally] = {}
    for part in everyone:
        for key, values in part["tallies"].items():
            total = merged.setdefault(key, Tally())
            total.calls = max(total.calls, values["calls"])  # the same calls on every rank
            total.mismatches += values["mismatches"]
            total.wrong += values["wrong"]
            total.errors += values["errors"]
            total.unsupported = max(total.unsupported, values["unsupported"])
            total.bytes += values["bytes"]
    firsts = [p["first"] for p in everyone if p["first"]]
    bad = sum(t.mismatches for t in merged.values())
    errors = sum(t.errors for t in merged.values())
    if job.rank != 0:
        return 1 if bad or errors else 0
    elapsed = time.monotonic() - started
    calls = sum(t.calls for t in merged.values())
    out.write(f"{'collective':15s} {'algorithm':32s} {'calls':>7s} {'mismatch':>9s} "
              f"{'wrong':>9s} {'errors':>7s} {'MiB':>9s}\n")
    for key in sorted(merged):
        collective, algorithm = key.split("|", 1)
        t = merged[key]
        out.write(f"{collective:15s} {algorithm:32s} {t.calls:7d} {t.mismatches:9d} "
                  f"{t.wrong:9d} {t.errors:7d} {t.bytes / 2**20:9.1f}"
                  f"{f'  ({t.unsupported} unsupported)' if t.unsupported else ''}\n")
        if json_out is not None:
            json_out.write(json.dumps({
                "soak": True, "collective": collective, "algorithm": algorithm,
                "calls": t.calls, "mismatches": t.mismatches, "wrong": t.wrong,
                "errors": t.errors, "unsupported": t.unsupported, "bytes": t.bytes,
                "transport": job.transport, "intra": job.intra,
                "world_size": job.world_size,
                "layout": list(job.communicator.topology.layout), "seed": seed,
                "minutes": minutes}, sort_keys=True) + "\n")
    verdict = "OK" if not bad and not errors else "FAILED"
    out.write(f"# soak {verdict}: {calls} calls in {elapsed / 60:.1f} min on "
              f"{job.world_size} ranks, {bad} mismatching (rank, call) pairs, {errors} "
              f"errors, seed {seed}\n")
    for first in firsts[:3]:
        out.write(f"# first mismatch on rank {first['rank']}: call {first['call']} "
                  f"({first['what']}): {first['wrong']} wrong, max error "
                  f"{first['max_error']:.3g}\n")
    out.flush()
    if json_out is not None:
        json_out.flush()
    return 1 if bad or errors else 0


__all__ = ["COLLECTIVES", "Call", "algorithm_choices", "check", "draw", "run_call", "soak"]
