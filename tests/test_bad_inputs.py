"""Bad input on every collective: a clear error on every rank, never a hang or a dead
process, and every rank's tensors unchanged (issue #9, part 2).

Three jobs of 3 ranks (an odd count) run every case of `tests/bad_input_checks.py` once
each and record per case and rank what happened; the parametrized tests below assert on
those records, one (case, collective) per test:
- `comm`: the Communicator on Gloo + shared memory, nodes of 2 and 1 ranks;
- `debug`: TOPOCOLL_DEBUG=1 on one node (pairwise and recursive doubling over shared
  memory), each bad call right after a good call of the same signature;
- `backend`: torch.distributed with backend="topocoll".
Then the unit tests of `comm/validation.py`'s pure functions and its cache.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from topocoll.benchmarks.launcher import launch_local
from topocoll.comm.validation import (
    SIGNATURE_BYTES,
    Agreement,
    CollectiveError,
    MismatchError,
    Signature,
    decode,
    disagreement,
    encode,
    op_problem,
    pair_problem,
    parse_splits,
    rank_list,
    split_disagreement,
    supported_devices,
    tensor_problem,
)

CHECKS = Path(__file__).with_name("bad_input_checks.py")
_spec = importlib.util.spec_from_file_location("bad_input_checks", CHECKS)
checks = importlib.util.module_from_spec(_spec)
sys.modules["bad_input_checks"] = checks
_spec.loader.exec_module(checks)

RANKS = 3
JOBS = {  # mode -> environment of its job
    "comm": {"TOPOCOLL_TOPOLOGY": "2,1"},
    "debug": {"TOPOCOLL_TOPOLOGY": "3", "TOPOCOLL_DEBUG": "1"},
    "backend": {},
}
_results: dict[str, dict[tuple[str, str, int], dict[str, Any]]] = {}


def job_records(mode: str, out: Path) -> dict[tuple[str, str, int], dict[str, Any]]:
    """Run the mode's job once (per test session) and index its records."""
    if mode not in _results:
        result = launch_local(RANKS, [str(CHECKS), mode, str(out)], timeout=100,
                              env=JOBS[mode])
        records: dict[tuple[str, str, int], dict[str, Any]] = {}
        for rank in range(RANKS):
            path = out / f"{mode}-rank{rank}.json"
            for rec in json.loads(path.read_text()) if path.exists() else []:
                records[rec["case"], rec["collective"], rank] = rec
        records["launch", "", -1] = {"returncode": result.returncode,
                                     "failed_rank": result.failed_rank,
                                     "stderr": result.stderr_tail}
        _results[mode] = records
    return _results[mode]


@pytest.fixture(scope="module")
def outdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bad-inputs")


PARAMS = [(mode, case, collective) for mode in JOBS
          for case, collective in checks.cases_for(mode)]


@pytest.mark.multiprocess
@pytest.mark.timeout(150)
@pytest.mark.parametrize("mode, case, collective", PARAMS,
                         ids=[f"{m}-{c.name}-{col}" for m, c, col in PARAMS])
def test_every_rank_refuses_bad_input(mode, case, collective, outdir):
    records = job_records(mode, outdir)
    for rank in range(RANKS):
        rec = records.get((case.name, collective, rank))
        where = f"{mode}: rank {rank}: case {case.name} on {collective}"
        assert rec is not None, (f"{where}: no record (the job hung or died before it):\n"
                                 f"{records['launch', '', -1]}")
        assert rec["raised"] is not None, f"{where}: the call returned without an error"
        assert case.error in rec.get("classes", []), (
            f"{where}: raised {rec['raised']}, expected {case.error}: {rec['message']}")
        message = rec["message"]
        assert message.startswith(f"rank {rank}: "), f"{where}: message names no rank: {message}"
        for word in case.words(collective):
            assert word in message, f"{where}: {word!r} not in the message: {message}"
        assert rec["seconds"] < checks.TIMEOUT + 10, f"{where}: took {rec['seconds']:.1f} s"
        assert rec["unchanged"], f"{where}: the call changed its tensors"


@pytest.mark.multiprocess
@pytest.mark.timeout(150)
@pytest.mark.parametrize("mode", list(JOBS))
def test_job_is_healthy_after_the_bad_calls_and_exits_cleanly(mode, outdir):
    """Good calls after all the refused ones give right answers (nothing was left
    half-sent), a repeated signature is checked once (debug: every call), and every
    rank exits 0."""
    records = job_records(mode, outdir)
    launch = records["launch", "", -1]
    assert launch["returncode"] == 0, (f"{mode}: rank {launch['failed_rank']} exited "
                                       f"{launch['returncode']}:\n{launch['stderr']}")
    after = [(key, rec) for key, rec in records.items() if key[0] == "after"]
    assert len(after) == RANKS * (2 if mode == "backend" else 5), sorted(records)
    for (_, what, rank), rec in after:
        assert rec["ok"], f"{mode}: rank {rank}: {what} after the bad calls: {rec['message']}"
    if mode == "comm":  # a local mistake in a cached signature: refused without a check
        for rank in range(RANKS):
            rec = records["cached_non_contiguous", "all_reduce", rank]
            assert rec["raised"] == "CollectiveError" and rec["exchanges"] == 0, (rank, rec)


# ----- unit tests of comm/validation.py ------------------------------------------------
@pytest.mark.parametrize("ranks, text", [
    ([2], "rank 2"), ([0, 1], "ranks 0, 1"), ([0, 1, 2], "ranks 0..2"),
    ([5, 0, 2, 3, 4], "ranks 0, 2..5"), ([0, 2, 4, 5, 6, 9], "ranks 0, 2, 4..6, 9"),
])
def test_rank_list(ranks, text):
    assert rank_list(ranks) == text


@pytest.mark.parametrize("splits, rows, expected, problem", [
    (None, 6, [2, 2, 2], None),
    (None, 7, [], "not divisible by 3 ranks"),
    ([1, 2, 3], 6, [1, 2, 3], None),
    ([0, 0, 0], 0, [0, 0, 0], None),
    ([np.int64(1), torch.tensor(2), 3], 6, [1, 2, 3], None),
    ([1, 2], 3, [], "2 entries for 3 ranks"),
    ([1, 2, 2], 6, [], "sum to 5 but the input has 6 rows"),
    ([4, -1, 3], 6, [], "must not be negative"),
    ([1.0, 2, 3], 6, [], "must be integers"),
    ([True, 2, 3], 6, [], "must be integers"),
    (["1", 2, 3], 6, [], "must be integers"),
])
def test_parse_splits(splits, rows, expected, problem):
    values, got = parse_splits("input", rows, splits, 3)
    assert values == expected, (splits, values)
    assert (got is None) if problem is None else (problem in got), (splits, got)


@pytest.mark.parametrize("make, words", [
    (lambda: torch.ones(4), None),
    (lambda: torch.ones(0), None),
    (lambda: torch.ones(4, 2)[:, 0], "not contiguous"),
    (lambda: torch.ones(4, dtype=torch.int8), "unsupported dtype int8"),
    (lambda: torch.ones(4, dtype=torch.complex64), "unsupported dtype complex64"),
    (lambda: torch.empty(4, device="meta"), "device 'meta'"),
])
def test_tensor_problem(make, words):
    problem = tensor_problem(make(), "input", ("cpu",))
    assert (problem is None) if words is None else (words in problem), problem


def test_tensor_problem_names_the_device_a_cuda_only_communicator_moves():
    assert "moves cuda tensors" in tensor_problem(torch.ones(2), "input", ("cuda",))


@pytest.mark.parametrize("op, dtype, words", [
    ("sum", torch.int32, None), ("avg", torch.bfloat16, None),
    ("avg", torch.int64, "'avg' is not defined"), ("xor", torch.float32, "'xor'"),
    (3, torch.float32, "must be a string"), ("sum", torch.int8, None),  # dtype: elsewhere
])
def test_op_problem(op, dtype, words):
    problem = op_problem(op, dtype)
    assert (problem is None) if words is None else (words in problem), problem


def test_pair_problem():
    assert pair_problem(torch.ones(2), torch.ones(6)) is None
    assert "input is float32 but output is int64" in pair_problem(
        torch.ones(2), torch.ones(2, dtype=torch.int64))
    assert "output is on meta" in pair_problem(torch.ones(2), torch.empty(2, device="meta"))


def test_supported_devices():
    class T:
        def __init__(self, name: str) -> None:
            self.name = name

    assert supported_devices([T("shm"), T("gloo")]) == ("cpu",)
    assert supported_devices([T("gloo")]) == ("cpu", "cuda")
    assert supported_devices([T("nccl")]) == ("cuda",)
    assert supported_devices([T("shm"), T("nccl")]) == ("cpu", "cuda")  # none in common


SIG = Signature("all_reduce", torch.float32, 1000, "sum", -1, 1, "ring", "cpu")


def _records(*pairs: tuple[Signature, str | None]) -> list[dict[str, Any] | None]:
    return [decode(encode(sig, problem)) for sig, problem in pairs]


def test_signature_round_trips_in_fixed_size():
    values = encode(SIG, None)
    assert len(values) * 8 == SIGNATURE_BYTES
    assert decode(values) == {"collective": "all_reduce", "dtype": "float32", "count": 1000,
                              "op": "sum", "root": -1, "row": 1, "algorithm": "ring",
                              "device": "cpu", "problem": None}
    long = decode(encode(SIG._replace(algorithm="x" * 3000), "\"é" * 2000))
    assert len(encode(SIG, "y" * 5000)) * 8 == SIGNATURE_BYTES
    assert long["problem"].endswith("...") and long["algorithm"].endswith("...")
    assert decode([0] * 128) is None and decode([-1] * 128) is None
    assert decode(encode(SIG, None)[:5] + [0] * 123) is None


@pytest.mark.parametrize("others, words", [
    ([SIG, SIG], None),
    ([SIG._replace(count=999), SIG], "element count: ranks 0, 2 have 1000, rank 1 has 999"),
    ([SIG._replace(dtype=torch.float64), SIG], "dtype: ranks 0, 2 have float32, rank 1 has "
                                               "float64"),
    ([SIG._replace(op="max"), SIG._replace(op="max")], "reduce op: rank 0 has sum, ranks "
                                                       "1, 2 have max"),
    ([SIG._replace(device="meta"), SIG], "device type"),
    ([SIG._replace(algorithm="tree"), SIG], "algorithm: ranks 0, 2 have ring, rank 1 has "
                                            "tree"),
    ([SIG._replace(collective="all_gather"), SIG], "ranks called different collectives"),
])
def test_disagreement_names_ranks_and_what_differs(others, words):
    text = disagreement(_records((SIG, None), *((s, None) for s in others)))
    assert (text is None) if words is None else (words in text), text


def test_disagreement_reports_the_cause_not_the_algorithm_it_changed():
    text = disagreement(_records((SIG, None), (SIG._replace(count=7, algorithm="tree"), None)))
    assert "element count" in text and "algorithm" not in text


def test_disagreement_relays_each_refusal_with_its_ranks():
    text = disagreement(_records((SIG, "bad A"), (SIG, None), (SIG, "bad A"),
                                 (SIG._replace(count=1), "bad B")))
    assert text == "bad A (ranks 0, 2); bad B (rank 3)"
    assert "rank 1 sent no readable" in disagreement([decode(encode(SIG, None)), None])


def test_disagreement_per_collective_fields():
    a2av = SIG._replace(collective="all_to_all_v", count=-1, op="", row=4)
    assert disagreement(_records((a2av, None), (a2av._replace(row=5), None))) \
        == "ranks disagree on the elements per row: rank 0 has 4, rank 1 has 5"
    bcast = SIG._replace(collective="broadcast", op="", algorithm="tree", root=0)
    assert "root: rank 0 has 0, rank 1 has 2" in disagreement(
        _records((bcast, None), (bcast._replace(root=2), None)))


def test_split_disagreement():
    send = [[1, 2, 0], [3, 4, 5], [0, 0, 6]]
    recv = [[1, 3, 0], [2, 4, 0], [0, 5, 6]]  # recv[j][i] == send[i][j]
    assert split_disagreement(send, recv) is None
    recv[0][1] = 9
    assert split_disagreement(send, recv) == ("split sizes do not match between ranks: rank 1 "
                                              "sends 3 row(s) to rank 0, which expects 9")
    many = split_disagreement([[1] * 3] * 3, [[2] * 3] * 3, shown=2)
    assert many.endswith("(and 7 more pair(s))")


class FakeJob:
    """The gather of a 3-rank job seen from rank 0: the others send `peers`' records."""

    def __init__(self, peers: list[tuple[Signature, str | None]]) -> None:
        self.peers = peers
        self.calls = 0

    def __call__(self, values: list[int], what: str) -> list[list[int]]:
        self.calls += 1
        if len(values) != len(encode(SIG, None)):  # the split-size gather
            return [values, *[values] * len(self.peers)]
        return [values, *[encode(sig, problem) for sig, problem in self.peers]]


def test_agreement_checks_a_signature_once_then_is_a_dict_lookup():
    job = FakeJob([(SIG, None), (SIG, None)])
    agreement = Agreement(0, job)
    assert agreement.check(SIG, None) is True
    agreement.remember(SIG)
    for _ in range(3):
        assert agreement.check(SIG, None) is False
    assert job.calls == agreement.exchanges == 1
    debug = Agreement(0, job, debug=True)
    for _ in range(3):
        debug.check(SIG, None)
        debug.remember(SIG)
    assert debug.exchanges == 3


def test_agreement_raises_on_every_disagreement_and_caches_nothing_then():
    agreement = Agreement(0, FakeJob([(SIG._replace(count=3), None), (SIG, None)]))
    for _ in range(2):
        with pytest.raises(MismatchError, match=r"^rank 0: all_reduce: ranks disagree on the "
                                                r"element count: ranks 0, 2 have 1000"):
            agreement.check(SIG, None)
    assert agreement.exchanges == 2


def test_agreement_relays_a_peers_refusal_as_collective_error():
    agreement = Agreement(0, FakeJob([(SIG, "the input is not contiguous"), (SIG, None)]))
    with pytest.raises(CollectiveError, match=r"not contiguous \(rank 1\)") as info:
        agreement.check(SIG, None)
    assert not isinstance(info.value, MismatchError)


def test_agreement_refuses_a_cached_local_mistake_without_a_check():
    job = FakeJob([(SIG, None), (SIG, None)])
    agreement = Agreement(0, job)
    agreement.check(SIG, None)
    agreement.remember(SIG)
    with pytest.raises(CollectiveError, match=r"^rank 0: all_reduce: bad$"):
        agreement.check(SIG, "bad")
    assert job.calls == 1


def test_agreement_keeps_the_local_reason_when_the_check_itself_fails():
    def gather(values: list[int], what: str) -> list[list[int]]:
        raise TimeoutError(f"{what} timed out")

    with pytest.raises(CollectiveError, match=r"negative split .*all_reduce input check timed"):
        Agreement(0, gather).check(SIG, "negative split")
    with pytest.raises(TimeoutError):
        Agreement(0, gather).check(SIG, None)


def test_agreement_cache_is_bounded():
    agreement = Agreement(0, FakeJob([]), capacity=4)
    for count in range(10):
        sig = SIG._replace(count=count)
        agreement.check(sig, None)
        agreement.remember(sig)
    assert agreement.due(SIG._replace(count=5)) is True
    assert agreement.due(SIG._replace(count=9)) is False


def test_agreement_split_check():
    agreement = Agreement(0, FakeJob([(SIG, None)]))  # the peer sends what we send
    send, recv = agreement.check_splits("all_to_all_v", [3, 3], [3, 3])
    assert send == [[3, 3], [3, 3]] and recv == [[3, 3], [3, 3]]
    with pytest.raises(MismatchError, match=r"rank 0 sends 2 row.s. to rank 1, which expects 1"):
        agreement.check_splits("all_to_all_v", [1, 2], [1, 2])
