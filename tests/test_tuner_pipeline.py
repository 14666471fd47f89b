"""profile -> tune -> bench with the table, end to end on a local 2x2 job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from topocoll.comm.tuning import load_tuning
from topocoll.topology.profile import load_profile

TIMEOUT = 240


def topocoll(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "topocoll", *args], capture_output=True,
                          text=True, timeout=TIMEOUT, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def profile_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tune") / "profile.json"
    done = topocoll("profile", "--layout", "2x2", "--sizes", "1K:256K:8", "--iters", "2",
                    "--timeout", "60", "--out", str(out))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return out


def test_profile_has_every_link_class(profile_file: Path) -> None:
    profile = load_profile(profile_file)
    assert set(profile.links) == {"intra", "inter/0"}
    assert profile.topology is not None and profile.topology.layout == (2, 2)
    for name, link in profile.links.items():
        assert link.beta_us_per_byte > 0, name
        assert link.shared_beta_us_per_byte > 0, name
    modes = {s["mode"] for s in profile.samples}
    assert {"pingpong", "concurrent", "fanout", "reduce", "copy"} <= modes
    assert profile.reduce_us_per_byte > 0 and profile.copy_us_per_byte > 0
    compute = [s for s in profile.samples if s["mode"] in ("reduce", "copy")]
    assert len(compute) == 6 and all(len(s["rounds_us"]) == 3 for s in compute)


def test_tune_and_bench_with_table(profile_file: Path, tmp_path: Path) -> None:
    table_file = tmp_path / "table.json"
    done = topocoll("tune", "--profile", str(profile_file), "--model-only",
                    "--collective", "all_reduce,all_to_all", "--out", str(table_file))
    assert done.returncode == 0, done.stderr
    table = load_tuning(table_file)
    assert set(table.collectives) == {"all_reduce", "all_to_all"}
    shown = topocoll("tune", "--show", str(table_file))
    assert shown.returncode == 0 and "all_to_all" in shown.stdout

    rows_file = tmp_path / "rows.jsonl"
    done = topocoll("bench", "--layout", "2x2", "--collective", "all_reduce",
                    "--algorithm", "ring,recursive_doubling,tuned", "--sizes", "4K,64K",
                    "--iters", "2", "--check", "--json", str(rows_file),
                    env={"TOPOCOLL_TUNING_FILE": str(table_file)})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    tuned = [r for r in rows if r["algorithm"] == "tuned"]
    assert len(tuned) == 2
    for row in tuned:
        assert row["chosen"] == table.lookup("all_reduce", row["bytes"]), row
        assert row["model_pick"] is not None and row["predicted_us"] > 0
        assert row["wrong"] == 0
    assert all(r["predicted_us"] > 0 for r in rows)
    assert "regret summary" in done.stdout and "cost model" in done.stdout


def test_foreign_table_warns_and_falls_back_to_the_model(profile_file: Path,
                                                        tmp_path: Path) -> None:
    table_file = tmp_path / "foreign.json"
    done = topocoll("tune", "--profile", str(profile_file), "--layout", "1,3", "--model-only",
                    "--collective", "all_reduce", "--out", str(table_file))
    assert done.returncode == 0, done.stderr
    done = topocoll("bench", "--layout", "2x2", "--collective", "all_reduce",
                    "--algorithm", "tuned", "--sizes", "4K", "--iters", "1", "--check",
                    env={"TOPOCOLL_TUNING_FILE": str(table_file)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "was made for topology" in done.stderr and "cost model" in done.stderr
    assert "Traceback" not in done.stderr


def test_corrupt_table_warns_and_uses_defaults(tmp_path: Path) -> None:
    table_file = tmp_path / "broken.json"
    table_file.write_text('{"schema": "topocoll.tuning", "version": 1, "topo')
    done = topocoll("bench", "--layout", "2x2", "--collective", "all_reduce",
                    "--algorithm", "tuned", "--sizes", "4K", "--iters", "1", "--check",
                    env={"TOPOCOLL_TUNING_FILE": str(table_file)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "broken.json" in done.stderr and "not valid JSON" in done.stderr
    assert "built-in defaults" in done.stderr
