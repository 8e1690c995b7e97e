"""`write_report`: a run's report directory, composed from the analysis and its three renderings.

`<run_root>/report/` holds `report.html` (self-contained, PNG figures beside it) and `summary.md`
(also the flow's artifact); it is built aside and swapped in whole (`layertime.io.atomic_write_dir`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from layertime.io import atomic_write_dir
from layertime.report import figures
from layertime.report.analysis import analyze
from layertime.report.html import render_html
from layertime.report.load import load_run
from layertime.report.markdown import summary_markdown


@dataclass
class ReportPaths:
    """What `write_report` wrote, and the summary for a Prefect markdown/table artifact."""

    directory: Path
    html: Path
    summary_md: Path
    figures: dict[str, Path]  # figure name -> PNG beside report.html
    markdown: str  # the text of summary.md
    table: list[dict]  # key numbers per checkpoint (for create_table_artifact)
    gaps: int  # evaluations of the spec's grid without a score


def write_report(run_root: Path, out_dir: Path | None = None, failures: Sequence[str] = ()) -> ReportPaths:
    """Write `report.html`, its PNG figures and `summary.md` into `out_dir` (default `<run_root>/report`).

    `failures` (e.g. the flow's `score[step1000 · DemoSTS · L3]: ValueError: ...` lines) are listed in
    the report. The directory is built aside and swapped in whole: a reader sees the old report or the
    new one, never a mix.
    """
    run_root = Path(run_root)
    out = Path(out_dir) if out_dir is not None else run_root / "report"
    analysis = analyze(load_run(run_root), failures)
    written: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        written["made"] = made = figures.draw_all(analysis, tmp)
        written["markdown"], written["table"] = summary_markdown(analysis, out / "report.html")
        (tmp / "summary.md").write_text(written["markdown"])  # inside the temp directory: swapped in whole
        (tmp / "report.html").write_text(render_html(analysis, made, out))

    atomic_write_dir(out, write)
    gaps = analysis.coverage.filter(~pl.col("present")).height
    paths = {name: out / p.name for name, p in written["made"].items()}
    return ReportPaths(
        out, out / "report.html", out / "summary.md", paths, written["markdown"], written["table"], gaps
    )
