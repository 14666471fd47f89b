"""The hypervisor's share of the CPU time per suite stage (`benchmarks.steal`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from topocoll.benchmarks import suite
from topocoll.benchmarks.steal import (
    CpuTicks,
    read_ticks,
    steal_line,
    steal_share,
    steal_summary,
)

STAT = """cpu  3063898 744 1305600 2406072 6107 0 140115 340010 12 0
cpu0 1531949 372 652800 1203036 3053 0 70057 170005 6 0
intr 123 4 5
"""


def test_ticks_come_from_the_all_cpu_line() -> None:
    ticks = read_ticks(STAT)
    # user nice system idle iowait irq softirq steal; guest (12) is inside user already
    assert ticks == CpuTicks(steal=340010, total=3063898 + 744 + 1305600 + 2406072 + 6107
                             + 140115 + 340010)


@pytest.mark.parametrize("text", ["", "cpu0 1 2 3 4 5 6 7 8\n", "cpu 1 2 3 4 5 6 7\n",
                                  "cpu 1 2 x 4 5 6 7 8\n"])
def test_no_steal_figure_without_a_full_cpu_line(text: str) -> None:
    assert read_ticks(text) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/stat is Linux's")
def test_this_machine_counts_its_cpu_time() -> None:
    ticks = read_ticks()
    assert ticks is not None and ticks.total > 0 and 0 <= ticks.steal <= ticks.total


def test_share_is_steal_over_all_time_between_two_readings() -> None:
    before, after = CpuTicks(100, 10_000), CpuTicks(160, 11_000)
    assert steal_share(before, after) == pytest.approx(0.06)
    assert steal_share(before, before) is None  # no time passed
    assert steal_share(None, after) is None and steal_share(before, None) is None


def test_line_warns_only_above_two_percent() -> None:
    assert steal_line("measure_alltoall", None) is None
    quiet = steal_line("profile", 0.004)
    assert quiet == "# profile: the hypervisor took 0.4% of the CPU time (steal)"
    loud = steal_line("measure_alltoall", 0.071)
    assert loud is not None and "7.1%" in loud and "not ours" in loud


def test_summary_row_names_the_sweeps_above_the_line() -> None:
    row = steal_summary({"profile": 0.001, "measure_alltoall": 0.071, "regret": 0.03})
    assert row is not None
    assert "measure_alltoall 7.1%, regret 3.0%" in row and "profile" not in row.split("|")[2]
    assert "worst measure_alltoall 7.1%" in row
    assert "none above 2%" in (steal_summary({"profile": 0.001}) or "")
    assert steal_summary({}) is None


def test_a_stage_is_metered_into_the_run_directory(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]
                                                   ) -> None:
    readings = iter([CpuTicks(0, 1000), CpuTicks(50, 2000),  # stage a: 5%
                     CpuTicks(50, 2000), CpuTicks(51, 3000)])  # stage b: 0.1%
    monkeypatch.setattr(suite, "read_ticks", lambda: next(readings))
    with suite.metered(tmp_path, "measure_alltoall"):
        pass
    with pytest.raises(RuntimeError), suite.metered(tmp_path, "profile"):
        raise RuntimeError("a failed stage is still metered")
    assert suite.read_steal(tmp_path) == pytest.approx({"measure_alltoall": 0.05,
                                                        "profile": 0.001})
    printed = capsys.readouterr().out
    assert "measure_alltoall: the hypervisor took 5.0%" in printed
    table = suite.summarize([], suite.read_steal(tmp_path))
    assert table.splitlines()[-1].startswith("| CPU time taken by the hypervisor")
    assert "measure_alltoall 5.0%" in table
    assert "hypervisor" not in suite.summarize([], {})
