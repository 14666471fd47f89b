"""`topocoll bench --soak`: a short real soak, and the pieces it relies on.

The smoke run is 0.2 minutes on 3 ranks over Gloo with a fixed seed; every row must show
zero mismatches and zero errors, every collective must have been drawn. The unit tests
make sure the soak cannot pass vacuously: its checker catches one wrong element, an
untouched (sentinel) output and a NaN, and every rank draws the same calls.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from topocoll.benchmarks.soak import (
    COLLECTIVES,
    SEED_ENV,
    SENTINEL,
    check,
    draw,
)
from topocoll.comm.reference import random_inputs, reference


@pytest.mark.multiprocess
@pytest.mark.timeout(240)
def test_soak_smoke_gloo_three_ranks(tmp_path: Path) -> None:
    out = tmp_path / "soak.jsonl"
    cmd = [sys.executable, "-m", "topocoll", "bench", "--launcher", "local", "-n", "3",
           "--transport", "gloo", "--soak", "0.2", "--timeout", "60", "--json", str(out)]
    env = {**os.environ, SEED_ENV: "20261123"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=220, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows, result.stdout
    for row in rows:
        where = f"{row['collective']} {row['algorithm']} (seed {row['seed']})"
        assert row["mismatches"] == 0 and row["wrong"] == 0, f"{where}: {row}"
        assert row["errors"] == 0, f"{where}: {row}"
        assert row["world_size"] == 3 and row["transport"] == "gloo", row
    assert {r["collective"] for r in rows} == set(COLLECTIVES), rows
    assert sum(r["calls"] for r in rows) >= len(COLLECTIVES)
    assert "# soak OK" in result.stdout, result.stdout[-2000:]


@pytest.mark.parametrize("minutes", ["-1", "nan", "inf"])
def test_bad_soak_length_is_refused_before_any_process(minutes: str,
                                                      capsys: pytest.CaptureFixture) -> None:
    from topocoll.cli import EXIT_USAGE, main

    assert main(["bench", "--soak", minutes]) == EXIT_USAGE, minutes
    assert "--soak takes minutes >= 0" in capsys.readouterr().err, minutes


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_every_rank_draws_the_same_calls(seed: int) -> None:
    a, b = random.Random(seed), random.Random(seed)
    for i in range(200):
        left = draw(a, i, 5, "gloo", 1 << 20, set())
        right = draw(b, i, 5, "gloo", 1 << 20, set())
        assert left == right, f"seed {seed}, call {i}: {left} != {right}"


def _first(collective: str, dtype: str, world: int = 4) -> object:
    """The first drawn call of `collective` in `dtype` with a non-empty output on rank 0."""
    rng = random.Random(7)
    for i in range(20000):
        call = draw(rng, i, world, "gloo", 1 << 16, set())
        if (call.collective == collective and call.dtype == dtype
                and call.spec.output_count(0) > 0):
            return call
    raise AssertionError(f"no {collective} {dtype} call drawn")


@pytest.mark.parametrize("dtype", ["int32", "float32", "bfloat16", "float16"])
@pytest.mark.parametrize("collective", ["all_reduce", "all_to_all_v", "reduce_scatter",
                                        "all_gather", "broadcast"])
def test_check_catches_a_wrong_element(collective: str, dtype: str) -> None:
    call = _first(collective, dtype)
    inputs = random_inputs(call.spec, call.dtype, seed=call.seed)
    right = torch.from_numpy(np.ascontiguousarray(reference(call.spec, inputs)[0]))
    torch_dtype = {"int32": torch.int32, "float32": torch.float32,
                   "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    exact = right.to(torch_dtype)
    where = f"{collective} {dtype} ({call.spec})"
    assert check(call, 0, inputs, exact)[0] == 0, f"{where}: the right answer was refused"
    wrong = exact.clone()
    wrong[0] += 64
    assert check(call, 0, inputs, wrong)[0] == 1, f"{where}: a wrong element passed"
    untouched = exact.clone()
    untouched[-1] = SENTINEL
    assert check(call, 0, inputs, untouched)[0] >= 1, f"{where}: a sentinel passed"
    if dtype != "int32":
        nan = exact.clone()
        nan[0] = float("nan")
        assert check(call, 0, inputs, nan)[0] >= 1, f"{where}: a NaN passed"
