"""The Gloo transport's second group: every connection carries bulk data one way only.

In-process fakes stand in for the two groups, so the routing rule (higher -> lower rank on
the reverse group, both sides agreeing) is checked without sockets; the multi-process
tests run every algorithm over the real split transport (it is on by default).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import torch

from topocoll.comm.transports import torch_pg
from topocoll.comm.transports.torch_pg import TorchPGTransport, split_directions_wanted


class _Work:
    def wait(self, timeout: Any = None) -> bool:
        return True


class _Group:
    def __init__(self, name: str, rank: int, size: int) -> None:
        self.label, self._rank, self._size = name, rank, size
        self.calls: list[tuple[str, int, int]] = []

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size

    def name(self) -> str:
        return "gloo"

    def send(self, tensors: list[torch.Tensor], peer: int, tag: int) -> _Work:
        self.calls.append(("send", peer, tag))
        return _Work()

    def recv(self, tensors: list[torch.Tensor], peer: int, tag: int) -> _Work:
        self.calls.append(("recv", peer, tag))
        return _Work()

    def shutdown(self) -> None:
        self.calls.append(("shutdown", -1, -1))


def _done(handle: Any) -> bool:
    """The handle completes when waited on (in this thread, as the executor does when
    only Gloo handles are pending) and says so afterwards."""
    handle.wait(5)
    return handle.test()


def _transport(rank: int, size: int, split: bool) -> tuple[TorchPGTransport, _Group, _Group]:
    forward, reverse = _Group("forward", rank, size), _Group("reverse", rank, size)
    transport = TorchPGTransport(forward, timeout=timedelta(seconds=5),
                                 reverse=reverse if split else None)
    return transport, forward, reverse


@pytest.mark.parametrize("size", [2, 3, 5])
def test_each_pair_uses_one_group_per_direction(size: int) -> None:
    """For every ordered pair, the sender's and the receiver's choice is the same group,
    and the two directions of a pair never share one."""
    data = torch.ones(3)
    for a in range(size):
        for b in range(size):
            if a == b:
                continue
            sender, s_fwd, s_rev = _transport(a, size, True)
            receiver, r_fwd, r_rev = _transport(b, size, True)
            assert _done(sender.isend(data, b, 7)) and _done(receiver.irecv(data, a, 7))
            sent_on = "reverse" if s_rev.calls else "forward"
            received_on = "reverse" if r_rev.calls else "forward"
            assert sent_on == received_on == ("reverse" if a > b else "forward")
            assert len(s_fwd.calls) + len(s_rev.calls) == 1
            assert len(r_fwd.calls) + len(r_rev.calls) == 1


def test_without_a_reverse_group_everything_uses_the_one_group() -> None:
    transport, forward, _ = _transport(3, 4, False)
    for peer in (0, 1, 2):
        assert _done(transport.isend(torch.ones(2), peer, 1))
        assert _done(transport.irecv(torch.ones(2), peer, 1))
    assert len(forward.calls) == 6


def test_close_shuts_the_reverse_group_down_once() -> None:
    """The transport made the reverse group, so it shuts it down: left to interpreter
    teardown, a Gloo group can die with its threads running (the process aborts)."""
    transport, forward, reverse = _transport(1, 2, True)
    transport.close()
    transport.close()
    assert reverse.calls == [("shutdown", -1, -1)] and forward.calls == []
    assert _done(transport.isend(torch.ones(1), 0, 1))  # after close: the one group
    assert forward.calls == [("send", 0, 1)]


def test_split_is_for_gloo_and_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(torch_pg.SPLIT_ENV, raising=False)
    assert split_directions_wanted("gloo") and not split_directions_wanted("nccl")
    monkeypatch.setenv(torch_pg.SPLIT_ENV, "0")
    assert not split_directions_wanted("gloo")


def test_executor_mode_follows_the_transport_unless_set(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """Dataflow by default; phased under MPI (its data moves only inside MPI calls);
    TOPOCOLL_EXECUTOR wins over both."""
    from topocoll.comm.executor import Executor, LevelTransports
    from topocoll.comm.transports.base import Transport

    class _Plain(Transport):
        def isend(self, tensor, peer, tag):  # type: ignore[no-untyped-def]
            raise NotImplementedError

        irecv = isend

    class _MPILike(_Plain):
        preferred_executor = "phased"

    monkeypatch.delenv("TOPOCOLL_EXECUTOR", raising=False)
    plain, mpi_like = _Plain(0, 2), _MPILike(0, 2)
    assert Executor(0, LevelTransports(intra=plain, inter=plain)).mode == "dataflow"
    assert Executor(0, LevelTransports(intra=plain, inter=mpi_like)).mode == "phased"
    monkeypatch.setenv("TOPOCOLL_EXECUTOR", "dataflow")
    assert Executor(0, LevelTransports(intra=plain, inter=mpi_like)).mode == "dataflow"
    from topocoll.comm.transports.mpi import MPITransport
    assert MPITransport.preferred_executor == "phased"
