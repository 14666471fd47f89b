"""Per-phase completion times of 1 MiB all-reduces on the emulated cluster.

Why: the cost model prices `hierarchical` at 1 MiB 26-41% under the measured time, and
only the time at which each phase ends says which phase it gets wrong. Run under
`topocoll cluster run --launcher torchrun`; see reports/hierarchical_phases.md.
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from collections import defaultdict

import torch

import topocoll.comm.executor as executor
from topocoll.comm.job import init_job

ARMS = {"hier": ("hierarchical", {}), "hier_ring": ("hierarchical", {"intra": "ring"}),
        "hier_rd": ("hierarchical", {"inter": "recursive_doubling"}), "tree": ("tree", {}),
        "ring": ("ring", {})}
TURNS, CALLS = 12, 5

marks: list[tuple[int, float]] = []
_finish = executor._PhaseWindow.finish


def _finish_and_mark(self: executor._PhaseWindow, op: executor.Op) -> list[int]:
    marks.append((op.phase, time.perf_counter()))
    return _finish(self, op)


def main() -> None:
    executor._PhaseWindow.finish = _finish_and_mark  # when each op of a phase completes
    job = init_job("gloo", launcher="torchrun")
    comm = job.communicator
    nbytes = int(sys.argv[1]) if len(sys.argv) > 1 else 1 << 20
    data = torch.rand(nbytes // 4)
    for algorithm, params in ARMS.values():
        comm.all_reduce(data, algorithm=algorithm, **params)  # warm-up
    times: dict[str, list[float]] = defaultdict(list)
    ends: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for turn in range(TURNS):
        order = list(ARMS)
        random.Random(turn).shuffle(order)
        for name in order:
            algorithm, params = ARMS[name]
            comm.barrier()
            for _ in range(CALLS):
                marks.clear()
                start = time.perf_counter()
                comm.all_reduce(data, algorithm=algorithm, **params)
                times[name].append((time.perf_counter() - start) * 1e6)
                last: dict[int, float] = defaultdict(float)
                for phase, at in marks:
                    last[phase] = max(last[phase], (at - start) * 1e6)
                for phase, at in last.items():
                    ends[name][phase].append(at)
    medians = {name: {str(p): statistics.median(v) for p, v in by_phase.items()}
               for name, by_phase in ends.items()}
    everyone = job.bootstrap.all_gather_json({"t": times, "ends": medians})
    if job.rank == 0:
        for name in ARMS:
            per_call = [max(r["t"][name][i] for r in everyone) for i in range(TURNS * CALLS)]
            print(f"{name:10s} mean {statistics.mean(per_call):8.0f} median "
                  f"{statistics.median(per_call):8.0f} us")
            for rank in (0, 1, 4):
                phases = sorted(everyone[rank]["ends"][name].items(), key=lambda kv: int(kv[0]))
                print(f"    rank {rank} phase ends", {p: round(v) for p, v in phases})
    job.close()


if __name__ == "__main__":
    main()
