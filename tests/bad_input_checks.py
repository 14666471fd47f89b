"""Bad inputs on every collective, run on every rank of one job; results per case to files.

Run as each rank of a job started by our local launcher (odd world sizes welcome):
    python tests/bad_input_checks.py MODE OUTDIR
MODE is `comm` (the Communicator on Gloo + shared memory), `debug` (the same with
TOPOCOLL_DEBUG=1: every bad call comes right after a good call of the same signature, so
only the every-call check can catch it) or `backend` (torch.distributed on
backend="topocoll"). Every case runs inside one try/except on every rank; the rank
records what happened (error type and message, seconds taken, whether its tensors are
unchanged) into OUTDIR/MODE-rank<R>.json after each case, so a hang still leaves the
cases before it. `tests/test_bad_inputs.py` asserts on those records. After the bad
cases, good calls must still give right answers (nothing was left half-sent) and the
process must exit 0.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

BAD = 1  # the rank that makes the mistake: a middle rank, neither first nor last
K = 4  # elements (rows) per rank block
TIMEOUT = 30.0  # the communicator's timeout: every error must come within TIMEOUT + 10 s
COLLECTIVES = ("all_reduce", "all_to_all", "all_to_all_v", "reduce_scatter", "all_gather",
               "broadcast")
BACKEND_COLLECTIVES = COLLECTIVES[:5]  # broadcast is delegated to Gloo by the backend


def split(src: int, dst: int) -> int:
    """Rows `src` sends to `dst` in the all-to-all-v cases (uneven, never zero)."""
    return (src + 2 * dst) % 3 + 1


@dataclass
class Call:
    """One collective call, ready to run, and the tensors it must leave unchanged."""

    run: Callable[[], Any]
    tensors: list[torch.Tensor]


@dataclass
class Args:
    """How one rank calls a collective; a case changes some fields on some ranks."""

    k: int = K
    dtype: torch.dtype = torch.float32
    out_dtype: torch.dtype | None = None
    out_k: int | None = None
    op: str = "sum"
    algorithm: str | None = None
    device: str = "cpu"
    strided: bool = False
    root: int = 0
    in_rows: int | None = None  # all-to-all(-v): input rows, if not from the splits
    in_splits: list[Any] | None = None  # all_to_all_v: overrides the correct splits
    extra_to_first: int = 0  # all_to_all_v: this rank sends more rows to rank 0
    collective: str | None = None  # call another collective than the case's


@dataclass(frozen=True)
class Case:
    name: str
    collectives: tuple[str, ...]
    expect: dict[str, tuple[str, ...]] | tuple[str, ...]
    bad: Callable[[str, int, int], dict[str, Any]]  # (collective, rank, p) -> Args fields
    modes: tuple[str, ...] = ("comm",)
    error: str = "CollectiveError"  # the class every rank must raise (or a subclass)

    def words(self, collective: str) -> tuple[str, ...]:
        if isinstance(self.expect, dict):
            return self.expect[collective]
        return self.expect


def only(rank_fields: dict[str, Any]) -> Callable[[str, int, int], dict[str, Any]]:
    """The mistake on rank BAD only."""
    return lambda c, rank, p: rank_fields if rank == BAD else {}


def everywhere(rank_fields: dict[str, Any]) -> Callable[[str, int, int], dict[str, Any]]:
    return lambda c, rank, p: rank_fields


def _size(collective: str, rank: int, p: int) -> dict[str, Any]:
    if rank != BAD:
        return {}
    return {"extra_to_first": 1} if collective == "all_to_all_v" else {"k": K + 1}


_ALGOS = {"all_reduce": ("recursive_doubling", "ring"), "all_to_all": ("pairwise", "bruck"),
          "all_to_all_v": ("pairwise", "bruck"), "reduce_scatter": ("direct", "ring"),
          "all_gather": ("direct", "ring")}
_SPLIT_COLLECTIVES = ("all_to_all_v",)
_REDUCING = ("all_reduce", "reduce_scatter")

CASES: list[Case] = [
    Case("size", COLLECTIVES,
         {**{c: ("ranks disagree on the", "count", "rank 1 has") for c in COLLECTIVES},
          "all_to_all_v": ("split sizes do not match",
                           "rank 1 sends 3 row(s) to rank 0, which expects 2")},
         _size, ("comm", "debug", "backend"), "MismatchError"),
    Case("dtype", COLLECTIVES, ("ranks disagree on the dtype", "rank 1 has float64"),
         only({"dtype": torch.float64}), ("comm", "debug", "backend"), "MismatchError"),
    Case("splits_sum", _SPLIT_COLLECTIVES, ("split sizes", "sum to", "(rank 1)"),
         only({"in_splits": [1, 1, 1]}), ("comm", "backend")),
    Case("rows_not_divisible", ("all_to_all",), ("not divisible by 3 ranks", "(rank 1)"),
         only({"in_rows": 3 * K + 1}), ("comm", "backend")),
    Case("splits_negative", _SPLIT_COLLECTIVES, ("must not be negative", "(rank 1)"),
         only({"in_splits": "negative"}), ("comm", "backend")),
    Case("splits_non_integer", _SPLIT_COLLECTIVES, ("must be integers", "(rank 1)"),
         only({"in_splits": "float"})),
    Case("splits_entries", _SPLIT_COLLECTIVES, ("2 entries for 3 ranks", "(rank 1)"),
         only({"in_splits": "short"})),
    Case("non_contiguous", COLLECTIVES, ("not contiguous", "(rank 1)"),
         only({"strided": True}), ("comm", "backend")),
    Case("avg_int", _REDUCING, ("'avg' is not defined", "int64", "(ranks 0..2)"),
         everywhere({"dtype": torch.int64, "op": "avg"}), ("comm", "backend")),
    Case("unknown_op", _REDUCING, ("unsupported reduce op 'xor'", "(rank 1)"),
         only({"op": "xor"})),
    Case("op_mismatch", _REDUCING, ("ranks disagree on the reduce op", "rank 1 has max"),
         only({"op": "max"}), ("comm", "debug"), "MismatchError"),
    Case("unsupported_dtype", COLLECTIVES, ("unsupported dtype int8", "(ranks 0..2)"),
         everywhere({"dtype": torch.int8})),
    Case("in_out_dtype", ("all_to_all", "all_to_all_v", "reduce_scatter", "all_gather"),
         ("input is float32 but output is float64", "(rank 1)"),
         only({"out_dtype": torch.float64})),
    Case("out_size", ("reduce_scatter", "all_gather"), ("expected 3 x", "(rank 1)"),
         only({"out_k": K + 1})),
    Case("meta_device", COLLECTIVES, ("device 'meta'", "(rank 1)"),
         only({"device": "meta"}), ("comm", "backend")),
    Case("algorithm_mismatch", tuple(_ALGOS),
         ("ranks disagree on the algorithm", "rank 1 has"),
         lambda c, rank, p: {"algorithm": _ALGOS[c][rank == BAD]}, ("comm", "debug"),
         "MismatchError"),
    Case("unknown_algorithm", tuple(_ALGOS), ("nope", "(rank 1)"),
         only({"algorithm": "nope"})),
    Case("root_mismatch", ("broadcast",), ("ranks disagree on the root", "rank 1 has 1"),
         only({"root": 1}), ("comm", "debug"), "MismatchError"),
    Case("root_out_of_range", ("broadcast",), ("root 3 is not a rank", "(ranks 0..2)"),
         everywhere({"root": 3})),
    Case("other_collective", ("all_reduce",),
         ("ranks called different collectives", "rank 1 called all_gather"),
         only({"collective": "all_gather"}), ("comm", "debug"), "MismatchError"),
]


def cases_for(mode: str) -> list[tuple[Case, str]]:
    allowed = BACKEND_COLLECTIVES if mode == "backend" else COLLECTIVES
    return [(case, c) for case in CASES if mode in case.modes
            for c in case.collectives if c in allowed]


# ----- building the tensors of one call ------------------------------------------------
def data(n: int, args: Args, rank: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    dtype = dtype or args.dtype
    if args.device == "meta":
        return torch.empty(n, dtype=dtype, device="meta")
    values = (torch.arange(n) % 7 + 1 + 10 * rank).to(dtype)
    if args.strided:  # same values, every other element of a buffer twice as long
        buf = torch.zeros(2 * n, dtype=dtype)
        buf[::2] = values
        return buf[::2]
    return values


def empty_out(n: int, args: Args) -> torch.Tensor:
    dtype = args.out_dtype or args.dtype
    if args.device == "meta":
        return torch.empty(n, dtype=dtype, device="meta")
    return torch.full((n,), -7, dtype=dtype)


def a2av_splits(args: Args, rank: int, p: int) -> tuple[list[Any], list[int], int]:
    """(input splits as passed, output splits, input rows)."""
    send = [split(rank, j) for j in range(p)]
    send[0] += args.extra_to_first
    rows = args.in_rows if args.in_rows is not None else sum(send)
    given: list[Any] = send
    if args.in_splits == "negative":
        given = [send[0] + 1, -1, *send[2:]]
    elif args.in_splits == "float":
        given = [float(s) for s in send]
    elif args.in_splits == "short":
        given = send[:2]
    elif args.in_splits is not None:
        given = args.in_splits
    return given, [split(j, rank) for j in range(p)], rows


class Tensors:
    """The tensors of one call of `collective`, with `args`, on `rank` of `p`."""

    def __init__(self, collective: str, args: Args, rank: int, p: int) -> None:
        self.collective = collective
        self.in_splits: list[Any] | None = None
        self.out_splits: list[int] | None = None
        k, out_k = args.k, args.out_k or args.k
        if collective in ("all_reduce", "broadcast"):
            self.inp = data(p * k if collective == "all_reduce" else k, args, rank)
            self.out = self.inp
        elif collective == "all_gather":
            self.inp, self.out = data(k, args, rank), empty_out(p * out_k, args)
        elif collective == "reduce_scatter":
            self.inp, self.out = data(p * k, args, rank), empty_out(out_k, args)
        elif collective == "all_to_all":
            self.inp = data(args.in_rows or p * k, args, rank)
            self.out = empty_out(p * k, args)
        else:
            self.in_splits, self.out_splits, rows = a2av_splits(args, rank, p)
            self.inp, self.out = data(rows, args, rank), empty_out(sum(self.out_splits), args)

    def all(self) -> list[torch.Tensor]:
        return [self.inp] if self.out is self.inp else [self.inp, self.out]


def comm_call(comm: Any, collective: str, args: Args, rank: int, p: int) -> Call:
    t = Tensors(collective, args, rank, p)
    algo = {"algorithm": args.algorithm}
    runs: dict[str, Callable[[], Any]] = {
        "all_reduce": lambda: comm.all_reduce(t.inp, args.op, **algo),
        "broadcast": lambda: comm.broadcast(t.inp, args.root),
        "all_gather": lambda: comm.all_gather(t.out, t.inp, **algo),
        "reduce_scatter": lambda: comm.reduce_scatter(t.out, t.inp, args.op, **algo),
        "all_to_all": lambda: comm.all_to_all_v(t.out, t.inp, **algo),
        "all_to_all_v": lambda: comm.all_to_all_v(t.out, t.inp, t.out_splits, t.in_splits,
                                                  **algo),
    }
    return Call(runs[collective], t.all())


def backend_call(collective: str, args: Args, rank: int, p: int) -> Call:
    import torch.distributed as dist

    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "avg": dist.ReduceOp.AVG}
    t = Tensors(collective, args, rank, p)
    runs: dict[str, Callable[[], Any]] = {
        "all_reduce": lambda: dist.all_reduce(t.inp, op=ops[args.op]),
        "all_gather": lambda: dist.all_gather_into_tensor(t.out, t.inp),
        "reduce_scatter": lambda: dist.reduce_scatter_tensor(t.out, t.inp, op=ops[args.op]),
        "all_to_all": lambda: dist.all_to_all_single(t.out, t.inp),
        "all_to_all_v": lambda: dist.all_to_all_single(t.out, t.inp, t.out_splits,
                                                       t.in_splits),
    }
    return Call(runs[collective], t.all())


# ----- running cases -------------------------------------------------------------------
def _snapshot(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t if t.device.type == "meta" else t.clone() for t in tensors]


def _unchanged(before: list[torch.Tensor], after: list[torch.Tensor]) -> bool:
    for a, b in zip(before, after):
        if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
            return False
        if b.device.type != "meta" and not torch.equal(a, b):
            return False
    return True


@dataclass
class Recorder:
    path: Path
    rank: int
    records: list[dict[str, Any]] = field(default_factory=list)

    def run(self, case: str, collective: str, make: Callable[[], Call]) -> None:
        record: dict[str, Any] = {"case": case, "collective": collective, "rank": self.rank}
        start = time.monotonic()
        try:
            call = make()
            before = _snapshot(call.tensors)
            try:
                call.run()
                record["raised"] = None
            except Exception as exc:  # every error is a result here, reported per case
                record["raised"] = type(exc).__name__
                record["classes"] = [c.__name__ for c in type(exc).__mro__]
                record["message"] = str(exc)
            record["unchanged"] = _unchanged(before, call.tensors)
        except Exception as exc:  # the harness itself failed to build the call
            record["raised"] = "harness:" + type(exc).__name__
            record["message"] = str(exc)
        record["seconds"] = time.monotonic() - start
        self.add(record)

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self.path.write_text(json.dumps(self.records, indent=1))


def expect_result(recorder: Recorder, name: str, got: torch.Tensor, want: torch.Tensor
                  ) -> None:
    ok = got.shape == want.shape and torch.equal(got, want)
    recorder.add({"case": "after", "collective": name, "rank": recorder.rank, "raised": None,
                  "ok": ok, "message": "" if ok else f"got {got.tolist()}, want "
                                                    f"{want.tolist()}"})


def healthy_afterwards(recorder: Recorder, comm: Any, rank: int, p: int) -> None:
    """After every refused call: the communicator still gives right answers, and a
    repeated signature is a cache hit (one cross-rank check, not two)."""
    ranks = torch.arange(p, dtype=torch.float32)
    x = torch.full((5,), float(rank + 1))
    comm.all_reduce(x)
    expect_result(recorder, "all_reduce", x, torch.full((5,), float(p * (p + 1) / 2)))
    before = comm.agreement.exchanges
    comm.all_reduce(torch.ones(6))
    comm.all_reduce(torch.ones(6))
    per_call = 2 if comm.agreement.debug else 1
    recorder.add({"case": "after", "collective": "fast_path", "rank": rank, "raised": None,
                  "ok": comm.agreement.exchanges - before == per_call,
                  "message": f"{comm.agreement.exchanges - before} cross-rank checks for two "
                             f"calls of one signature, expected {per_call}"})
    out = torch.empty(p * 2)
    comm.all_gather(out, torch.full((2,), float(rank)))
    expect_result(recorder, "all_gather", out, ranks.repeat_interleave(2))
    send = [split(rank, j) for j in range(p)]
    recv = [split(j, rank) for j in range(p)]
    got = torch.empty(sum(recv))
    comm.all_to_all_v(got, torch.full((sum(send),), float(rank)), recv, send)
    want = torch.cat([torch.full((recv[j],), float(j)) for j in range(p)])
    expect_result(recorder, "all_to_all_v", got, want)
    b = torch.full((3,), float(rank))
    comm.broadcast(b, root=p - 1)
    expect_result(recorder, "broadcast", b, torch.full((3,), float(p - 1)))
    # A local mistake in a call whose signature is cached: refused at once, no exchange.
    if not comm.agreement.debug:
        before = comm.agreement.exchanges
        recorder.run("cached_non_contiguous", "all_reduce",
                     lambda: comm_call(comm, "all_reduce", Args(k=2, strided=True), rank, p))
        recorder.records[-1]["exchanges"] = comm.agreement.exchanges - before
        recorder.add(recorder.records.pop())


def run_comm(mode: str, out: Path) -> None:
    from topocoll.comm.job import init_job

    job = init_job("gloo", "shm", timeout=TIMEOUT)
    comm, rank, p = job.communicator, job.rank, job.world_size
    recorder = Recorder(out / f"{mode}-rank{rank}.json", rank)
    try:
        for case, collective in cases_for(mode):
            def make(case: Case = case, collective: str = collective) -> Call:
                args = Args(**case.bad(collective, rank, p))
                return comm_call(comm, args.collective or collective, args, rank, p)

            if mode == "debug":  # the same signature just passed: only debug re-checks it
                comm_call(comm, collective, Args(**case.bad(collective, 0, p)), rank, p).run()
            recorder.run(case.name, collective, make)
        healthy_afterwards(recorder, comm, rank, p)
    finally:
        job.close()


def run_backend(out: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("topocoll", timeout=timedelta(seconds=TIMEOUT))
    rank, p = dist.get_rank(), dist.get_world_size()
    recorder = Recorder(out / f"backend-rank{rank}.json", rank)
    try:
        for case, collective in cases_for("backend"):
            recorder.run(case.name, collective, lambda case=case, collective=collective:
                         backend_call(collective, Args(**case.bad(collective, rank, p)),
                                      rank, p))
        x = torch.full((5,), float(rank + 1))
        dist.all_reduce(x)
        expect_result(recorder, "all_reduce", x, torch.full((5,), float(p * (p + 1) / 2)))
        out_t = torch.empty(2 * p)
        dist.all_to_all_single(out_t, torch.full((2 * p,), float(rank)))
        expect_result(recorder, "all_to_all", out_t,
                      torch.arange(p, dtype=torch.float32).repeat_interleave(2))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    if mode == "debug" and os.environ.get("TOPOCOLL_DEBUG") != "1":
        raise SystemExit("debug mode needs TOPOCOLL_DEBUG=1 in the environment")
    if mode == "backend":
        run_backend(out)
    else:
        run_comm(mode, out)
    print(f"BAD-INPUT-CHECKS DONE mode={mode}", flush=True)


if __name__ == "__main__":
    main()
