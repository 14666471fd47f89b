"""`topocoll report RESULTS... --out DIR`: inputs -> figures -> index.html + report.md.

    from topocoll.reports.generate import write_report
    index = write_report([Path("results")], Path("results/report"))

The output directory holds `index.html` (self-contained: opens from disk, figures
embedded), `report.md` (for an issue or PR) and `figures/` with every figure as PNG and
SVG. This module only orders the steps; each step lives in its own module.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from topocoll.extras import MissingExtraError, require
from topocoll.reports import markdown, page
from topocoll.reports.analysis import Analysis, analyze
from topocoll.reports.figures import FigureFile, render_all
from topocoll.reports.inputs import InputError, load_inputs

EXIT_BAD_INPUT = 2
FIGURES = "figures"


def write_report(inputs: list[Path], out_dir: Path) -> Path:
    """Write the report of `inputs` (files or directories) into out_dir; return index.html.

    Raises InputError (a ValueError naming file, line and field) for a bad input and
    MissingExtraError when matplotlib is not installed, before anything is written.
    """
    require("matplotlib", "topocoll report")
    loaded = load_inputs(inputs)
    analysis = analyze(loaded)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures, notes = render_all(analysis, out_dir / FIGURES)
    _remove_stale(out_dir / FIGURES, figures)
    headline = pick_headline(analysis, figures)
    index = out_dir / "index.html"
    index.write_text(page.render(analysis, figures, notes, out_dir, loaded.files, headline),
                     encoding="utf-8")
    (out_dir / "report.md").write_text(markdown.render(analysis, notes, headline, out_dir),
                                       encoding="utf-8")
    return index


def pick_headline(analysis: Analysis, figures: list[FigureFile]) -> FigureFile | None:
    """The figure a reader should see first: all-reduce speedup over the baselines if
    measured, else any speedup figure, else the first bandwidth figure."""
    by_key = {f.key: f for f in figures}
    order = ["speedup:all_reduce", *(f"speedup:{c}" for c in analysis.by_collective())]
    for key in order:
        if key in by_key:
            return by_key[key]
    return next((f for f in figures if f.key.startswith("busbw:")), None)


def _remove_stale(directory: Path, keep: list[FigureFile]) -> None:
    """Figures of an earlier run into the same directory would be linked by nothing."""
    if not directory.is_dir():
        return
    wanted = {p.name for f in keep for p in (f.png, f.svg)}
    for path in directory.iterdir():
        if path.suffix in (".png", ".svg") and path.name not in wanted:
            path.unlink()


def cmd_report(args: argparse.Namespace) -> int:
    """The CLI handler: one line on stderr and exit status 2 for any bad input."""
    try:
        index = write_report([Path(p) for p in args.results], Path(args.out))
    except (InputError, MissingExtraError) as exc:
        print(f"topocoll report: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:
        print(f"topocoll report: error: cannot write {args.out}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"report: {index}")
    print(f"summary: {index.parent / 'report.md'}")
    return 0
