"""UCX transport: real processes on localhost, rendezvous through a torch TCPStore.

The parent test process is the store's master (port 0: the OS picks a free port) and the
spawned ranks connect as clients. Every rank checks its own data and reports through a
queue; the parent bounds every child's run and kills what is left.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta

import pytest
import torch

from topocoll.comm.transports import ucx as ucx_transport

# The transport's defaults go into the environment before ucxx is first imported here,
# exactly as the constructor would do; the spawned ranks inherit them.
for _key, _value in ucx_transport.ENV_DEFAULTS.items():
    os.environ.setdefault(_key, _value)
pytest.importorskip("ucxx._lib.libucxx",
                    reason="ucxx cannot be imported: pip install 'topocoll[ucx]'")

from topocoll.comm.bootstrap import LocalBootstrap, StoreBootstrap  # noqa: E402
from topocoll.comm.transports.base import Handle, TransportError  # noqa: E402
from topocoll.comm.transports.ucx import UCXTransport  # noqa: E402

pytestmark = pytest.mark.multiprocess

CHILD_TIMEOUT = 60.0  # seconds for all ranks of one test; a healthy run takes a few
WAIT = 20.0  # seconds for one handle
SIZES = (0, 1, 7, 1000003)  # elements
DTYPES = (torch.uint8, torch.float32, torch.bfloat16, torch.int64, torch.float16)


def _pattern(seed: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    """Random bytes, none zero (so an untouched buffer never passes), viewed as `dtype`."""
    size = torch.empty(0, dtype=dtype).element_size()
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(1, 256, (count * size,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _wait_all(handles: list[Handle]) -> None:
    """Poll every handle with `test()`, as the executor does."""
    deadline = time.monotonic() + WAIT
    pending = list(handles)
    while pending:
        pending = [h for h in pending if not h.test()]
        if pending and time.monotonic() > deadline:
            raise TimeoutError("; ".join(h.describe() for h in pending))
        time.sleep(0)


def _pair_checks(t: UCXTransport) -> None:
    """Ranks 0 and 1: odd sizes and dtypes both ways, several tags in one phase."""
    if t.rank > 1:
        return
    peer = 1 - t.rank
    for i, (count, dtype) in enumerate((c, d) for c in SIZES for d in DTYPES):
        mine, theirs = _pattern(1000 * t.rank + i, count, dtype), _pattern(1000 * peer + i,
                                                                             count, dtype)
        got = torch.zeros_like(theirs)
        _wait_all([t.irecv(got, peer, tag=i), t.isend(mine, peer, tag=i)])
        assert _same_bytes(got, theirs), f"{count} x {dtype} from rank {peer} differs"
    # Rank 0 sends tags 3, 1, 2, then two messages on tag 5; rank 1 posts its receives in
    # another order before waiting. Each must land by tag, and tag 5 in send order.
    # (tag, seed); the seed is also the length, so crossed messages would not even fit.
    order = [(3, 11), (1, 13), (2, 17), (5, 19), (5, 23)]
    if t.rank == 0:
        _wait_all([t.isend(_pattern(seed, seed, torch.float32), 1, tag) for tag, seed in order])
    else:
        recv_order = [(5, 19), (1, 13), (5, 23), (2, 17), (3, 11)]
        bufs = [torch.zeros(seed, dtype=torch.float32) for _, seed in recv_order]
        _wait_all([t.irecv(b, 0, tag) for b, (tag, _) in zip(bufs, recv_order)])
        for b, (tag, seed) in zip(bufs, recv_order):
            assert _same_bytes(b, _pattern(seed, seed, torch.float32)), f"tag {tag} crossed"


def _ring_checks(t: UCXTransport) -> None:
    """Every rank posts isend to the next and irecv from the previous, then polls both."""
    n = t.world_size
    nxt, prev = (t.rank + 1) % n, (t.rank - 1) % n
    got = torch.zeros(4099, dtype=torch.bfloat16)
    _wait_all([t.isend(_pattern(t.rank, 4099, torch.bfloat16), nxt, tag=42),
               t.irecv(got, prev, tag=42)])
    assert _same_bytes(got, _pattern(prev, 4099, torch.bfloat16))
    if n > 2:  # same tag from two senders: a receive matches only its own sender
        if t.rank == 0:
            a, b = torch.zeros(100, dtype=torch.int64), torch.zeros(100, dtype=torch.int64)
            _wait_all([t.irecv(b, 2, tag=7), t.irecv(a, 1, tag=7)])
            assert _same_bytes(a, _pattern(71, 100, torch.int64))
            assert _same_bytes(b, _pattern(72, 100, torch.int64))
        elif t.rank in (1, 2):
            _wait_all([t.isend(_pattern(70 + t.rank, 100, torch.int64), 0, tag=7)])


def _scenario_all(t: UCXTransport) -> None:
    _pair_checks(t)
    _ring_checks(t)
    for _ in range(3):
        t.barrier()
    assert t.version().startswith("ucxx ")


def _scenario_dead_peer(t: UCXTransport) -> None:
    """Rank 1 leaves without a word; rank 0's receive from it fails instead of hanging."""
    t.barrier()
    if t.rank == 1:
        time.sleep(0.3)  # let rank 0 take the barrier message first
        os._exit(0)
    handle = t.irecv(torch.zeros(10), 1, tag=0)
    with pytest.raises(TransportError, match=r"rank 0: ucx recv from rank 1 \(40 bytes"):
        _wait_all([handle])


SCENARIOS: dict[str, Callable[[UCXTransport], None]] = {
    "all": _scenario_all,
    "dead_peer": _scenario_dead_peer,
}


def _rank_main(scenario: str, rank: int, world: int, port: int, results: mp.Queue) -> None:
    try:
        from torch.distributed import TCPStore

        store = TCPStore("127.0.0.1", port, world, False, timeout=timedelta(seconds=30))
        transport = UCXTransport(StoreBootstrap(store, rank, world), timeout=WAIT)
        SCENARIOS[scenario](transport)
        start = time.monotonic()
        transport.close()
        transport.close()  # idempotent
        assert time.monotonic() - start < 5.0, "close() took too long"
        results.put((rank, "ok"))
    except BaseException:
        results.put((rank, traceback.format_exc()))
        raise


def _run(scenario: str, world: int, expect_ok: tuple[int, ...] | None = None) -> None:
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, None, True, timeout=timedelta(seconds=30),
                     wait_for_workers=False)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(scenario, r, world, store.port, results),
                         daemon=True) for r in range(world)]
    expect = tuple(range(world)) if expect_ok is None else expect_ok
    reports: dict[int, str] = {}
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + CHILD_TIMEOUT
        while len(reports) < len(expect) and time.monotonic() < deadline:
            try:
                rank, report = results.get(timeout=0.2)
                reports[rank] = report
            except queue.Empty:
                if all(not p.is_alive() for p in procs) and results.empty():
                    break
        for p in procs:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        assert not hung, f"ranks {hung} still running after {CHILD_TIMEOUT:.0f} s: {reports}"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=5)
        results.close()
        del store
    for rank in expect:
        assert reports.get(rank) == "ok", f"rank {rank}: {reports.get(rank, 'no report')}"
        assert procs[rank].exitcode == 0, f"rank {rank} exit code {procs[rank].exitcode}"


@pytest.mark.parametrize("world", [2, 3])
def test_exchange_between_processes(world: int) -> None:
    _run("all", world)


def test_dead_peer_fails_fast() -> None:
    _run("dead_peer", 2, expect_ok=(0,))


def test_local_errors_and_describe() -> None:
    """One rank, messages to itself: failures are TransportErrors naming rank and peer."""
    t = UCXTransport(LocalBootstrap())
    try:
        got = torch.zeros(7, dtype=torch.bfloat16)
        recv = t.irecv(got, 0, tag=1)
        assert "recv from rank 0 (14 bytes, tag 1)" in recv.describe()
        _wait_all([recv, t.isend(_pattern(5, 7, torch.bfloat16), 0, tag=1)])
        assert _same_bytes(got, _pattern(5, 7, torch.bfloat16))
        small = t.irecv(torch.zeros(2, dtype=torch.int32), 0, tag=2)
        send = t.isend(torch.ones(4, dtype=torch.int32), 0, tag=2)
        with pytest.raises(TransportError, match=r"rank 0: ucx recv from rank 0 \(8 bytes"):
            _wait_all([small])
        _wait_all([send])
        with pytest.raises(TransportError, match="tag"):
            t.isend(torch.ones(1), 0, tag=ucx_transport.BARRIER_TAG)
        with pytest.raises(TransportError, match="contiguous"):
            t.isend(torch.ones(4, 4).t(), 0, tag=3)
        with pytest.raises(TransportError, match="peer 1"):
            t.isend(torch.ones(1), 1, tag=3)
        t.barrier()
    finally:
        t.close()
        t.close()
    with pytest.raises(TransportError, match="closed"):
        t.isend(torch.ones(1), 0, tag=1)


def test_env_defaults_and_missing_ucxx(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UCX_TLS", "rc,self")  # a user's choice wins over our default
    monkeypatch.delenv("UCX_RNDV_FRAG_MEM_TYPE", raising=False)
    ucx_transport.load_ucxx()
    assert os.environ["UCX_TLS"] == "rc,self"
    assert os.environ["UCX_RNDV_FRAG_MEM_TYPE"] == "host"
    monkeypatch.setitem(sys.modules, "ucxx._lib.libucxx", None)
    with pytest.raises(ImportError, match=r"pip install 'topocoll\[ucx\]'"):
        UCXTransport(LocalBootstrap())
