"""Bells: waiting ranks sleep until a peer rings, instead of polling.

Checked without timing anything: whether a bell's file descriptor is readable (select
with a zero timeout), who rings whom in the shared-memory transport, and which way the
executor waits (on bells, or by polling when a handle has none).
"""

from __future__ import annotations

import select
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from topocoll.comm import executor as executor_module
from topocoll.comm.executor import Executor, LevelTransports
from topocoll.comm.schedule import RankProgram, Recv, Region
from topocoll.comm.transports.base import Backoff, Handle, Transport
from topocoll.comm.transports.shm import (
    SHM_DIR,
    SharedMemoryTransport,
    remove_segments,
    shm_namespace,
    stale_segments,
)
from topocoll.comm.transports.wakeup import (
    FifoBell,
    FifoRinger,
    PipeBell,
    bells_of,
    sleep_until_rung,
)


def _rung(bell: object) -> bool:
    """Whether the bell's descriptor is readable right now."""
    return bool(select.select([bell], [], [], 0)[0])


def test_pipe_bell_rings_drains_and_ignores_rings_after_close() -> None:
    bell = PipeBell()
    assert not _rung(bell)
    bell.ring()
    assert _rung(bell)
    bell.drain()
    assert not _rung(bell)
    thread = threading.Thread(target=bell.ring, args=("a future",))
    thread.start()
    thread.join(10)
    assert _rung(bell)
    sleep_until_rung([bell], 1.0)  # returns at once and drains
    assert not _rung(bell)
    bell.close()
    bell.ring()  # a late callback: no error, no write into a reused descriptor
    bell.close()


def test_fifo_bell_is_rung_by_another_process(tmp_path: Path) -> None:
    path = tmp_path / "bell"
    bell = FifoBell(path)
    try:
        assert not _rung(bell)
        code = ("import sys; from pathlib import Path; "
                "from topocoll.comm.transports.wakeup import FifoRinger; "
                "FifoRinger().ring(Path(sys.argv[1]))")
        subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=60)
        assert select.select([bell], [], [], 10)[0]
        bell.drain()
        assert not _rung(bell)
    finally:
        bell.close()
    assert not path.exists()


def test_ringer_tolerates_missing_and_closed_bells(tmp_path: Path) -> None:
    ringer = FifoRinger()
    path = tmp_path / "bell"
    ringer.ring(path)  # nobody there yet: nothing to wake, no error
    (tmp_path / "plain").write_text("not a fifo")
    ringer.ring(tmp_path / "plain")
    assert (tmp_path / "plain").read_text() == "not a fifo"
    first = FifoBell(path)
    ringer.ring(path)
    assert _rung(first)
    first.close()
    ringer.ring(path)  # its owner is gone: forgotten, no error
    second = FifoBell(path)
    try:
        ringer.ring(path)
        assert _rung(second)
    finally:
        second.close()
        ringer.close()


def _pair(capacity: int) -> tuple[SharedMemoryTransport, SharedMemoryTransport, str]:
    job = uuid.uuid4().hex[:10]
    hosts = ["h", "h"]
    ns = shm_namespace(job)
    return (SharedMemoryTransport(0, 2, ns, hosts, capacity=capacity),
            SharedMemoryTransport(1, 2, ns, hosts, capacity=capacity), job)


def _finish(*handles: Handle) -> None:
    for _ in range(100_000):
        if all([h.test() for h in handles]):  # a list: test every handle each round
            return
    raise AssertionError("handles did not complete")


def test_shm_sender_rings_receiver_and_small_reads_do_not_ring_back(no_leaked_segments
                                                                     ) -> None:
    sender, receiver, _ = _pair(capacity=4096)
    try:
        rng = np.random.default_rng(5)
        data = torch.from_numpy(rng.standard_normal(37).astype(np.float32))
        out = torch.empty(37)
        assert not _rung(receiver.bell)
        send = sender.isend(data, 1, 7)
        assert send.bell is sender.bell
        assert _rung(receiver.bell)  # the message is in the ring: wake the receiver
        recv = receiver.irecv(out, 0, 7)
        assert recv.bell is receiver.bell
        _finish(send, recv)
        np.testing.assert_array_equal(out.numpy(), data.numpy())
        assert not _rung(sender.bell)  # read whole: its sender finished long ago

        big = torch.from_numpy(rng.standard_normal(3001).astype(np.float32))  # 3 rings
        got = torch.empty(3001)
        send = sender.isend(big, 1, 8)
        recv = receiver.irecv(got, 0, 8)
        assert not send.test()  # blocked on a full ring
        recv.test()  # frees space while the message is unfinished: the sender is waiting
        assert _rung(sender.bell)
        _finish(send, recv)
        np.testing.assert_array_equal(got.numpy(), big.numpy())
    finally:
        sender.close()
        receiver.close()


def test_shm_namespaces_keep_two_communicators_of_a_job_apart() -> None:
    job = uuid.uuid4().hex[:10]
    first, second = shm_namespace(job), shm_namespace(job)
    assert first != second and first.startswith(job + "-") and second.startswith(job + "-")
    a = SharedMemoryTransport(0, 2, first, ["h", "h"])
    b = SharedMemoryTransport(0, 2, second, ["h", "h"])
    try:
        a.isend(torch.ones(3), 1, 1)
        b.isend(torch.ones(3), 1, 1)  # same ranks and tag, another communicator
        names = {p.name for p in stale_segments(job)}
        assert f"topocoll-{first}-0-1-1" in names and f"topocoll-{second}-0-1-1" in names
        assert f"topocoll-{first}-bell-0" in names and f"topocoll-{second}-bell-0" in names
    finally:
        a.close()
        b.close()
    assert stale_segments(job) == []
    with pytest.raises(ValueError, match="alphanumeric"):
        SharedMemoryTransport(0, 2, "../x", ["h", "h"])
    # what a crashed run leaves is found and removed by the launcher's job id
    leftover = SharedMemoryTransport(0, 2, shm_namespace(job), ["h", "h"])
    leftover.isend(torch.ones(3), 1, 1)
    assert remove_segments(job) == 2  # the ring and the bell
    assert not any(SHM_DIR.glob(f"topocoll-{job}-*"))


class _Handle(Handle):
    """Completes on its `polls`-th test."""

    def __init__(self, polls: int, bell: PipeBell | None) -> None:
        self.left, self.bell = polls, bell

    def test(self) -> bool:
        self.left -= 1
        return self.left <= 0


class _Transport(Transport):
    def __init__(self, bell: PipeBell | None) -> None:
        super().__init__(0, 2)
        self.bell = bell

    def isend(self, tensor: torch.Tensor, peer: int, tag: int) -> Handle:
        return _Handle(5, self.bell)

    def irecv(self, tensor: torch.Tensor, peer: int, tag: int) -> Handle:
        return _Handle(5, self.bell)


@pytest.mark.parametrize("with_bell", [True, False])
def test_executor_sleeps_on_bells_and_polls_without(monkeypatch, with_bell: bool) -> None:
    bell = PipeBell() if with_bell else None
    slept: list[int] = []
    paused: list[int] = []
    monkeypatch.setattr(executor_module, "sleep_until_rung",
                        lambda bells, left: slept.append(len(bells)))
    monkeypatch.setattr(Backoff, "pause", lambda self: paused.append(1))
    transport = _Transport(bell)
    program = RankProgram(0, {"out": 4}, ((Recv(1, Region("out", 0, 4), 3),),))
    for mode in ("dataflow", "phased"):
        slept.clear()
        paused.clear()
        Executor(0, LevelTransports(transport, transport), 10, mode).run(
            program, {"out": torch.empty(4)})
        waits = slept if with_bell else paused
        assert len(waits) >= 3, mode  # the handle completes on its 5th test
        assert not (paused if with_bell else slept), mode
        assert all(n == 1 for n in slept)  # one distinct bell
    if bell is not None:
        bell.close()


def test_bells_of_needs_every_handle_to_have_one() -> None:
    one, two = PipeBell(), PipeBell()
    try:
        assert bells_of([]) is None
        handles = [_Handle(1, one), _Handle(1, one), _Handle(1, two)]
        assert {id(b) for b in bells_of(handles)} == {id(one), id(two)}
        assert bells_of([*handles, _Handle(1, None)]) is None
    finally:
        one.close()
        two.close()


def test_a_gloo_handle_beside_a_pollable_one_still_gets_its_waiter() -> None:
    """Mixed with a handle that has no bell (the caller then polls), a Gloo handle is
    still asked for its bell, so its helper wait starts and polling sees it complete."""
    from datetime import timedelta

    from topocoll.comm.transports.torch_pg import _WorkHandle

    bell = PipeBell()
    try:
        gloo = _WorkHandle(_GlooLikeWork(), "gloo recv from rank 1", timedelta(seconds=5),
                           bell)
        assert bells_of([_Handle(1, None), gloo]) is None
        deadline = time.monotonic() + 10
        while not gloo.test():
            assert time.monotonic() < deadline, "the Gloo handle never completed"
            time.sleep(0.001)
    finally:
        bell.close()


def test_gloo_handle_rings_its_bell_and_wait_is_bounded() -> None:
    """The Gloo transport's handle: its helper thread rings the transport's bell when the
    work completes; `wait` blocks on that thread and gives up at its timeout."""
    from datetime import timedelta

    from topocoll.comm.transports.base import CollectiveTimeoutError
    from topocoll.comm.transports.torch_pg import _WorkHandle

    release = threading.Event()

    class _SlowWork:
        def wait(self, timeout: object = None) -> bool:
            return release.wait(30)

    bell = PipeBell()
    try:
        handle = _WorkHandle(_SlowWork(), "gloo recv from rank 1", timedelta(seconds=30), bell)
        assert handle.bell is bell and not handle.test()
        with pytest.raises(CollectiveTimeoutError, match="recv from rank 1 timed out"):
            handle.wait(0.05)
        release.set()
        handle.wait(30)
        assert handle.test()
        assert select.select([bell], [], [], 10)[0]  # the completion rang
    finally:
        release.set()
        bell.close()


class _GlooLikeWork:
    """Gloo send/recv work: completion is known only to `wait`; records who waited."""

    def __init__(self, error: str | None = None) -> None:
        self.waiters: list[str] = []
        self.error = error

    def wait(self, timeout: object = None) -> bool:
        self.waiters.append(threading.current_thread().name)
        if self.error:
            raise RuntimeError(self.error)
        return True


def test_gloo_handle_alone_is_waited_on_in_the_calling_thread() -> None:
    """Never asked for its bell, the handle starts no helper thread: `wait` blocks in the
    caller (no hand-off), and Gloo's own timeout error becomes ours, naming the peer."""
    from datetime import timedelta

    from topocoll.comm.transports.base import CollectiveTimeoutError
    from topocoll.comm.transports.torch_pg import _WorkHandle

    bell = PipeBell()
    try:
        work = _GlooLikeWork()
        handle = _WorkHandle(work, "gloo send to rank 2", timedelta(seconds=5), bell)
        assert handle.blocking and handle.future is None and not handle.test()
        assert work.waiters == []  # nothing waits until someone asks
        handle.wait(5)
        assert handle.test() and work.waiters == [threading.current_thread().name]
        assert handle.future is None and not _rung(bell)
        stalled = _WorkHandle(_GlooLikeWork("Timed out waiting 5000ms for send operation"),
                              "gloo send to rank 3", timedelta(seconds=5), bell)
        with pytest.raises(CollectiveTimeoutError, match="send to rank 3 timed out"):
            stalled.wait(5)
    finally:
        bell.close()


class _BlockingHandle(_Handle):
    blocking = True

    def __init__(self, polls: int) -> None:
        super().__init__(polls, None)
        self.waited = 0

    def wait(self, timeout: float) -> None:
        self.waited += 1
        self.left = 0


class _BlockingTransport(_Transport):
    def __init__(self) -> None:
        super().__init__(None)
        self.handles: list[_BlockingHandle] = []

    def irecv(self, tensor: torch.Tensor, peer: int, tag: int) -> Handle:
        self.handles.append(_BlockingHandle(1000))
        return self.handles[-1]


def test_dataflow_blocks_on_handles_when_nothing_else_is_in_flight(monkeypatch) -> None:
    """Only blocking handles pending: the executor waits on them, oldest first, instead of
    sleeping on bells or polling (which would never see Gloo work complete)."""
    monkeypatch.setattr(executor_module, "sleep_until_rung",
                        lambda bells, left: pytest.fail("slept on a bell"))
    monkeypatch.setattr(Backoff, "pause", lambda self: pytest.fail("polled"))
    transport = _BlockingTransport()
    program = RankProgram(0, {"out": 8}, ((Recv(1, Region("out", 0, 4), 3),
                                           Recv(1, Region("out", 4, 4), 4)),))
    Executor(0, LevelTransports(transport, transport), 10, "dataflow").run(
        program, {"out": torch.empty(8)})
    assert [h.waited for h in transport.handles] == [1, 1]
