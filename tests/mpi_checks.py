"""Checks of the MPI transport, run on every rank under `mpirun -n N` (N >= 2).

Every rank builds every other rank's data from a seed (rank, case), so each check compares
against a numpy reference computed locally. Values are small non-zero integers: sums and
products of a few of them are exact in every dtype (bfloat16 included), so results must
match exactly; "avg" and the float data with a fractional part are compared with a
tolerance. Outputs are prefilled with a sentinel so an unwritten element shows.

Prints `MPI-CHECKS OK rank=R` on success. On any failure it prints the traceback and
calls `MPI_Abort`, so no rank is left waiting in a collective.
Run with `--bench` to also time a 16 MiB float32 all-reduce.
"""

from __future__ import annotations

import socket
import sys
import time
import traceback
import zlib

import numpy as np
import torch

from topocoll.comm.transports.base import Backoff, Handle, NativeCall, TransportError
from topocoll.comm.transports.mpi import MPITransport

DTYPES = [torch.float32, torch.float64, torch.int32, torch.int64, torch.bfloat16,
          torch.float16]
FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
SENTINEL = -77
DEADLINE = 60.0


def sizes(dtype: torch.dtype) -> list[int]:
    """0, 1, 7, 1000 elements and one message a little over 1 MiB (odd count)."""
    esize = torch.empty(0, dtype=dtype).element_size()
    return [0, 1, 7, 1000, (1 << 20) // esize + 3]


def values(rank: int, n: int, case: str) -> np.ndarray:
    """Deterministic non-zero integers in -4..4 (float64), same on every rank."""
    rng = np.random.default_rng([rank, zlib.crc32(case.encode())])
    mags = rng.integers(1, 5, size=n)
    signs = rng.choice(np.array([-1, 1]), size=n)
    return (mags * signs).astype(np.float64)


def tensor(rank: int, n: int, dtype: torch.dtype, case: str) -> torch.Tensor:
    return torch.from_numpy(values(rank, n, case)).to(dtype)


def filled(n: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((n,), SENTINEL, dtype=dtype)


def expect_equal(got: torch.Tensor, ref: np.ndarray | torch.Tensor, what: str,
                 tol: float = 0.0) -> None:
    want = ref if isinstance(ref, torch.Tensor) else torch.from_numpy(ref).to(got.dtype)
    if got.shape != want.shape:
        raise AssertionError(f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}")
    if tol:
        ok = torch.allclose(got.double(), want.double(), rtol=tol, atol=tol)
    else:
        ok = torch.equal(got, want)
    if not ok:
        bad = (got.double() - want.double()).abs().argmax().item()
        raise AssertionError(f"{what}: mismatch, e.g. at {bad}: got {got[bad].item()} "
                             f"want {want[bad].item()}")


def wait_all(handles: list[Handle], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    backoff = Backoff()
    pending = list(handles)
    while pending:
        pending = [h for h in pending if not h.test()]
        if pending and time.monotonic() > deadline:
            raise AssertionError(f"{what}: {len(pending)} handles not done after {DEADLINE} s")
        backoff.pause()


def reduce_ref(arrays: list[np.ndarray], op: str) -> np.ndarray:
    stack = np.stack(arrays) if arrays else np.zeros((0, 0))
    if op in ("sum", "avg"):
        out = stack.sum(axis=0)
        return out / len(arrays) if op == "avg" else out
    return {"prod": np.prod, "min": np.min, "max": np.max}[op](stack, axis=0)


def tolerance(dtype: torch.dtype, op: str) -> float:
    if op != "avg":
        return 0.0
    return {torch.bfloat16: 1e-2, torch.float16: 1e-3}.get(dtype, 1e-6)


# -- point to point -----------------------------------------------------------------------

def check_ring(t: MPITransport) -> None:
    me, n = t.rank, t.world_size
    nxt, prv = (me + 1) % n, (me - 1) % n
    for dtype in DTYPES:
        for count in sizes(dtype):
            case = f"ring-{dtype}-{count}"
            send = tensor(me, count, dtype, case)
            recv = filled(count, dtype)
            # Receive posted first on odd ranks, second on even ones: both orders work.
            if me % 2:
                handles = [t.irecv(recv, prv, 5), t.isend(send, nxt, 5)]
            else:
                handles = [t.isend(send, nxt, 5), t.irecv(recv, prv, 5)]
            wait_all(handles, case)
            expect_equal(recv, tensor(prv, count, dtype, case), case)


def check_tags(t: MPITransport) -> None:
    """Several tags between ranks 0 and 1, received in another order than sent."""
    tags = [0, 1, 7, 1000, 123456, t.tag_ub]
    if t.rank == 0:
        sends = [tensor(0, 100 + i, torch.float32, f"tag-{tag}") for i, tag in enumerate(tags)]
        handles = [t.isend(s, 1, tag) for s, tag in zip(sends, tags)]
        # Two messages on one tag arrive in the order they were sent.
        handles += [t.isend(tensor(0, 9, torch.int64, f"same-{k}"), 1, 42) for k in range(2)]
        wait_all(handles, "tags send")
    elif t.rank == 1:
        recvs = {tag: filled(100 + i, torch.float32) for i, tag in enumerate(tags)}
        same = [filled(9, torch.int64) for _ in range(2)]
        handles = [t.irecv(recvs[tag], 0, tag) for tag in reversed(tags)]
        handles += [t.irecv(buf, 0, 42) for buf in same]
        wait_all(handles, "tags recv")
        for i, tag in enumerate(tags):
            expect_equal(recvs[tag], tensor(0, 100 + i, torch.float32, f"tag-{tag}"),
                         f"tag {tag}")
        for k in range(2):
            expect_equal(same[k], tensor(0, 9, torch.int64, f"same-{k}"), f"same tag #{k}")


def check_errors(t: MPITransport) -> None:
    """Bad tags and peers fail at once; a size mismatch fails the receive, by name."""
    probe = torch.ones(4)
    for bad_tag in (-1, t.tag_ub + 1):
        expect_raises(lambda tag=bad_tag: t.isend(probe, 0, tag), "tag")
    expect_raises(lambda: t.irecv(probe, t.world_size, 0), "communicator has")
    if t.rank == 0:
        wait_all([t.isend(torch.ones(2), 1, 900), t.isend(torch.ones(8), 1, 901)], "err send")
    elif t.rank == 1:
        short, long_ = torch.zeros(4), torch.zeros(4)
        handle = t.irecv(short, 0, 900)
        expect_raises(lambda: wait_all([handle], "short"), "8-byte message")
        expect_raises(handle.test, "8-byte message")  # and stays failed
        expect_raises(lambda: wait_all([t.irecv(long_, 0, 901)], "long"), "failed")
    t.barrier()


def expect_raises(fn, text: str) -> None:
    try:
        fn()
    except TransportError as exc:
        if text not in str(exc):
            raise AssertionError(f"error {exc!r} does not mention {text!r}") from exc
        return
    raise AssertionError(f"no TransportError (expected one mentioning {text!r})")


# -- the native baselines -----------------------------------------------------------------

def check_all_reduce(t: MPITransport) -> None:
    ranks = range(t.world_size)
    for dtype in DTYPES:
        ops = ["sum", "prod", "min", "max"] + (["avg"] if dtype in FLOATS else [])
        for count in sizes(dtype):
            for op in ops:
                case = f"ar-{dtype}-{count}-{op}"
                buf = tensor(t.rank, count, dtype, case)
                t.native_all_reduce(buf, op)
                ref = reduce_ref([values(r, count, case) for r in ranks], op)
                expect_equal(buf, ref, case, tolerance(dtype, op))
    # Real-valued float data, summed in a different order than numpy's: a tolerance.
    for dtype in (torch.float32, torch.float64):
        case = f"ar-normal-{dtype}"
        data = [np.random.default_rng([r, 7]).standard_normal(4097) for r in ranks]
        buf = torch.from_numpy(data[t.rank]).to(dtype, copy=True)
        t.native_all_reduce(buf, "sum")
        expect_equal(buf, reduce_ref(data, "sum"), case, 1e-5)
    expect_raises(lambda: t.native_all_reduce(torch.ones(3, dtype=torch.int32), "avg"), "avg")


def split_matrix(n: int, case: str) -> np.ndarray:
    """counts[i][j]: elements rank i sends to rank j (zeros included), same on all ranks."""
    rng = np.random.default_rng([n, zlib.crc32(case.encode())])
    counts = rng.integers(0, 9, size=(n, n))
    counts[0, n - 1] = 0
    return counts


def check_all_to_all_v(t: MPITransport) -> None:
    me, n = t.rank, t.world_size
    for dtype in DTYPES:
        for scale in (1, 1000, 16384):
            case = f"a2av-{dtype}-{scale}"
            counts = split_matrix(n, case) * scale
            in_splits, out_splits = counts[me].tolist(), counts[:, me].tolist()
            inp = tensor(me, sum(in_splits), dtype, case)
            out = filled(sum(out_splits), dtype)
            t.native_all_to_all_v(out, inp, out_splits, in_splits)
            pieces = []
            for src in range(n):
                data = values(src, int(counts[src].sum()), case)
                start = int(counts[src, :me].sum())
                pieces.append(data[start:start + int(counts[src, me])])
            expect_equal(out, np.concatenate(pieces), case)


def check_reduce_scatter(t: MPITransport) -> None:
    n = t.world_size
    for dtype in DTYPES:
        for count in [*sizes(dtype)[:4], (1 << 18) // n + 1]:
            for op in ["sum", "max"] + (["avg"] if dtype in FLOATS else []):
                case = f"rs-{dtype}-{count}-{op}"
                inp = tensor(t.rank, count * n, dtype, case)
                out = filled(count, dtype)
                t.native_reduce_scatter(out, inp, op)
                full = reduce_ref([values(r, count * n, case) for r in range(n)], op)
                expect_equal(out, full[t.rank * count:(t.rank + 1) * count], case,
                             tolerance(dtype, op))


def check_all_gather(t: MPITransport) -> None:
    n = t.world_size
    for dtype in DTYPES:
        for count in sizes(dtype):
            case = f"ag-{dtype}-{count}"
            out = filled(count * n, dtype)
            t.native_all_gather(out, tensor(t.rank, count, dtype, case))
            ref = np.concatenate([values(r, count, case) for r in range(n)])
            expect_equal(out, ref, case)


# -- native(call) on sub-groups -----------------------------------------------------------

def groups_of(n: int) -> list[tuple[int, ...]]:
    """Even ranks, odd ranks, everyone in reverse order, and everyone in order."""
    return [tuple(range(0, n, 2)), tuple(range(1, n, 2)), tuple(reversed(range(n))),
            tuple(range(n))]


def check_native_groups(t: MPITransport) -> None:
    me = t.rank
    for group in groups_of(t.world_size):
        if me not in group:
            continue
        size, idx = len(group), group.index(me)
        for dtype in (torch.float32, torch.int64, torch.bfloat16):
            tag = f"{group}-{dtype}"
            for op in ("sum", "max"):
                case = f"grp-ar-{tag}-{op}"
                buf = tensor(me, 1001, dtype, case)
                t.native(NativeCall("all_reduce", group, buf, buf, (), op, 0))
                expect_equal(buf, reduce_ref([values(r, 1001, case) for r in group], op), case)
            case = f"grp-bc-{tag}"
            root = size - 1
            buf = tensor(me, 77, dtype, case) if idx == root else filled(77, dtype)
            t.native(NativeCall("broadcast", group, buf, buf, (), "sum", root))
            expect_equal(buf, values(group[root], 77, case), case)
            # Unequal counts per member, a zero among them when there are several.
            counts = tuple((3 * i + 5) % 7 for i in range(size))
            case = f"grp-ag-{tag}"
            src = tensor(me, counts[idx], dtype, case)
            dst = filled(sum(counts), dtype)
            t.native(NativeCall("all_gather", group, src, dst, counts, "sum", 0))
            ref = np.concatenate([values(r, c, case) for r, c in zip(group, counts)])
            expect_equal(dst, ref, case)
            case = f"grp-rs-{tag}"
            src = tensor(me, sum(counts), dtype, case)
            dst = filled(counts[idx], dtype)
            t.native(NativeCall("reduce_scatter", group, src, dst, counts, "sum", 0))
            full = reduce_ref([values(r, sum(counts), case) for r in group], "sum")
            start = sum(counts[:idx])
            expect_equal(dst, full[start:start + counts[idx]], case)
            # Equal counts take the Reduce_scatter_block path.
            case = f"grp-rsb-{tag}"
            src = tensor(me, 5 * size, dtype, case)
            dst = filled(5, dtype)
            t.native(NativeCall("reduce_scatter", group, src, dst, (5,) * size, "max", 0))
            full = reduce_ref([values(r, 5 * size, case) for r in group], "max")
            expect_equal(dst, full[5 * idx:5 * idx + 5], case)
    if me != 0:
        expect_raises(lambda: t.subcomm((0,)), "not a member")


def bench(t: MPITransport) -> None:
    buf = torch.ones((16 << 20) // 4, dtype=torch.float32)
    times = []
    for _ in range(7):
        t.barrier()
        start = time.perf_counter()
        t.native_all_reduce(buf, "sum")
        times.append(time.perf_counter() - start)
    if t.rank == 0:
        times.sort()
        print(f"MPI-BENCH all_reduce 16 MiB float32 n={t.world_size}: median "
              f"{times[3] * 1e3:.1f} ms, best {times[0] * 1e3:.1f} ms", flush=True)


def main() -> None:
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    try:
        if world.Get_size() < 2:
            raise AssertionError("run under mpirun with at least 2 ranks")
        t = MPITransport()
        assert t.name == "mpi" and t.comm != world, "the transport must Dup the communicator"
        assert t.version().startswith("mpi4py "), t.version()
        check_ring(t)
        check_tags(t)
        check_errors(t)
        check_all_reduce(t)
        check_all_to_all_v(t)
        check_reduce_scatter(t)
        check_all_gather(t)
        check_native_groups(t)
        if "--bench" in sys.argv:
            bench(t)
        t.barrier()
        if t.rank == 0:
            names = ",".join(name for _, name in socket.if_nameindex())
            print(f"MPI-CHECKS version={t.version()} interfaces={names}", flush=True)
        t.close()
        t.close()  # idempotent
        world.Barrier()
    except BaseException:
        sys.stdout.flush()
        traceback.print_exc()
        sys.stderr.write(f"MPI-CHECKS FAILED rank={world.Get_rank()}\n")
        sys.stderr.flush()
        world.Abort(1)
    print(f"MPI-CHECKS OK rank={world.Get_rank()}", flush=True)


if __name__ == "__main__":
    main()
