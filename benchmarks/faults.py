"""Fault injection: kill one rank inside a collective; every survivor must fail, in time.

The promise under test (issue #9): when a peer dies, every surviving rank raises our
error (`CollectiveTimeoutError`, or a `TransportError` naming the collective, the phase
and the peer) within the timeout plus 10 s, and can then exit cleanly; nothing hangs.

One trial = one job of `--ranks` ranks (4) on one transport. Every rank loops the same
random calls (a shared seed: the same algorithm and size on every rank, call by call);
after a random delay the victim rank waits until it is inside a collective and kills
itself (SIGKILL, or `os._exit` from a thread: no cleanup either way). Each survivor
records the error it got and the time, releases what it holds without talking to any
peer (`Job.abort`), and exits through the normal interpreter shutdown. The harness bounds
every trial (the whole job is killed past its budget), removes the job's shared-memory
segments, and checks that no process of the job is left.

    python -m topocoll.benchmarks.faults --transport gloo --collective all_reduce \\
        --trials 20 --timeout 5 --json faults.jsonl

MPI jobs run under `mpirun --with-ft ulfm`: without it Open MPI's runtime kills every
rank as soon as one dies, so no survivor could report anything (see `transports/mpi.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .launcher import kill_all

TRANSPORTS = ("gloo", "shm", "ucx", "mpi")
COLLECTIVES = ("all_reduce", "all_to_all")
# Which algorithms a trial draws from (per call, the same on every rank).
ALGORITHM_MODES = ("random", "any", "default")
EXPECTED_ERRORS = ("CollectiveTimeoutError", "TransportError")
SLACK_S = 10.0  # the promise: every survivor raises within timeout + 10 s of the kill
STARTUP_S = 90.0  # budget for starting 4 ranks on a loaded 2-core machine (torch import)
EXIT_NO_ERROR = 3  # a survivor whose loop ended without any error


@dataclass(frozen=True)
class FaultOptions:
    transport: str = "gloo"
    collective: str = "all_reduce"
    timeout: float = 5.0
    ranks: int = 4
    algorithm: str = "random"
    max_bytes: int = 1 << 20
    kill: str = "sigkill"  # sigkill | exit | random
    intra: str = "same"
    delay_min: float = 0.2  # seconds after the first completed call
    delay_max: float = 1.5


@dataclass
class RankOutcome:
    rank: int
    role: str  # victim | survivor
    error_type: str | None = None
    message: str | None = None
    kill_to_error_s: float | None = None
    exit_code: int | None = None
    calls: int | None = None
    exit_s: float | None = None  # from the error to the process being gone (local runs)


@dataclass
class TrialResult:
    trial: int
    transport: str
    collective: str
    seed: int
    victim: int
    timeout: float
    kill: dict[str, Any] | None
    ranks: list[RankOutcome]
    ok: bool = False
    problems: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    segments_left: int = 0  # by the dead rank; removed by the harness
    segments_after_cleanup: int = 0
    leaked_pids: list[int] = field(default_factory=list)
    overrun: bool = False
    # MPI: survivors whose MPI_Finalize hung on the dead rank and were ended by the
    # watchdog of `MPITransport.finalize_bounded` (status 0, after its limit).
    finalize_watchdog: int = 0


# ----- the rank side ------------------------------------------------------------------

def algorithm_pool(collective: str, mode: str, transport: str) -> list[str | None]:
    """What each call may run: our schedules (`random`), plus the library's own
    collective where the transport has one (`any`), or the built-in choice (`default`)."""
    from topocoll.comm.algorithms import algorithm_names

    if mode == "default":
        return [None]
    if mode not in ("random", "any"):
        return [mode]  # one forced name
    names: list[str | None] = list(algorithm_names(collective))
    if mode == "any" and transport in ("gloo", "mpi"):
        names.append("native")
    return names


def _call_plan(rng: random.Random, opts: FaultOptions, pool: Sequence[str | None],
               world: int) -> tuple[str | None, int]:
    """(algorithm, elements): all_to_all elements are per peer, odd sizes and 0 included."""
    algorithm = rng.choice(pool)
    if opts.collective == "all_to_all":
        return algorithm, rng.randint(0, max(opts.max_bytes // 4 // world, 1))
    return algorithm, rng.randint(1, max(opts.max_bytes // 4, 1))


def _write_json(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, sort_keys=True))
    os.replace(tmp, path)


def _killer(rank: int, delay: float, how: str, in_call: threading.Event,
            state: dict[str, Any], out: Path) -> None:
    """Sleep `delay`, wait until the main thread is inside a collective, then die."""
    time.sleep(delay)
    in_call.wait()
    record = {"rank": rank, "kill_time": time.time(), "how": how, **state}
    _write_json(out / "victim.json", record)
    if how == "exit":
        os._exit(137)
    os.kill(os.getpid(), signal.SIGKILL)


def run_rank(args: argparse.Namespace) -> int:
    """One rank of a trial; writes `rank<r>.json` into `args.out`."""
    import torch

    from topocoll.comm.job import init_job

    torch.set_num_threads(1)
    opts = FaultOptions(**json.loads(args.options))
    out = Path(args.out)
    job = init_job(opts.transport, opts.intra, opts.timeout, args.launcher)
    rank, world = job.rank, job.world_size
    comm = job.communicator
    rng = random.Random(args.seed)  # same draws on every rank: the calls match
    pool = algorithm_pool(opts.collective, opts.algorithm, opts.transport)
    in_call = threading.Event()
    state: dict[str, Any] = {}
    record: dict[str, Any] = {"rank": rank, "role": "victim" if rank == args.victim
                              else "survivor", "pid": os.getpid()}
    give_up = time.monotonic() + STARTUP_S + opts.delay_max + 2 * opts.timeout + 2 * SLACK_S
    calls = 0
    try:
        while time.monotonic() < give_up:
            algorithm, elements = _call_plan(rng, opts, pool, world)
            state.update(call=calls, algorithm=algorithm or "default", elements=elements)
            in_call.set()
            if opts.collective == "all_reduce":
                comm.all_reduce(torch.ones(elements), "sum", algorithm=algorithm)
            else:
                comm.all_to_all_v(torch.empty(elements * world), torch.ones(elements * world),
                                  algorithm=algorithm)
            in_call.clear()
            calls += 1
            if calls == 1 and rank == args.victim:  # connections are up: start the clock
                threading.Thread(target=_killer, daemon=True,
                                 args=(rank, args.delay, args.how, in_call, state, out)).start()
    except Exception as exc:  # what the survivor got is the result, whatever it is
        record.update(error_time=time.time(), error_type=type(exc).__name__,
                      message=str(exc), calls=calls)
        _write_json(out / f"rank{rank}.json", record)  # first: abort() may end the process
        job.abort()
        return 0
    record.update(error_type=None, message=None, calls=calls)
    _write_json(out / f"rank{rank}.json", record)
    job.abort()
    return EXIT_NO_ERROR


# ----- the harness side ---------------------------------------------------------------

def _rank_argv(opts: FaultOptions, launcher: str, out: Path, seed: int, victim: int,
               delay: float, how: str, trial_id: str) -> list[str]:
    return ["-m", "topocoll.benchmarks.faults", "rank", "--launcher", launcher,
            "--options", json.dumps(asdict(opts), sort_keys=True), "--out", str(out),
            "--seed", str(seed), "--victim", str(victim), "--delay", f"{delay:.3f}",
            "--how", how, "--trial-id", trial_id]


def _processes_with(marker: str) -> list[int]:
    """Live (not zombie) processes whose command line holds `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if marker.encode() in cmdline and stat[stat.rfind(")") + 2:].split()[0] != "Z":
            found.append(int(entry.name))
    return found


def _run_local(opts: FaultOptions, argv: list[str], job: str, budget: float, out: Path
               ) -> tuple[list[int | None], dict[int, float], bool]:
    """Start the ranks ourselves (a rank's death must not take the others down, unlike
    `launch_local`); returns exit codes, when each rank was seen gone, and overrun."""
    from .launcher import local_job_env, loopback_store

    store = loopback_store(opts.ranks, budget)
    base = local_job_env(opts.ranks, store.port, job)
    procs: list[subprocess.Popen] = []
    gone: dict[int, float] = {}
    overrun = False
    try:
        for rank in range(opts.ranks):
            env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            with open(out / f"rank{rank}.log", "w") as log:
                procs.append(subprocess.Popen([sys.executable, *argv], env=env, stdout=log,
                                              stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL,
                                              start_new_session=True))
        deadline = time.monotonic() + budget
        while len(gone) < len(procs):
            for rank, proc in enumerate(procs):
                if rank not in gone and proc.poll() is not None:
                    gone[rank] = time.time()
            if time.monotonic() > deadline:
                overrun = True
                break
            time.sleep(0.02)
    finally:
        kill_all(procs)
        del store
    return [p.returncode for p in procs], gone, overrun


def _run_mpirun(opts: FaultOptions, argv: list[str], job: str, budget: float, out: Path
                ) -> tuple[list[int | None], dict[int, float], bool]:
    """Under `mpirun --with-ft ulfm`; per-rank exit codes are not visible, so every rank
    gets mpirun's own (0 only if every survivor exited 0)."""
    from topocoll.comm.transports.mpirun import TIMEOUT_RC, run_mpirun

    env = {**os.environ, "TOPOCOLL_JOB_ID": job, "OMP_NUM_THREADS": "1"}
    result = run_mpirun(opts.ranks, argv, budget, extra=["-x", "TOPOCOLL_JOB_ID", "-x",
                                                         "OMP_NUM_THREADS"],
                        env=env, fault_tolerant=True)
    (out / "mpirun.log").write_text(f"$ {' '.join(result.args)}\n--- stdout\n{result.stdout}"
                                    f"\n--- stderr\n{result.stderr}")
    return [result.returncode] * opts.ranks, {}, result.returncode == TIMEOUT_RC


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_trial(opts: FaultOptions, trial: int, seed: int, workdir: Path) -> TrialResult:
    """One job, one victim; every survivor judged against the promise."""
    from topocoll.comm.transports.shm import remove_segments, stale_segments

    rng = random.Random(seed)
    victim = rng.randrange(opts.ranks)
    delay = rng.uniform(opts.delay_min, opts.delay_max)
    how = rng.choice(("sigkill", "exit")) if opts.kill == "random" else opts.kill
    trial_id = uuid.uuid4().hex[:12]
    job = trial_id  # also the shared-memory segment prefix
    out = workdir / f"trial{trial:03d}"
    out.mkdir(parents=True, exist_ok=True)
    launcher = "mpirun" if opts.transport == "mpi" else "torchrun"
    argv = _rank_argv(opts, launcher, out, seed, victim, delay, how, trial_id)
    budget = STARTUP_S + delay + opts.timeout + SLACK_S + opts.timeout + 30.0
    start = time.monotonic()
    run = _run_mpirun if opts.transport == "mpi" else _run_local
    codes, gone, overrun = run(opts, argv, job, budget, out)
    wall = time.monotonic() - start
    left = len(stale_segments(job))
    remove_segments(job)
    kill = _read(out / "victim.json")
    result = TrialResult(trial, opts.transport, opts.collective, seed, victim, opts.timeout,
                         kill, [], wall_s=round(wall, 2), segments_left=left,
                         segments_after_cleanup=len(stale_segments(job)), overrun=overrun)
    log = out / "mpirun.log"
    if log.exists():
        from topocoll.comm.transports.mpi import FINALIZE_STUCK

        result.finalize_watchdog = log.read_text(errors="replace").count(FINALIZE_STUCK)
    time.sleep(0.2)  # let the kernel finish reaping what was just killed
    result.leaked_pids = _processes_with(trial_id)
    for rank in range(opts.ranks):
        result.ranks.append(_outcome(rank, victim, kill, _read(out / f"rank{rank}.json"),
                                     codes[rank], gone.get(rank)))
    result.problems = judge(result, opts)
    result.ok = not result.problems
    return result


def _outcome(rank: int, victim: int, kill: dict[str, Any] | None,
             record: dict[str, Any] | None, code: int | None, gone: float | None
             ) -> RankOutcome:
    outcome = RankOutcome(rank, "victim" if rank == victim else "survivor", exit_code=code)
    if record is None:
        return outcome
    outcome.error_type, outcome.message = record.get("error_type"), record.get("message")
    outcome.calls = record.get("calls")
    if kill is not None and record.get("error_time") is not None:
        outcome.kill_to_error_s = round(record["error_time"] - kill["kill_time"], 3)
    if gone is not None and record.get("error_time") is not None:
        outcome.exit_s = round(gone - record["error_time"], 3)
    return outcome


def judge(result: TrialResult, opts: FaultOptions) -> list[str]:
    """Every way this trial broke the promise, one line each (empty: it kept it)."""
    where = f"trial {result.trial} ({opts.transport}, {opts.collective}, victim rank " \
            f"{result.victim}, seed {result.seed})"
    problems = []
    if result.overrun:
        problems.append(f"{where}: the job overran its budget and was killed")
    if result.kill is None:
        problems.append(f"{where}: the victim never reached its kill point")
    for r in result.ranks:
        if r.role == "victim":
            continue
        who = f"{where}: survivor rank {r.rank}"
        if r.error_type is None:
            problems.append(f"{who} raised nothing (exit {r.exit_code})")
            continue
        if r.error_type not in EXPECTED_ERRORS:
            problems.append(f"{who} raised {r.error_type}, not one of {EXPECTED_ERRORS}: "
                            f"{r.message}")
        message = r.message or ""
        if opts.collective not in message:
            problems.append(f"{who}: the error does not name {opts.collective}: {message}")
        if r.kill_to_error_s is None or r.kill_to_error_s > opts.timeout + SLACK_S:
            problems.append(f"{who} raised {r.kill_to_error_s} s after the kill, more than "
                            f"timeout + {SLACK_S:.0f} s")
        if r.exit_code != 0:
            problems.append(f"{who} exited with {r.exit_code}, not 0")
    if result.leaked_pids:
        problems.append(f"{where}: processes left running: {result.leaked_pids}")
    if result.segments_after_cleanup:
        problems.append(f"{where}: {result.segments_after_cleanup} shared-memory segments "
                        "could not be removed")
    return problems


def format_trial(result: TrialResult) -> list[str]:
    """Table rows: one per rank."""
    lines = []
    for r in result.ranks:
        message = (r.message or "-").replace("\n", " ")
        lines.append(f"{result.trial:5d} {r.rank:4d} {r.role:8s} {r.error_type or '-':24s} "
                     f"{_num(r.kill_to_error_s):>8s} {_num(r.exit_s):>7s} "
                     f"{'-' if r.exit_code is None else r.exit_code:>4} {message[:110]}")
    return lines


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def run_trials(opts: FaultOptions, trials: int, seed: int, json_path: str | None = None,
               workdir: str | None = None, echo: bool = True, parallel: int = 1
               ) -> list[TrialResult]:
    """`trials` trials (`parallel` jobs at a time: each is its own job, store, ports and
    segments); prints the table and writes one JSON line per trial, in trial order."""
    base = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="topocoll-faults-"))
    results = []
    sink = open(json_path, "w") if json_path else None  # noqa: SIM115
    pool = ThreadPoolExecutor(max_workers=max(parallel, 1))
    try:
        if echo:
            print(f"# faults: {opts.transport} {opts.collective}, {opts.ranks} ranks, timeout "
                  f"{opts.timeout:g} s, algorithms {opts.algorithm}, kill {opts.kill}, seed "
                  f"{seed}; logs in {base}", flush=True)
            print(f"{'trial':>5s} {'rank':>4s} {'role':8s} {'error':24s} {'kill->err':>8s} "
                  f"{'exit_s':>7s} {'code':>4s} message", flush=True)
        futures = [pool.submit(run_trial, opts, trial, seed + trial, base)
                   for trial in range(trials)]
        for future in futures:
            result = future.result()
            results.append(result)
            if echo:
                print("\n".join(format_trial(result)), flush=True)
                for problem in result.problems:
                    print(f"  PROBLEM: {problem}", flush=True)
            if sink is not None:
                sink.write(json.dumps(asdict(result), sort_keys=True) + "\n")
                sink.flush()
    finally:
        pool.shutdown(wait=True)
        if sink is not None:
            sink.close()
    if echo:
        print(summary(results, opts), flush=True)
    return results


def summary(results: Sequence[TrialResult], opts: FaultOptions) -> str:
    good = sum(r.ok for r in results)
    waits = [o.kill_to_error_s for r in results for o in r.ranks
             if o.role == "survivor" and o.kill_to_error_s is not None]
    worst = f"; kill->error max {max(waits):.2f} s, median " \
            f"{sorted(waits)[len(waits) // 2]:.2f} s" if waits else ""
    verdict = ("every survivor raised within timeout+10 s and exited cleanly"
               if good == len(results) else "FAILED")
    watchdog = sum(r.finalize_watchdog for r in results)
    stuck = (f"; MPI_Finalize hung and its watchdog ended {watchdog} survivor(s) in "
             f"{sum(r.finalize_watchdog > 0 for r in results)} trial(s)" if watchdog else "")
    return (f"{good}/{len(results)} trials ({opts.transport}, {opts.collective}): {verdict}"
            f"{worst}{stuck}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m topocoll.benchmarks.faults",
                                description="Kill one rank inside a collective; check that "
                                            "every survivor raises in time and exits.")
    p.add_argument("--transport", choices=TRANSPORTS, default="gloo")
    p.add_argument("--collective", choices=COLLECTIVES, default="all_reduce")
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--timeout", type=float, default=5.0, help="the collectives' timeout (s)")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--algorithm", default="random",
                   help="random (our schedules), any (plus native), default (the "
                        "library's choice), or one algorithm name")
    p.add_argument("--max-bytes", type=int, default=1 << 20)
    p.add_argument("--kill", choices=("sigkill", "exit", "random"), default="sigkill")
    p.add_argument("--intra", choices=("same", "shm"), default="same",
                   help="same: all traffic on --transport (default); shm: shared memory "
                        "inside the node")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", default=None, metavar="FILE", help="one JSON line per trial")
    p.add_argument("--workdir", default=None, help="per-trial logs (default: a temp dir)")
    p.add_argument("--parallel", type=int, default=1,
                   help="trials run at the same time (separate jobs; default 1)")
    return p


def _rank_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m topocoll.benchmarks.faults rank")
    p.add_argument("--launcher", choices=("torchrun", "mpirun"), required=True)
    p.add_argument("--options", required=True, help="FaultOptions as JSON")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--victim", type=int, required=True)
    p.add_argument("--delay", type=float, required=True)
    p.add_argument("--how", choices=("sigkill", "exit"), required=True)
    p.add_argument("--trial-id", required=True, help="marks the job's processes")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["rank"]:
        return run_rank(_rank_parser().parse_args(argv[1:]))
    args = _parser().parse_args(argv)
    opts = FaultOptions(transport=args.transport, collective=args.collective,
                        timeout=args.timeout, ranks=args.ranks, algorithm=args.algorithm,
                        max_bytes=args.max_bytes, kill=args.kill, intra=args.intra)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    results = run_trials(opts, args.trials, seed, args.json, args.workdir,
                         parallel=args.parallel)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
