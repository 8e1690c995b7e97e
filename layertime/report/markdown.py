"""`summary.md`: the report's headline numbers in markdown (also the flow's Prefect artifact)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from layertime.report.analysis import (
    Analysis,
    key_numbers,
    profile_frame,
    reference_comparison,
    search_path,
)

MD_CHECKPOINTS = 12  # rows of the per-checkpoint table in summary.md
MD_FAILURES = 20


def summary_markdown(a: Analysis, html_path: Path | None = None) -> tuple[str, list[dict]]:
    """The markdown summary (headline numbers, key table, layer choice, gaps) and the key-number rows."""
    table = key_numbers(a)
    done = a.coverage["present"].sum()
    lines = [f"# {title(a)}", "", facts_line(a), "",
             f"**Progress**: {done}/{a.coverage.height} evaluations scored."]  # fmt: skip
    lines += ["", *profile_lines(a)]
    if table:
        shown = table[-MD_CHECKPOINTS:]
        lines += ["", "## Per checkpoint (average main score ×100, rule a)", "", *_md_table(shown)]
        if len(shown) < len(table):
            lines += ["", f"(the last {len(shown)} of {len(table)} checkpoints; all in report.html)"]
    if a.choice_summary.height:
        rows = [_choice_row(r) for r in _top_choices(a.choice_summary).iter_rows(named=True)]
        lines += ["", "## Label-free layer choice", "", *_md_table(rows)]
    lines += search_lines(a)
    if a.notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in a.notes]]
    if a.failures:
        lines += ["", "## Failed units", "", *[f"- `{f}`" for f in a.failures[:MD_FAILURES]]]
        lines += [f"- … and {len(a.failures) - MD_FAILURES} more"] if len(a.failures) > MD_FAILURES else []
    if html_path is not None:
        lines += ["", f"Full report (figures, per-task tables, correlations): `{html_path.resolve()}`"]
    return "\n".join(lines) + "\n", table


def search_lines(a: Analysis) -> list[str]:
    """The "Layer search" section (tables/search.json, search_arms): the chosen arm with its credible
    interval, why the search stopped, its cost against the full grid, the best layer's path; empty
    without a search."""
    found = a.run.search
    if found is None:
        return []
    lines = ["", "## Layer search", ""]
    chosen = found.get("chosen")
    if chosen is None:
        lines.append("No arm was evaluated on every task: no choice.")
    else:
        lines += [
            f"**Chosen: {chosen['checkpoint']}, layer {chosen['layer']}** (block index; step "
            f"{fmt(chosen['step'])}): rule-(a) average **{chosen['value']:.2f}** points over "
            f"{len(found['tasks'])} tasks; credible interval of the grid's best (95%): "
            f"[{chosen['value']:.2f}, {chosen['best_upper']:.2f}]; P(best within {found['epsilon']:g} "
            f"points of the chosen arm) = {chosen['probability']:.3f}.",
        ]
    if found.get("stop"):
        lines += ["", f"Stopped: {found['stop']}."]
    lines += ["", *_md_table(search_cost_rows(found))]
    path = search_path(a.run.search_arms) if a.run.search_arms is not None else None
    if path is not None and path.height:
        rows = [{"checkpoint": r["checkpoint"], "step": r["step"], "best layer": r["layer"],
                 "predicted": fmt(r["mean"]), "sd": fmt(r["sd"]), "evaluated": "yes" if r["evaluated"] else "no"}
                for r in path.iter_rows(named=True)]  # fmt: skip
        lines += [
            "",
            "Best layer over training (highest predicted mean per checkpoint):",
            "",
            *_md_table(rows),
        ]
    return lines


def search_cost_rows(found: dict) -> list[dict]:
    """The search's evaluations, CPU-h and GPU-h against the full grid's, from search.json's `spent`."""
    spent, rows = found["spent"], []
    for name, what in (("evaluations", "evaluations"), ("cpu_h", "CPU-h"), ("gpu_h", "GPU-h")):
        mine, grid = spent[name], spent[f"grid_{name}"]
        share = f"{100 * mine / grid:.1f}%" if grid else "—"
        rows.append({"": what, "search": f"{mine:.4g}", "full grid": f"{grid:.4g}", "share": share})
    return rows


def title(a: Analysis) -> str:
    name = a.run.spec.name if a.run.spec is not None else a.run.root.name
    return f"{name}: {a.grid.model}"


def facts_line(a: Analysis) -> str:
    g = a.grid
    layers = ranges(g.layers) or "(known once a row is in)"
    plural = "s" if len(g.revisions) != 1 else ""
    return (
        f"{len(g.revisions)} checkpoint{plural}, layers (0-based blocks) {layers}, {len(g.tasks)} tasks; "
        "layer b = hidden_states[b + 1] = the paper's layer index b + 1."
    )


def ranges(values: list[int]) -> str:
    if values and values == list(range(values[0], values[-1] + 1)) and len(values) > 1:
        return f"{values[0]}..{values[-1]}"
    return ", ".join(map(str, values))


def profile_lines(a: Analysis) -> list[str]:
    prof = profile_frame(a)
    if prof is None or prof.drop_nulls("average").height == 0:
        return [f"No layer of `{a.final}` has all its tasks yet." if a.final else "No scores yet."]
    scored = prof.drop_nulls("average")
    best = scored.row(int(np.argmax(scored["average"].to_numpy())), named=True)
    last = scored.filter(pl.col("layer") == a.grid.layers[-1])
    text = [f"`{a.final}`: best layer **{best['layer']}** (hidden state {best['hidden_state']}) at "
            f"**{100 * best['average']:.2f}**"]  # fmt: skip
    if last.height:
        text.append(f"last layer {a.grid.layers[-1]} at {100 * last['average'][0]:.2f}")
    lines = ["; ".join(text) + "."]
    ref = reference_comparison(a)
    if ref is not None and ref.height:
        pairs = ", ".join(
            f"L{r['paper_layer']}: ours {fmt(r['ours'])} vs paper {fmt(r['paper'])}"
            for r in ref.iter_rows(named=True)
        )
        lines.append(f"Paper's Pythia-410m `main` (×100, paper layer L = hidden state): {pairs}.")
    return lines


def _top_choices(summary: pl.DataFrame) -> pl.DataFrame:
    baselines = summary.filter(pl.col("kind") == "baseline")
    metrics = summary.filter(pl.col("kind") == "metric").head(5)
    return pl.concat([metrics, baselines])


def _choice_row(r: dict) -> dict:
    return {"strategy": r["strategy"], "checkpoints": r["n"], "picks best": f"{100 * r['hit_rate']:.0f}%",
            "mean score": fmt(100 * r["mean_score"]), "mean regret": fmt(100 * r["mean_regret"]),
            "max regret": fmt(100 * r["max_regret"])}  # fmt: skip


def _md_table(rows: list[dict]) -> list[str]:
    heads = list(rows[0])
    out = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    out += ["| " + " | ".join(fmt(r.get(h)) for h in heads) + " |" for r in rows]
    return out


def fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)
