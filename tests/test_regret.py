"""The regret and model-accuracy figures the suite prints and the acceptance is read from.

Hand-made bench rows with known answers: which algorithm is best, each view's regret, the
10% and 25% lines (a value exactly on a line counts as within it), the 1 MiB cut of the
model's accuracy, and the error against the median batch beside the mean's."""

from __future__ import annotations

import pytest

from topocoll.benchmarks.regret import format_accuracy, format_regret, regret_rows, summary

MIB = 1 << 20


def row(algorithm: str, nbytes: int, time_us: float, **extra: object) -> dict:
    return {"algorithm": algorithm, "bytes": nbytes, "time_us": time_us, **extra}


def sweep_rows() -> list[dict]:
    """Two sizes. 4 KiB: tree best (100), the table picks ring (110: exactly +10%), the
    tuned run takes 113 and the model would pick ring too. 1 MiB: native is fastest but
    is not ours; rabenseifner best (1000), the table picks it and its tuned run is 1020."""
    return [
        row("tree", 4096, 100.0), row("ring", 4096, 110.0), row("native", 4096, 50.0),
        row("tuned", 4096, 113.0, chosen="ring", model_pick="ring"),
        row("ring", MIB, 1300.0), row("rabenseifner", MIB, 1000.0), row("native", MIB, 900.0),
        row("tuned", MIB, 1020.0, chosen="rabenseifner", model_pick="ring"),
    ]


def test_regret_per_size_against_the_best_forced_algorithm() -> None:
    small, large = regret_rows(sweep_rows())
    assert (small.bytes, small.best, small.best_us) == (4096, "tree", 100.0)
    assert small.tuned_pick == "ring"
    assert small.pick_regret == pytest.approx(0.10)
    assert small.tuned_regret == pytest.approx(0.13)
    assert small.model_regret == pytest.approx(0.10)
    assert (large.best, large.best_us) == ("rabenseifner", 1000.0)  # native left out
    assert large.pick_regret == pytest.approx(0.0)
    assert large.tuned_regret == pytest.approx(0.02)
    assert large.model_regret == pytest.approx(0.30)


def test_summary_counts_a_regret_of_exactly_ten_percent_as_within() -> None:
    """110 / 100 - 1 is 0.10000000000000009 in floating point: still on the line."""
    text = summary(regret_rows(sweep_rows()))
    assert "tuner's pick within 10% of the best at 2/2 sizes (100%), worst +10.0%" in text
    assert "tuned run within 10% of the best at 1/2 sizes (50%), worst +13.0%" in text
    assert "model pick within 10% of the best at 1/2 sizes (50%), worst +30.0%" in text


def test_regret_table_has_a_line_per_size_and_the_summary() -> None:
    lines = format_regret(regret_rows(sweep_rows())).splitlines()
    assert lines[0].startswith("# regret against")
    assert lines[2].split()[:3] == ["4K", "tree", "100.0"]
    assert lines[3].split()[:3] == ["1M", "rabenseifner", "1000.0"]
    assert lines[-1].startswith("# regret summary")
    assert format_regret(regret_rows([row("ring", 4096, 1.0)])) == ""  # no tuned rows


def batch_row(algorithm: str, nbytes: int, mean: float, median: float,
              predicted: float) -> dict:
    return row(algorithm, nbytes, mean, median_us=median, predicted_us=predicted,
               timing="batch")


def test_accuracy_from_one_mib_against_the_mean_and_the_median_batch() -> None:
    """pairwise at 1 MiB: mean 30 (stalls), median 20, priced 18 -> -40% and -10%.
    ring at 4 MiB: priced 125 against 100 -> +25%, on the line. tree at 64 KiB is 3x
    off and not judged."""
    rows = [batch_row("tree", 64 << 10, 3.0, 3.0, 9.0),
            batch_row("pairwise", MIB, 30.0, 20.0, 18.0),
            batch_row("ring", 4 * MIB, 100.0, 100.0, 125.0)]
    lines = format_accuracy(rows).splitlines()
    assert lines[-1] == ("# model accuracy from 1M: 1/2 rows within 25%, worst 40% (pairwise "
                         "at 1M); against the median batch 2/2 rows within 25%, worst 25% "
                         "(ring at 4M)")
    pairwise = next(line for line in lines if "pairwise" in line).split()
    assert pairwise[-2:] == ["-40.0%", "-10.0%"]


def test_accuracy_of_per_call_rows_has_no_median_column() -> None:
    """Per-call rows are timed by their median already: nothing to set beside it."""
    rows = [row("ring", 2 * MIB, 100.0, median_us=100.0, predicted_us=70.0, timing="call")]
    lines = format_accuracy(rows).splitlines()
    assert lines[-1] == "# model accuracy from 1M: 0/1 rows within 25%, worst 30% (ring at 2M)"
    assert lines[-2].split()[-2:] == ["-30.0%", "-"]
    assert format_accuracy([row("ring", MIB, 100.0)]) == ""  # no prediction: no section
