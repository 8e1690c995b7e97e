"""The run's report: what a researcher opens a run for (issue 7).

`write_report(run_root)` reads the merged tables (docs/design.md §7) and writes `<run_root>/report/`:
`report.html` (self-contained, PNG figures beside it) and `summary.md` (also the flow's artifact).

- `analysis.py`: the numbers, pure functions on polars frames (profile, correlations, layer choice, ...);
- `load.py`: reads a run root into `RunData` (every file the report reads);
- `figures.py`, `markdown.py`, `html.py`: render an `Analysis` (figures import the analysis only);
- `write.py`: `write_report` composes them and swaps the directory in whole.
"""

from layertime.report.analysis import (
    Analysis,
    RunData,
    analyze,
    arm_table,
    checkpoint_index,
    correlation_table,
    correlations,
    layer_choice,
    reference_comparison,
    scoring_seconds,
    task_table,
)
from layertime.report.load import load_run
from layertime.report.write import ReportPaths, write_report

__all__ = [
    "Analysis",
    "ReportPaths",
    "RunData",
    "analyze",
    "arm_table",
    "checkpoint_index",
    "correlation_table",
    "correlations",
    "layer_choice",
    "load_run",
    "reference_comparison",
    "scoring_seconds",
    "task_table",
    "write_report",
]
