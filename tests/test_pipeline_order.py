"""How a pipelined schedule fills: the dataflow executor's phase window and the tapered
pipeline slices of `hierarchical`.

Both exist for the 64 MiB all-reduce on ranks that share cores: by dependencies alone
every segment's reduce-scatter is ready at once, and they then crawl together while the
network waits for the first one.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from topocoll.comm import executor as executor_module
from topocoll.comm.algorithms.hierarchical import pipeline_slices
from topocoll.comm.executor import LOOKAHEAD_ENV, Executor, LevelTransports
from topocoll.comm.schedule import RankProgram, Region, Send
from topocoll.comm.transports.base import Handle, Transport


class _Handle(Handle):
    def __init__(self, log: list, tag: int) -> None:
        self.log, self.tag, self.polls = log, tag, 0

    def test(self) -> bool:
        self.polls += 1
        if self.polls < 3:
            return False
        self.log.append(("done", self.tag))
        return True


class _Transport(Transport):
    def __init__(self) -> None:
        super().__init__(0, 2)
        self.log: list[tuple[str, int]] = []

    def isend(self, tensor: torch.Tensor, peer: int, tag: int) -> Handle:
        self.log.append(("post", tag))
        return _Handle(self.log, tag)

    def irecv(self, tensor: torch.Tensor, peer: int, tag: int) -> Handle:
        raise AssertionError("no receives here")


def _run(lookahead: int | None, phases: int = 5) -> list[tuple[str, int]]:
    """A program of independent sends, one per phase (tag = phase): nothing but the
    window orders them."""
    program = RankProgram(0, {"data": 4 * phases},
                          tuple((Send(1, Region("data", 4 * p, 4), p),) for p in range(phases)))
    transport = _Transport()
    executor = Executor(0, LevelTransports(transport, transport), 10, "dataflow")
    executor.lookahead = lookahead
    executor.run(program, {"data": torch.arange(4.0 * phases)})
    return transport.log


@pytest.mark.parametrize("lookahead", [0, 1, 2])
def test_no_phase_starts_more_than_lookahead_ahead_of_the_oldest_unfinished(
        lookahead: int) -> None:
    log = _run(lookahead)
    done: set[int] = set()
    ahead = []
    for event, phase in log:
        if event == "done":
            done.add(phase)
            continue
        oldest = min(p for p in range(5) if p not in done)
        ahead.append(phase - oldest)
    assert max(ahead) == lookahead  # reached, never exceeded
    assert sorted(p for e, p in log if e == "post") == list(range(5))


def test_without_a_window_everything_ready_starts_at_once() -> None:
    log = _run(None)
    assert [e for e, _ in log[:5]] == ["post"] * 5


def test_lookahead_from_the_environment(monkeypatch) -> None:
    monkeypatch.delenv(LOOKAHEAD_ENV, raising=False)
    assert executor_module._lookahead_from_env() == executor_module.DEFAULT_LOOKAHEAD
    monkeypatch.setenv(LOOKAHEAD_ENV, "none")
    assert executor_module._lookahead_from_env() is None
    monkeypatch.setenv(LOOKAHEAD_ENV, "3")
    assert executor_module._lookahead_from_env() == 3
    monkeypatch.setenv(LOOKAHEAD_ENV, "-1")
    with pytest.raises(ValueError, match=LOOKAHEAD_ENV):
        executor_module._lookahead_from_env()


@pytest.mark.parametrize("count", [0, 5, 1001, 16_777_216])
@pytest.mark.parametrize("segments", [1, 2, 3, 4, 7])
def test_pipeline_slices_cover_the_region_with_half_size_ends(count: int,
                                                               segments: int) -> None:
    region = Region("data", 3, count)
    slices = pipeline_slices(region, segments)
    assert len(slices) == segments
    assert slices[0].offset == 3 and all(a.end == b.offset for a, b in itertools.pairwise(slices))
    assert slices[-1].end == region.end
    sizes = [s.count for s in slices]
    if segments < 3:
        assert max(sizes) - min(sizes) <= 1  # equal blocks
        return
    middle = sizes[1:-1]
    assert max(middle) - min(middle) <= 1
    for end in (sizes[0], sizes[-1]):
        assert abs(2 * end - middle[0]) <= 2  # half a middle slice, up to rounding
