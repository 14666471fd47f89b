"""The tuning report (#8): recorded inputs -> page + figures, checked in headless Chromium.

The browser tests need Debian's `chromium` (`make test` installs it as root) and the
`playwright` package (dev extra; its driver only, pointed at /usr/bin/chromium).
"""

from __future__ import annotations

import json
import re
import shutil
from itertools import pairwise
from pathlib import Path

import pytest

from topocoll.cli import main
from topocoll.extras import available
from topocoll.reports.analysis import TUNED, analyze
from topocoll.reports.browser_check import check_page, find_chromium
from topocoll.reports.generate import write_report
from topocoll.reports.inputs import InputError, load_inputs
from topocoll.reports.markdown import md_escape

DATA = Path(__file__).resolve().parent / "data" / "report"
EVIL = "<script>alert(1)</script>"
BROWSER_TIMEOUT_S = 25.0

needs_matplotlib = pytest.mark.skipif(not available("matplotlib"),
                                      reason="matplotlib missing: pip install 'topocoll[report]'")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The report of every recorded input, rendered once for the module."""
    if not available("matplotlib"):
        pytest.skip("matplotlib missing: pip install 'topocoll[report]'")
    return write_report([DATA], tmp_path_factory.mktemp("report") / "out")


@pytest.fixture(scope="module")
def browser() -> str:
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("chromium is not installed and could not be installed (make test "
                    "installs Debian's chromium when run as root)")
    if not available("playwright"):
        pytest.skip("playwright missing: pip install -e '.[dev]'")
    return chromium


# ----- the page and its files -------------------------------------------------------------
def test_report_writes_page_summary_and_figures(report: Path) -> None:
    page = report.read_text()
    figures = sorted((report.parent / "figures").glob("*.png"))
    kinds = {p.name.split("-")[0] for p in figures}
    assert kinds == {"busbw", "choice", "speedup", "topology"}, figures
    for png in figures:
        assert png.with_suffix(".svg").stat().st_size > 1000, png
    assert page.count("data:image/png;base64,") == len(figures)
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), "page loads from outside"
    md = (report.parent / "report.md").read_text()
    assert "### Headline speedups" in md and "](figures/speedup-all_reduce.png)" in md


def test_inputs_strings_are_escaped(report: Path) -> None:
    page, md = report.read_text(), (report.parent / "report.md").read_text()
    assert EVIL not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(2)&gt;" in page
    assert "<script" not in md and "<img" not in md
    assert md_escape("a|b<c>") == "a\\|b&lt;c&gt;"


def test_summary_names_best_and_speedup(report: Path) -> None:
    md = (report.parent / "report.md").read_text()
    # recorded: at 64 MiB gloo native 990 ms, the tuned backend (hierarchical) 702 ms
    assert "| all\\_reduce | gloo |" in md and "tuned (ran hierarchical) | 702 ms | 990 ms | " \
                                               "1.41x |" in md
    assert "| 16M..64M | hierarchical |" in md


# ----- numbers ----------------------------------------------------------------------------
def test_regret_and_choices_from_recorded_inputs() -> None:
    analysis = analyze(load_inputs([DATA]))
    group = next(g for g in analysis.groups
                 if g.key.collective == "all_reduce" and g.key.transport == "gloo")
    assert group.decision is not None and group.profile is not None
    # 64K: tuned 11093.5 us, best forced (tree) 10608.904 us
    assert group.tuned_regret(65536) == pytest.approx(11093.5 / 10608.904 - 1, rel=1e-6)
    assert group.model_regret(65536) == pytest.approx(0.0)
    assert [c.algorithm for c in group.choices()] == ["hierarchical_leader", "tree",
                                                      "hierarchical_leader", "hierarchical"]


def test_choices_from_tuned_rows_without_a_table() -> None:
    analysis = analyze(load_inputs([DATA / "tuned.jsonl", DATA / "allreduce_small.jsonl"]))
    group = next(g for g in analysis.groups if g.has_tuned)
    choices = group.choices()
    assert [c.algorithm for c in choices] == ["hierarchical_leader", "tree",
                                              "hierarchical_leader", "hierarchical"]
    assert choices[0].lo == 0 and choices[-1].hi is None
    assert all(a.hi == b.lo for a, b in pairwise(choices)), choices
    assert group.tuned_regret(65536) is not None and group.model_regret(65536) is None
    assert TUNED not in group.ours


@needs_matplotlib
def test_results_alone_make_a_report_with_notes(tmp_path: Path) -> None:
    index = write_report([DATA / "allreduce_large.jsonl"], tmp_path / "out")
    page = index.read_text()
    assert "No tuner-choice or regret figure for any group" in page
    assert "No profile (topocoll.profile)" in page
    names = sorted(p.name for p in (tmp_path / "out" / "figures").glob("*.png"))
    assert names == ["busbw-all_reduce-gloo-b05d6d87.png", "speedup-all_reduce.png",
                     "topology-b05d6d87769b.png"]


# ----- headless Chromium --------------------------------------------------------------------
def test_report_loads_in_chromium(report: Path, browser: str, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    check = check_page(report, shot, BROWSER_TIMEOUT_S, browser)
    assert check.ok, check.problems()
    assert check.images == len(list((report.parent / "figures").glob("*.png")))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("replacement", ["figures/missing.png",
                                         "data:image/png;base64,iVBORw0KGgoAAAAA"],
                         ids=["missing-file", "corrupt-data"])
def test_checker_detects_a_broken_image(report: Path, browser: str, tmp_path: Path,
                                        replacement: str) -> None:
    broken = tmp_path / "index.html"
    shutil.copytree(report.parent / "figures", tmp_path / "figures")
    page = report.read_text()
    broken.write_text(re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", replacement, page,
                             count=1))
    check = check_page(broken, tmp_path / "shot.png", BROWSER_TIMEOUT_S, browser)
    assert not check.ok and len(check.broken_images) == 1, check.problems()


# ----- bad inputs ---------------------------------------------------------------------------
ROW = json.loads((DATA / "allreduce_large.jsonl").read_text().splitlines()[0])
PROFILE = json.loads((DATA / "profile.json").read_text())
TUNING = json.loads((DATA / "tuning.json").read_text())


def _without(obj: dict, key: str) -> dict:
    return {k: v for k, v in obj.items() if k != key}


def _lines(*rows: object) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def _bad_range_tuning() -> dict:
    tuning = json.loads(json.dumps(TUNING))
    tuning["collectives"]["all_reduce"]["ranges"][2]["lo"] = 300000
    return tuning


BAD_INPUTS = {
    # name: (file name, content or None for a missing file, expected message pattern)
    "missing-file": ("nope.jsonl", None, r"nope\.jsonl: no such file"),
    "empty-file": ("empty.jsonl", "", r"empty\.jsonl: empty file"),
    "bad-json-line-3": ("r.jsonl", _lines(ROW, ROW, '{"collective": "all_reduce",'),
                        r"r\.jsonl:3: not valid JSON"),
    "missing-time_us-line-2": ("r.jsonl", _lines(ROW, _without(ROW, "time_us")),
                               r"r\.jsonl:2: field 'time_us': missing"),
    "wrong-type-bytes": ("r.jsonl", _lines({**ROW, "bytes": "64M"}),
                         r"r\.jsonl:1: field 'bytes': expected an integer, got a string"),
    "missing-node-of": ("r.jsonl", _lines({**ROW, "topology": _without(ROW["topology"],
                                                                       "node_of")}),
                        r"r\.jsonl:1: field 'topology\.node_of': missing"),
    "negative-time": ("r.jsonl", _lines({**ROW, "time_us": -1}),
                      r"r\.jsonl:1: field 'time_us': expected a finite number > 0"),
    "profile-version-2": ("p.json", json.dumps({**PROFILE, "version": 2}),
                          r"p\.json: field 'version': unsupported version 2"),
    "profile-missing-alpha": ("p.json", json.dumps({**PROFILE, "links": {
        "intra": _without(PROFILE["links"]["intra"], "alpha_us")}}),
        r"p\.json: field 'links\.intra\.alpha_us': missing"),
    "tuning-gap": ("t.json", json.dumps(_bad_range_tuning()),
                   r"t\.json: field 'collectives\.all_reduce\.ranges\[2\]\.lo': expected "
                   r"262144"),
    "unknown-schema": ("x.json", json.dumps({"schema": "topocoll.other", "version": 1}),
                       r"x\.json: field 'schema': unknown schema 'topocoll.other'"),
    "broken-document": ("t.json", json.dumps(TUNING, indent=1)[:-40],
                        r"t\.json:\d+: not valid JSON"),
    "not-an-input": ("x.json", json.dumps({"hello": 1}), r"x\.json: not a topocoll input"),
}


def _write_case(tmp_path: Path, name: str, content: str | None) -> Path:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    return path


@pytest.mark.parametrize("case", sorted(BAD_INPUTS), ids=sorted(BAD_INPUTS))
def test_bad_input_names_file_line_and_field(tmp_path: Path, case: str) -> None:
    name, content, pattern = BAD_INPUTS[case]
    path = _write_case(tmp_path, name, content)
    with pytest.raises(InputError) as info:
        load_inputs([path])
    assert re.search(pattern, str(info.value)), f"{case}: {info.value}"
    assert str(path) in str(info.value), f"{case}: message does not name the file"


def test_directory_without_inputs_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="holds no"):
        load_inputs([tmp_path])


@pytest.mark.parametrize("case", ["missing-file", "missing-time_us-line-2",
                                  "profile-version-2"])
def test_cli_bad_input_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          case: str) -> None:
    name, content, pattern = BAD_INPUTS[case]
    path = _write_case(tmp_path, name, content)
    assert main(["report", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("topocoll report: error: ") and err.count("\n") == 1, err
    assert re.search(pattern, err) and "Traceback" not in err, err
    assert not (tmp_path / "out").exists(), "nothing is written for a bad input"


@needs_matplotlib
def test_cli_writes_report_and_prints_its_path(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["report", str(DATA / "mpi_alltoall.jsonl"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'index.html'}" in printed and (out / "index.html").is_file()
