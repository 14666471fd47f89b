"""Single-copy large messages in the shared-memory transport (cross-memory attach).

What is checked: results against the sent data (random, odd sizes, several dtypes and
ops), that only a descriptor went through the ring (the ring's `head` counts the bytes
written to it), that the sender's own setting rules the channel, and that a refused or
untrustworthy read falls back to the copying ring instead of failing or reading the
wrong process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid

import numpy as np
import pytest
import torch

from topocoll.comm.transports import cma
from topocoll.comm.transports.base import Handle, Transport, TransportError
from topocoll.comm.transports.shm import (
    CMA_ENV,
    CMA_OFF,
    DEFAULT_CAPACITY,
    DESCRIPTOR_WORDS,
    HEAD,
    REFUSED,
    SharedMemoryTransport,
    cma_threshold_from_env,
    shm_namespace,
)

pytestmark = pytest.mark.skipif(not cma.available(), reason="no process_vm_readv here")

DESCRIPTOR_BYTES = DESCRIPTOR_WORDS * 8


def _pair(sender_cma: int | None = 4096, receiver_cma: int | None = 4096,
          capacity: int = 1 << 16) -> tuple[SharedMemoryTransport, SharedMemoryTransport]:
    ns = shm_namespace(uuid.uuid4().hex[:10])
    return (SharedMemoryTransport(0, 2, ns, ["h", "h"], capacity=capacity,
                                  cma_bytes=sender_cma),
            SharedMemoryTransport(1, 2, ns, ["h", "h"], capacity=capacity,
                                  cma_bytes=receiver_cma))


def _finish(*handles: Handle) -> None:
    for _ in range(100_000):
        if all([h.test() for h in handles]):
            return
    raise AssertionError("handles did not complete")


def _ring_bytes(transport: SharedMemoryTransport, tag: int) -> int:
    return int(transport._channels[(0, 1, tag)].header[HEAD])


def _random(count: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    if dtype.is_floating_point:
        values = torch.from_numpy(rng.uniform(0.5, 1.5, count))
        return values.to(dtype)
    return torch.from_numpy(rng.integers(-1000, 1000, count)).to(dtype)


def test_a_large_message_crosses_as_a_descriptor_and_waits_for_the_reader(
        no_leaked_segments) -> None:
    sender, receiver = _pair()
    try:
        data = _random(300_001, torch.float64, 1)  # odd, larger than the 64 KiB ring
        out = torch.empty_like(data)
        send = sender.isend(data, 1, 5)
        assert not send.test()  # the receiver has not read it: the buffer is still lent
        recv = receiver.irecv(out, 0, 5)
        _finish(recv, send)
        assert torch.equal(out, data)
        assert _ring_bytes(sender, 5) == DESCRIPTOR_BYTES  # no payload through the ring
        # a small message on the same channel still goes through the ring, in order
        small, got = _random(37, torch.float32, 2), torch.empty(37)
        big, got_big = _random(5_003, torch.float32, 3), torch.empty(5_003)
        handles = [sender.isend(small, 1, 5), sender.isend(big, 1, 5),
                   receiver.irecv(got, 0, 5), receiver.irecv(got_big, 0, 5)]
        _finish(*handles)
        assert torch.equal(got, small) and torch.equal(got_big, big)
        assert _ring_bytes(sender, 5) == 2 * DESCRIPTOR_BYTES + 37 * 4
    finally:
        sender.close()
        receiver.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.int32])
@pytest.mark.parametrize("op", ["sum", "prod", "min", "max"])
def test_receive_and_reduce_by_cma_matches_the_reference(dtype: torch.dtype, op: str,
                                                         no_leaked_segments) -> None:
    sender, receiver = _pair()
    try:
        count = 150_001  # several 256 KiB stage pieces and a partial last one
        incoming = _random(count, dtype, 7)
        target = _random(count, dtype, 8)
        expected = {"sum": torch.add, "prod": torch.mul, "min": torch.minimum,
                    "max": torch.maximum}[op](target, incoming)
        _finish(sender.isend(incoming, 1, 9), receiver.irecv_reduce(target, op, 0, 9))
        assert torch.equal(target, expected)
        assert _ring_bytes(sender, 9) == DESCRIPTOR_BYTES
    finally:
        sender.close()
        receiver.close()


def test_the_senders_setting_rules_the_channel(no_leaked_segments) -> None:
    data = _random(20_000, torch.float32, 4)
    for sender_cma, receiver_cma, ring in ((CMA_OFF, 4096, data.numel() * 4),
                                           (4096, CMA_OFF, DESCRIPTOR_BYTES),
                                           (1 << 20, 4096, data.numel() * 4)):
        sender, receiver = _pair(sender_cma, receiver_cma)
        try:
            out = torch.empty_like(data)
            _finish(sender.isend(data, 1, 2), receiver.irecv(out, 0, 2))
            assert torch.equal(out, data)
            assert _ring_bytes(sender, 2) == ring, (sender_cma, receiver_cma)
        finally:
            sender.close()
            receiver.close()


def test_a_refused_read_falls_back_to_the_ring_for_good(monkeypatch,
                                                        no_leaked_segments) -> None:
    def refuse(*args: object) -> None:
        raise cma.CmaError(1, "Operation not permitted")

    monkeypatch.setattr(cma, "read", refuse)
    sender, receiver = _pair()
    try:
        first, out = _random(30_001, torch.float32, 5), torch.empty(30_001)
        _finish(sender.isend(first, 1, 4), receiver.irecv(out, 0, 4))
        assert torch.equal(out, first)
        channel = sender._channels[(0, 1, 4)]
        assert channel.header[REFUSED] == 1
        assert _ring_bytes(sender, 4) == DESCRIPTOR_BYTES + first.numel() * 4
        target = _random(30_001, torch.float32, 6)
        expected = target + first
        _finish(sender.isend(first, 1, 4), receiver.irecv_reduce(target, "sum", 0, 4))
        assert torch.equal(target, expected)
        # no second descriptor: the refusal holds for the channel
        assert _ring_bytes(sender, 4) == DESCRIPTOR_BYTES + 2 * first.numel() * 4
    finally:
        sender.close()
        receiver.close()


def test_a_descriptor_naming_another_process_is_not_trusted(no_leaked_segments) -> None:
    """The pid in a descriptor must be the sender's: its random token must read back
    from that process. Here it names a fork of the sender (same addresses, older
    contents): reading it would deliver stale data. The token no longer matches, so the
    message must come through the ring instead."""
    sender, receiver = _pair()
    data, out = _random(40_000, torch.float32, 9), torch.empty(40_000)
    child = os.fork()
    if child == 0:  # the namesake: same layout, frozen contents
        import time
        time.sleep(30)
        os._exit(0)
    try:
        data.add_(1.0)  # what the sender sends now differs from the fork's copy
        sender._token[0] += 1
        honest = sender._descriptor

        def lying(buffer: np.ndarray) -> np.ndarray:
            words = honest(buffer).view(np.int64).copy()
            words[0] = child
            return words.view(np.uint8)

        sender._descriptor = lying
        _finish(sender.isend(data, 1, 6), receiver.irecv(out, 0, 6))
        assert torch.equal(out, data)
        assert sender._channels[(0, 1, 6)].header[REFUSED] == 1
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)
        sender.close()
        receiver.close()


def test_a_size_disagreement_is_an_error_naming_both_ranks(no_leaked_segments) -> None:
    sender, receiver = _pair()
    try:
        send = sender.isend(_random(10_000, torch.float32, 1), 1, 3)
        recv = receiver.irecv(torch.empty(12_000), 0, 3)
        with pytest.raises(TransportError, match=r"rank 1 expected 48000 bytes from rank 0, "
                                                 r"which sent 40000"):
            _finish(send, recv)
    finally:
        sender.close()
        receiver.close()


def test_threshold_from_the_environment(monkeypatch) -> None:
    monkeypatch.delenv(CMA_ENV, raising=False)
    assert cma_threshold_from_env(12345) == 12345
    monkeypatch.setenv(CMA_ENV, "off")
    assert cma_threshold_from_env(12345) == CMA_OFF
    monkeypatch.setenv(CMA_ENV, "4096")
    assert cma_threshold_from_env(12345) == 4096
    for bad in ("0", "-5", "lots"):
        monkeypatch.setenv(CMA_ENV, bad)
        with pytest.raises(ValueError, match=CMA_ENV):
            cma_threshold_from_env(12345)


CHILD = textwrap.dedent("""
    import sys, numpy as np, torch
    from topocoll.comm.transports.shm import SharedMemoryTransport
    ns = sys.argv[1]
    t = SharedMemoryTransport(1, 2, ns, ["h", "h"], cma_bytes=4096)
    rng = np.random.default_rng(11)
    sizes = (262_147, 1_000_003, 17)
    data = [torch.from_numpy(rng.standard_normal(n).astype(np.float32)) for n in sizes]
    handles = [t.isend(d, 0, 1) for d in data]
    while not all([h.test() for h in handles]):
        pass
    print("sent", flush=True)
    sys.stdin.readline()  # keep the buffers (and the process) until the parent is done
    t.close()
""")


def test_another_process_reads_our_buffers_directly(no_leaked_segments) -> None:
    """Two processes, as in a job: the receiver copies straight from the sender."""
    ns = shm_namespace(uuid.uuid4().hex[:10])
    receiver = SharedMemoryTransport(0, 2, ns, ["h", "h"], cma_bytes=4096)
    child = subprocess.Popen([sys.executable, "-c", CHILD, ns], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        rng = np.random.default_rng(11)
        sizes = (262_147, 1_000_003, 17)
        expected = [rng.standard_normal(n).astype(np.float32) for n in sizes]
        outs = [torch.empty(n) for n in sizes]
        handles = [receiver.irecv(o, 1, 1) for o in outs]
        for _ in range(2_000_000):
            if all([h.test() for h in handles]):
                break
        else:
            raise AssertionError("the child's messages did not arrive")
        for out, want in zip(outs, expected):
            np.testing.assert_array_equal(out.numpy(), want)
        assert child.stdout.readline().strip() == "sent"
        ring = int(receiver._channels[(1, 0, 1)].header[HEAD])
        assert ring == 2 * DESCRIPTOR_BYTES + 17 * 4  # the two large ones by CMA
    finally:
        child.communicate("done\n", timeout=30)
        receiver.close()
    assert child.returncode == 0


class _Spinning(Transport):
    name = "spinning"
    busy_waits = True

    def isend(self, tensor: torch.Tensor, peer: int, tag: int) -> Handle:
        raise AssertionError("unused")

    irecv = isend


@pytest.mark.parametrize("busy", [True, False])
def test_beside_a_busy_waiting_transport_the_ring_copies(busy: bool, monkeypatch) -> None:
    """Over MPI (ranks call Test back to back while waiting) CMA reads stalled for
    seconds on shared cores, so `Communicator.create` keeps shared memory on the ring."""
    from topocoll.comm.bootstrap import LocalBootstrap
    from topocoll.comm.communicator import Communicator

    monkeypatch.delenv(CMA_ENV, raising=False)
    inter = _Spinning(0, 1)
    inter.busy_waits = busy
    comm = Communicator.create(LocalBootstrap(), inter)
    try:
        assert comm.transports.intra.cma_bytes == (CMA_OFF if busy else DEFAULT_CAPACITY)
    finally:
        comm.transports.intra.close()
