"""Copies that fill one contiguous destination run as one op (`dataflow.CopyRun`).

The fused op must give exactly what the copies one by one give, and must not fuse what
would change the result: a copy that reads what an earlier copy of the run wrote, or a
destination that is not next to the previous one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from topocoll.comm.dataflow import LOCAL, CopyRun, Op, compile_program, fuse_copies
from topocoll.comm.executor import Executor, LevelTransports
from topocoll.comm.schedule import Copy, RankProgram, Region
from topocoll.comm.transports.shm import SharedMemoryTransport, shm_namespace


def _op(dst: Region, src: Region) -> Op:
    return Op(0, 0, LOCAL, Copy(dst, src), (src,), (dst,))


def test_adjacent_independent_copies_become_one_run() -> None:
    ops = [_op(Region("tmp", 10, 3), Region("in", 7, 3)),
           _op(Region("tmp", 13, 2), Region("in", 0, 2)),
           _op(Region("tmp", 15, 4), Region("out", 5, 4))]
    fused = fuse_copies(ops)
    assert len(fused) == 1
    assert fused[0].step == CopyRun(Region("tmp", 10, 9), tuple(op.step.src for op in ops))
    assert fused[0].reads == fused[0].step.srcs and fused[0].writes == (Region("tmp", 10, 9),)


def test_sources_that_follow_each_other_are_read_as_one_region() -> None:
    """A pack's blocks from one source are often consecutive in its input: one view, and
    a run whose sources all join is a plain copy."""
    ops = [_op(Region("tmp", 0, 3), Region("in", 4, 3)),
           _op(Region("tmp", 3, 2), Region("in", 7, 2)),
           _op(Region("tmp", 5, 1), Region("out", 0, 1)),
           _op(Region("tmp", 6, 2), Region("in", 9, 2))]  # not next to out[0:1]
    fused = fuse_copies(ops)
    assert [op.step for op in fused] == [CopyRun(Region("tmp", 0, 8), (
        Region("in", 4, 5), Region("out", 0, 1), Region("in", 9, 2)))]
    assert fused[0].reads == tuple(op.step.src for op in ops)  # dependencies unchanged
    whole = fuse_copies(ops[:2])
    assert [op.step for op in whole] == [Copy(Region("tmp", 0, 5), Region("in", 4, 5))]


@pytest.mark.parametrize("second", [
    Copy(Region("tmp", 14, 2), Region("in", 0, 2)),   # a gap after the first destination
    Copy(Region("out", 3, 2), Region("in", 0, 2)),    # another buffer
    Copy(Region("tmp", 3, 2), Region("tmp", 0, 2)),   # reads what the first one writes
])
def test_copies_that_could_change_the_result_are_not_fused(second: Copy) -> None:
    ops = [_op(Region("tmp", 0, 3), Region("in", 5, 3)), _op(second.dst, second.src)]
    assert [op.step for op in fuse_copies(ops)] == [op.step for op in ops]


def test_fused_program_gives_what_the_copies_give(no_leaked_segments) -> None:
    """A leader-style assembly (blocks from two buffers, out of order) run by the
    executor: compiled to fewer ops, numerically equal to the copies applied one by one."""
    rng = np.random.default_rng(11)
    blocks = [(int(rng.integers(0, 30)), int(rng.integers(1, 6))) for _ in range(9)]
    steps, at = [], 0
    for i, (offset, count) in enumerate(blocks):
        src = Region("in" if i % 2 else "tmp", offset, count)
        steps.append(Copy(Region("out", at, count), src))
        at += count
    steps.append(Copy(Region("tmp", 40, 3), Region("out", 0, 3)))  # reads the run's output
    program = RankProgram(0, {"in": 40, "out": at, "tmp": 43}, (tuple(steps),))
    compiled = compile_program(program, lambda phase: {})
    assert len(compiled) == 2 and isinstance(compiled[0].step, CopyRun)
    assert compiled[1].deps == [0]

    inp = torch.from_numpy(rng.standard_normal(40).astype(np.float32))
    tmp = torch.from_numpy(rng.standard_normal(43).astype(np.float32))
    expected_out, expected_tmp = np.zeros(at, np.float32), tmp.numpy().copy()
    bufs = {"in": inp.numpy(), "tmp": expected_tmp, "out": expected_out}
    for step in steps:
        bufs[step.dst.buf][step.dst.offset:step.dst.end] = \
            bufs[step.src.buf][step.src.offset:step.src.end]
    shm = SharedMemoryTransport(0, 1, shm_namespace("copyruns"), ["h"])
    try:
        out = torch.zeros(at)
        for mode in ("dataflow", "phased"):
            out.zero_()
            work_tmp = tmp.clone()
            executor = Executor(0, LevelTransports(shm, shm), 10, mode)
            executor.run(program, {"in": inp, "out": out, "tmp": work_tmp})
            np.testing.assert_array_equal(out.numpy(), expected_out, err_msg=mode)
            np.testing.assert_array_equal(work_tmp.numpy(), expected_tmp, err_msg=mode)
            assert executor.stats.bytes_copied == (at + 3) * 4
    finally:
        shm.close()
