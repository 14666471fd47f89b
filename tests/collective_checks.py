"""Every algorithm of the library, run for real on one transport, checked against numpy.

Run as each rank of a job (our local launcher, torchrun or mpirun):
    python tests/collective_checks.py TRANSPORT INTRA [--quick]
Each rank regenerates every rank's random input from a seed, so it can compute the numpy
reference (`topocoll.comm.reference`) on its own and compare its output with the same
tolerances the verifier uses. Where the transport has a native collective, its result is
compared too (the baseline must agree with us). Also checks the executor's copy counter:
ring all-reduce and pairwise all-to-all copy nothing but a rank's block to itself.

Prints `COLLECTIVE-CHECKS OK rank=R cases=N` or raises with the failing case named.
"""

from __future__ import annotations

import sys
import zlib

import numpy as np
import torch

from topocoll.comm import CollectiveSpec, algorithm_names
from topocoll.comm.job import init_job
from topocoll.comm.reference import abs_bound, compare, random_inputs, reference
from topocoll.comm.transports.base import NotSupportedError

TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
         "float64": torch.float64, "int32": torch.int32, "int64": torch.int64}


def to_torch(array: np.ndarray, dtype: str) -> torch.Tensor:
    return torch.from_numpy(np.array(array, copy=True)).to(TORCH[dtype])


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype in (torch.bfloat16, torch.float16):
        return tensor.to(torch.float32).numpy()
    return tensor.numpy()


class Checker:
    def __init__(self, job) -> None:
        self.job = job
        self.comm = job.communicator
        self.rank, self.p = job.rank, job.world_size
        self.cases = 0

    def seed(self, *parts: object) -> int:
        return zlib.crc32(repr(parts).encode())

    def expect(self, got: torch.Tensor, spec: CollectiveSpec, inputs: list[np.ndarray],
               dtype: str, what: str) -> None:
        expected = reference(spec, inputs)[self.rank]
        bound = abs_bound(spec, inputs)[self.rank]
        result = compare(to_numpy(got), expected, bound, dtype, spec.op, self.p)
        if result.wrong:
            raise AssertionError(f"rank {self.rank}: {what}: {result.wrong} wrong element(s), "
                                 f"first at {result.first_index}, max error {result.max_error}")
        self.cases += 1

    def all_reduce(self, algorithm: str, count: int, dtype: str, op: str) -> None:
        spec = CollectiveSpec.all_reduce(self.p, count, op)
        inputs = random_inputs(spec, dtype, self.seed("ar", count, dtype, op))
        data = to_torch(inputs[self.rank], dtype)
        before = self.comm.executor.stats.bytes_copied
        try:
            self.comm.all_reduce(data, op, algorithm=algorithm)
        except NotSupportedError:
            return
        what = f"all_reduce {algorithm} count={count} {dtype} {op} p={self.p}"
        self.expect(data, spec, inputs, dtype, what)
        if algorithm == "ring" and self.comm.executor.stats.bytes_copied != before:
            raise AssertionError(f"rank {self.rank}: {what} copied "
                                 f"{self.comm.executor.stats.bytes_copied - before} bytes")

    def all_to_all_v(self, algorithm: str, scale: int, dtype: str) -> None:
        rng = np.random.default_rng(self.seed("a2av", scale))
        matrix = rng.integers(0, scale + 1, size=(self.p, self.p))
        matrix[rng.random((self.p, self.p)) < 0.25] = 0  # zero-length peers
        if self.p > 2:
            matrix[1, :] = 0  # one rank sends nothing at all
        spec = CollectiveSpec.all_to_all_v(matrix.tolist())
        inputs = random_inputs(spec, dtype, self.seed("a2av-data", scale, dtype))
        inp = to_torch(inputs[self.rank], dtype)
        out = torch.full((spec.output_count(self.rank),), -7, dtype=TORCH[dtype])
        before = self.comm.executor.stats.bytes_copied
        try:
            self.comm.all_to_all_v(out, inp, [int(matrix[s, self.rank]) for s in range(self.p)],
                                   [int(c) for c in matrix[self.rank]], algorithm=algorithm)
        except NotSupportedError:
            return
        what = f"all_to_all_v {algorithm} scale={scale} {dtype} p={self.p}"
        self.expect(out, spec, inputs, dtype, what)
        if not np.array_equal(to_numpy(inp), to_numpy(to_torch(inputs[self.rank], dtype))):
            raise AssertionError(f"rank {self.rank}: {what} modified its input")
        copied = self.comm.executor.stats.bytes_copied - before
        own = int(matrix[self.rank, self.rank]) * inp.element_size()
        if algorithm == "pairwise" and copied != own:
            raise AssertionError(f"rank {self.rank}: {what} copied {copied} bytes, expected "
                                 f"only its own block ({own})")

    def all_to_all(self, algorithm: str, per_peer: int, dtype: str) -> None:
        spec = CollectiveSpec.all_to_all(self.p, per_peer)
        inputs = random_inputs(spec, dtype, self.seed("a2a", per_peer, dtype))
        inp = to_torch(inputs[self.rank], dtype)
        out = torch.empty(per_peer * self.p, dtype=TORCH[dtype])
        try:
            self.comm.all_to_all_v(out, inp, algorithm=algorithm)
        except NotSupportedError:
            return
        self.expect(out, spec, inputs, dtype, f"all_to_all {algorithm} {per_peer} {dtype}")

    def reduce_scatter(self, algorithm: str, per_rank: int, dtype: str, op: str) -> None:
        spec = CollectiveSpec.reduce_scatter(self.p, per_rank, op)
        inputs = random_inputs(spec, dtype, self.seed("rs", per_rank, dtype, op))
        inp = to_torch(inputs[self.rank], dtype)
        out = torch.empty(per_rank, dtype=TORCH[dtype])
        try:
            self.comm.reduce_scatter(out, inp, op, algorithm=algorithm)
        except NotSupportedError:
            return
        self.expect(out, spec, inputs, dtype, f"reduce_scatter {algorithm} {per_rank} {dtype}")

    def all_gather(self, algorithm: str, per_rank: int, dtype: str) -> None:
        spec = CollectiveSpec.all_gather(self.p, per_rank)
        inputs = random_inputs(spec, dtype, self.seed("ag", per_rank, dtype))
        inp = to_torch(inputs[self.rank], dtype)
        out = torch.empty(per_rank * self.p, dtype=TORCH[dtype])
        try:
            self.comm.all_gather(out, inp, algorithm=algorithm)
        except NotSupportedError:
            return
        self.expect(out, spec, inputs, dtype, f"all_gather {algorithm} {per_rank} {dtype}")


def main() -> None:
    transport, intra = sys.argv[1], sys.argv[2]
    quick = "--quick" in sys.argv
    torch.set_num_threads(1)
    job = init_job(transport, intra, timeout=120)
    check = Checker(job)
    try:
        # 1_000_003: messages past the shared-memory transport's CMA threshold (1 MiB)
        counts = [1, 7, 1009] if quick else [0, 1, 7, 1009, 65537, 1_000_003]
        dtypes = ["float32", "bfloat16", "int64"] if quick else list(TORCH)
        for algorithm in [*algorithm_names("all_reduce"), "native"]:
            for count in counts:
                check.all_reduce(algorithm, count, "float32", "sum")
            for dtype in dtypes:
                for op in ("sum", "prod", "min", "max", "avg"):
                    if op == "avg" and dtype.startswith("int"):
                        continue
                    check.all_reduce(algorithm, 13, dtype, op)
        for algorithm in [*algorithm_names("all_to_all_v"), "native"]:
            for scale in (0, 1, 5, 300) if quick else (0, 1, 5, 300, 400_001):
                check.all_to_all_v(algorithm, scale, "float32")
            for dtype in dtypes:
                check.all_to_all_v(algorithm, 9, dtype)
                check.all_to_all(algorithm, 3, dtype)
        for algorithm in [*algorithm_names("reduce_scatter"), "native"]:
            for per_rank in (1, 7, 257):
                check.reduce_scatter(algorithm, per_rank, "float32", "sum")
            check.reduce_scatter(algorithm, 5, "int32", "max")
        for algorithm in [*algorithm_names("all_gather"), "native"]:
            for per_rank in (1, 7, 257):
                check.all_gather(algorithm, per_rank, "float32")
            check.all_gather(algorithm, 5, "bfloat16")
        data = torch.arange(11, dtype=torch.float64) * (job.rank + 1)
        job.communicator.broadcast(data, root=job.world_size - 1)
        expected = torch.arange(11, dtype=torch.float64) * job.world_size
        assert torch.equal(data, expected), f"rank {job.rank}: broadcast wrong"
    finally:
        job.close()
    print(f"COLLECTIVE-CHECKS OK rank={job.rank} cases={check.cases}", flush=True)


if __name__ == "__main__":
    main()
