"""Shared-memory names go away even when nobody calls `close()`.

A script under plain torchrun that ends without `job.close()` used to leave its rings and
bells in /dev/shm, one set per run, until `topocoll` cleaned them by job id.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import torch

from topocoll.comm.transports.shm import (
    CMA_OFF,
    SharedMemoryTransport,
    shm_namespace,
    stale_segments,
)

# Another process runs `_exchange` below and ends, holding its transports, without close().
EXCHANGE = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[2])
    from test_shm_cleanup import _exchange
    from topocoll.comm.transports.shm import stale_segments

    kept = _exchange(sys.argv[1])
    print("made", len(stale_segments(sys.argv[1])))
""")


def _exchange(ns: str) -> tuple[SharedMemoryTransport, SharedMemoryTransport]:
    a, b = (SharedMemoryTransport(r, 2, ns, ["h", "h"], cma_bytes=CMA_OFF) for r in (0, 1))
    data = torch.from_numpy(np.random.default_rng(5).standard_normal(777).astype(np.float32))
    out = torch.empty(777)
    send, recv = a.isend(data, 1, 3), b.irecv(out, 0, 3)
    for _ in range(100_000):
        if all([send.test(), recv.test()]):
            break
    assert torch.equal(out, data)
    return a, b


def test_a_collected_transport_unlinks_its_names() -> None:
    ns = shm_namespace(uuid.uuid4().hex[:10])
    a, b = _exchange(ns)
    assert len(stale_segments(ns)) == 3  # the channel and two bells
    del a, b
    gc.collect()
    assert stale_segments(ns) == []


def test_a_process_that_exits_without_close_leaves_nothing() -> None:
    ns = shm_namespace(uuid.uuid4().hex[:10])
    done = subprocess.run([sys.executable, "-c", EXCHANGE, ns, str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "made 3"  # they existed while it ran
    assert stale_segments(ns) == []


def test_close_then_exit_unlinks_once() -> None:
    ns = shm_namespace(uuid.uuid4().hex[:10])
    a, b = _exchange(ns)
    a.close()
    b.close()
    assert stale_segments(ns) == []
    assert not a._unlink.alive and not b._unlink.alive  # nothing left to do at exit
