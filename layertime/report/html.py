"""`report.html`: the self-contained report page (inline CSS, no scripts; PNG figures beside it)."""

from __future__ import annotations

import html
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from layertime import tables
from layertime.report.analysis import (
    PAPER_REFERENCE,
    Analysis,
    distinct_checkpoints,
    gpu_seconds,
    key_numbers,
    oracle_average,
    reference_comparison,
    scoring_seconds,
    unique_values,
)
from layertime.report.markdown import fmt, profile_lines, ranges, search_lines, title

# ------------------------------------------------------------------------------------------- HTML

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d1d1f;
       max-width: 1180px; margin: 0 auto; padding: 24px 28px 60px; background: #fff; }
h1 { font-size: 26px; margin: 0 0 4px; } h2 { margin-top: 40px; border-bottom: 2px solid #e5e5ea;
     padding-bottom: 4px; } h3 { margin-top: 26px; }
.facts { color: #444; } .facts td { padding: 1px 14px 1px 0; vertical-align: top; }
.convention { background: #eef4fb; border-left: 4px solid #4575b4; padding: 8px 12px; margin: 14px 0; }
.notes { background: #fff6e0; border-left: 4px solid #e08214; padding: 8px 12px; margin: 14px 0; }
.notes li { margin: 2px 0; }
figure { margin: 14px 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 13px; max-width: 900px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 8px 18px; }
table.data { border-collapse: collapse; font-size: 13px; margin: 10px 0; }
table.data th, table.data td { border: 1px solid #e0e0e6; padding: 3px 8px; }
table.data th { background: #f4f4f7; text-align: left; }
table.data td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.data td.best { font-weight: 700; background: #e3f1e3; }
table.data td.gap { color: #999; background: repeating-linear-gradient(45deg, #fafafa, #fafafa 4px,
                    #f0f0f0 4px, #f0f0f0 8px); text-align: center; }
table.data tr.foot td { border-top: 2px solid #bbb; font-weight: 600; }
table.data td small { color: #666; }
details { margin: 6px 0; } summary { cursor: pointer; color: #1f4e8c; }
nav a { margin-right: 14px; } a { color: #1f4e8c; }
.muted { color: #666; font-size: 13px; }
"""


def render_html(a: Analysis, made: dict[str, Path], out: Path) -> str:
    """The self-contained report page (inline CSS, no scripts); figures are `<img>` beside it."""
    sections = [
        ("profile", "Layer profile", _html_profile(a, made)),
        ("training", "Across training", _html_training(a, made)),
        ("tasks", "Per-task scores", _html_tasks(a)),
        ("metrics", "Metrics vs score", _html_metrics(a, made)),
        ("choice", "Label-free layer choice", _html_choice(a, made)),
        ("search", "Layer search", _html_search(a, made)),
        ("progress", "Progress and cost", _html_progress(a, made, out)),
    ]
    sections = [(key, title, body) for key, title, body in sections if body]
    nav = " ".join(f'<a href="#{key}">{esc(title)}</a>' for key, title, _ in sections)
    body = "".join(f'<h2 id="{key}">{esc(title)}</h2>{content}' for key, title, content in sections)
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title(a))}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>'
        f"<body>{_html_header(a)}{_html_notes(a)}<nav>{nav}</nav>{body}"
        f'<p class="muted">Generated {now()} by layertime.report.</p></body></html>\n'
    )


CONVENTION = (
    "<div class='convention'><b>Layers</b> are 0-based block indices <i>b</i>: block <i>b</i>'s output "
    "is <code>hidden_states[b + 1]</code>, which the paper (Skean et al., 2025) calls layer "
    "L = <i>b</i> + 1. <b>Scores</b> are mteb main scores ×100; a layer's <b>average</b> is rule (a): "
    "the unweighted mean over the tasks, empty until every task is in. Revisions sharing a commit are "
    "one checkpoint (e.g. <code>step143000 = main</code>).</div>"
)


def _html_header(a: Analysis) -> str:
    env, g = a.run.environment, a.grid
    facts = [
        ("model", g.model),
        ("checkpoints", f"{len(g.revisions)}: {_short_list(g.revisions)}"),
        ("layers", f"{len(g.layers)}: blocks {ranges(g.layers)}"),
        ("tasks", f"{len(g.tasks)}"),
        ("settings", ", ".join(f"{k}={v}" for k, v in env.get("settings", {}).items()) or "—"),
        ("mteb", ", ".join(unique_values(a.run.scores["mteb_version"])) or "—"),
        ("code", env.get("git_commit") or "—"),
        ("run root", str(a.run.root)),
    ]
    rows = "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in facts)
    return f"<h1>{esc(title(a))}</h1><table class='facts'>{rows}</table>{CONVENTION}"


def _short_list(values: list[str], limit: int = 8) -> str:
    if len(values) <= limit:
        return ", ".join(values)
    return f"{', '.join(values[:3])}, …, {', '.join(values[-2:])}"


def _html_notes(a: Analysis) -> str:
    if not a.notes:
        return ""
    items = "".join(f"<li>{esc(n)}</li>" for n in a.notes)
    return f"<div class='notes'><b>Gaps and notes</b><ul>{items}</ul></div>"


def _img(made: dict[str, Path], name: str, caption: str) -> str:
    if name not in made:
        return ""
    file = made[name].name
    return f'<figure><img src="{esc(file)}" alt="{esc(name)}"><figcaption>{caption}</figcaption></figure>'


def _html_profile(a: Analysis, made: dict[str, Path]) -> str:
    if a.final is None:
        return "<p>No scores yet.</p>"
    ref = reference_comparison(a)
    caption = f"Rule-a average per layer of <code>{esc(a.final)}</code>. Circled: the best layer."
    if ref is not None:
        caption += " Red diamonds: the paper's Pythia-410m <code>main</code> values, at block b = L − 1."
    parts = [
        "".join(f"<p>{_md_inline(line)}</p>" for line in profile_lines(a)),
        _img(made, "profile", caption),
    ]
    if ref is not None:
        parts.append(_reference_html(ref))
    caption = "Mean main score per task type and layer (empty until all of the type's tasks are in)."
    parts.append(_img(made, "profile_types", caption))
    return "".join(parts)


def _reference_html(ref: pl.DataFrame) -> str:
    head = ["paper layer L", "block b", "ours", "paper", "ours − paper"]
    body = [
        [r["paper_layer"], r["block"], r["ours"], r["paper"], r["diff"]] for r in ref.iter_rows(named=True)
    ]
    out = "<h3>Against the paper (Pythia-410m main, ×100)</h3>" + _html_table(head, body)
    missing = sorted(set(PAPER_REFERENCE) - set(ref["paper_layer"].to_list()))
    if missing:
        out += f"<p class='muted'>Paper layers not in this run: {', '.join(f'L{m}' for m in missing)}.</p>"
    return out


def _html_training(a: Analysis, made: dict[str, Path]) -> str:
    if distinct_checkpoints(a).height < 2:
        return ""
    head = [
        "checkpoint",
        "step",
        "best layer",
        "best average",
        "last layer",
        "oracle average",
        "tasks scored",
    ]
    keys = ["checkpoint", "step", "best_layer", "best_average", "last_layer_average", "oracle_average"]
    body = [[r.get(k) for k in keys] + [r["tasks_scored"]] for r in key_numbers(a)]
    heatmap = (
        "Rule-a average per checkpoint and layer. White outline: each checkpoint's best layer (only where "
        "every layer is in). Hatched: not all tasks scored yet."
    )
    steps = "The same numbers over training steps; circles mark each complete checkpoint's best layer."
    oracle = (
        "<p class='muted'>Oracle average: the mean over tasks of each task's best layer (an upper bound "
        "no single layer reaches).</p>"
    )
    tables_ = "<h3>Per checkpoint</h3>" + _html_table(head, body) + oracle
    return _img(made, "heatmap", heatmap) + _img(made, "steps", steps) + tables_


def _html_tasks(a: Analysis) -> str:
    if a.tasks.height == 0:
        return "<p>No task scores yet.</p>"
    ckpts = distinct_checkpoints(a)
    blocks = []
    for i, (ckpt, label) in enumerate(ckpts.select("checkpoint", "label").iter_rows()):
        arms = a.arms.filter(pl.col("checkpoint") == ckpt)
        averages = dict(zip(arms["layer"], arms["average"], strict=True))
        table = _task_matrix(
            a.tasks.filter(pl.col("checkpoint") == ckpt), averages, a.grid.layers, a.grid.tasks
        )
        opened = " open" if i == ckpts.height - 1 else ""
        blocks.append(f"<details{opened}><summary>{esc(label)}</summary>{table}</details>")
    intro = (
        "<p>Main score ×100 per task and layer; bold: the task's best layer. Footer: the rule-a average "
        "per layer and, under <i>best layer</i>, the oracle average (each task at its best layer).</p>"
    )
    return intro + "".join(blocks)


def _task_matrix(
    rows: pl.DataFrame, averages: dict[int, float | None], layers: list[int], tasks: list[str]
) -> str:
    """Scores per task and layer; the footer shows the arms' rule-a `average` (the one computation)."""
    score = {(r["task"], r["layer"]): r["score"] for r in rows.iter_rows(named=True)}
    head = ["task", "type", *[f"block {b} (L{b + 1})" for b in layers], "best layer"]
    body = [_task_row(task, [score.get((task, b)) for b in layers], layers) for task in _by_type(tasks)]
    footer = "".join(_cell(averages.get(b), False) for b in layers)
    oracle = _cell(oracle_average(rows, tasks), False, "oracle ")
    body.append(f"<tr class='foot'><td>average (rule a)</td><td></td>{footer}{oracle}</tr>")
    return _html_table(head, body, raw_rows=True)


def _by_type(tasks: list[str]) -> list[str]:
    return sorted(tasks, key=lambda t: (tables.task_type(t), t))


def _task_row(task: str, values: list[float | None], layers: list[int]) -> str:
    present = [v for v in values if v is not None]
    best = max(present) if present else None
    cells = "".join(_cell(v, v is not None and v == best) for v in values)
    best_layer = layers[values.index(best)] if best is not None else None
    kind = tables.task_type(task)
    return f"<tr><td>{esc(task)}</td><td>{esc(kind)}</td>{cells}<td class='num'>{esc(best_layer)}</td></tr>"


def _cell(value: float | None, best: bool, prefix: str = "") -> str:
    if value is None:
        return "<td class='gap'>—</td>"
    return f"<td class='num{' best' if best else ''}'>{esc(prefix)}{100 * value:.2f}</td>"


def _html_metrics(a: Analysis, made: dict[str, Path]) -> str:
    if a.correlations.height == 0:
        return "<p>No representation metrics in this run.</p>"
    figures_ = "".join(_img(made, name, "") for name in made if name.startswith("metric_"))
    complete = a.arms.drop_nulls("average").height
    intro = (
        f"<p>Each point is one arm (checkpoint, layer); {complete} arms have a complete average. Spearman ρ "
        "and Kendall τ (τ-b) with two-sided p-values (scipy.stats); the table also correlates each metric "
        "with each task type's mean. Bold: Spearman p &lt; 0.05.</p>"
    )
    table = _corr_html(a.correlations)
    return f"{intro}<div class='grid'>{figures_}</div><h3>Correlations per task type</h3>{table}"


def _corr_html(corr: pl.DataFrame) -> str:
    targets = list(dict.fromkeys(corr["target"]))
    cells = {(r["metric"], r["target"]): _corr_cell(r) for r in corr.iter_rows(named=True)}
    body = [
        f"<tr><td>{esc(metric)}</td>{''.join(cells[(metric, t)] for t in targets)}</tr>"
        for metric in dict.fromkeys(corr["metric"])
    ]
    return _html_table(["metric", *[t.removeprefix("avg_") for t in targets]], body, raw_rows=True)


def _corr_cell(c: dict) -> str:
    if c["spearman"] is None:
        return f"<td class='gap' title='too few pairs or a constant side'>— <small>n={c['n']}</small></td>"
    rho = c["spearman"]
    style = f"background: hsl({10 if rho < 0 else 215}, 70%, {97 - 30 * abs(rho):.0f}%)"
    style += "; font-weight: 700" if c["spearman_p"] < 0.05 else ""
    spearman = f"ρ {rho:+.2f} <small>p {c['spearman_p']:.2g}</small>"
    kendall = f"τ {c['kendall']:+.2f} <small>p {c['kendall_p']:.2g}</small>"
    return f"<td class='num' style='{style}'>{spearman}<br>{kendall}</td>"


def _html_choice(a: Analysis, made: dict[str, Path]) -> str:
    if a.choice_summary.height == 0:
        return "<p>No checkpoint has every layer scored (and measured) yet: nothing to choose from.</p>"
    head = ["strategy", "checkpoints", "picks best", "mean score", "mean regret", "max regret"]
    body = [
        [r["strategy"], r["n"], f"{100 * r['hit_rate']:.0f}%", 100 * r["mean_score"],
         100 * r["mean_regret"], 100 * r["max_regret"]]
        for r in a.choice_summary.iter_rows(named=True)
    ]  # fmt: skip
    judged, total = a.choices["checkpoint"].n_unique(), distinct_checkpoints(a).height
    explain = (
        f"<p>Judged on <b>{judged} of {total}</b> checkpoints: those with every layer scored and measured. "
        "For each, every strategy picks one layer without labels: a metric picks the layer where it is "
        f"highest or lowest (both signs shown), <i>last layer</i> takes block {a.grid.layers[-1]}, "
        "<i>random layer</i> is the expected value of a uniform choice. Regret = the best layer's average "
        "− the chosen layer's (×100). Choosing a metric's sign after seeing this table is itself a use "
        "of labels: fix the sign in advance (e.g. from another run) for an honest test.</p>"
    )
    caption = "Mean regret per strategy; text: share of checkpoints where it picked the best layer."
    return explain + _img(made, "layer_choice", caption) + _html_table(head, body)


def _html_search(a: Analysis, made: dict[str, Path]) -> str:
    """The layer search's choice, cost and path (the markdown section's lines) and its two figures."""
    lines = search_lines(a)
    if not lines:
        return ""
    parts, table = [], []
    for line in lines[3:]:  # after the section's heading
        if line.startswith("|"):
            table.append(line)
            continue
        if table:
            parts.append(_md_table_html(table))
            table = []
        if line:
            parts.append(f"<p>{_md_inline(line)}</p>")
    if table:
        parts.append(_md_table_html(table))
    heat = ("Predicted rule-a average of every arm (the search's model; exact where evaluated). Dots: "
            "evaluated arms; star: the chosen arm; hatched: not predicted yet.")  # fmt: skip
    path = "Per checkpoint, the layer with the highest predicted mean; filled: that arm was evaluated."
    return "".join(parts) + _img(made, "search_heatmap", heat) + _img(made, "search_path", path)


def _md_table_html(lines: list[str]) -> str:
    """A markdown table's lines (header, rule, rows) as an HTML table."""
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return _html_table(cells[0], cells[2:])


def _html_progress(a: Analysis, made: dict[str, Path], out: Path) -> str:
    cost = _img(made, "cost", "mteb scoring time per task (CPU seconds, all arms).")
    parts = [_failures_html(a.failures), _coverage_html(a), _missing_html(a.coverage), _cost_html(a), cost]
    return "".join([*parts, _texts_html(a), _links_html(a.run.csv_tables, out)])


def _failures_html(failures: list[str]) -> str:
    if not failures:
        return ""
    items = "".join(f"<li><code>{esc(f)}</code></li>" for f in failures)
    return f"<h3>Failed units ({len(failures)})</h3><ul>{items}</ul>"


def _coverage_html(a: Analysis) -> str:
    cov = a.coverage.group_by("revision", maintain_order=True).agg(
        pl.col("present").sum(), pl.len().alias("n")
    )
    complete = (
        a.coverage.group_by("revision", "layer")
        .agg(pl.col("present").all())
        .group_by("revision")
        .agg(pl.col("present").sum().alias("complete"))
    )
    measured = (
        a.run.metrics.select("revision", "layer")
        .unique()
        .group_by("revision")
        .agg(pl.len().alias("measured"))
    )
    table = cov.join(complete, on="revision", how="left").join(measured, on="revision", how="left")
    n_l, n_m = len(a.grid.layers), len(a.grid.metric_layers)
    head = ["revision", "evaluations scored", "layers complete", "metric layers measured"]
    body = [
        [r["revision"], f"{r['present']}/{r['n']}", f"{r['complete'] or 0}/{n_l}",
         f"{r['measured'] or 0}/{n_m}" if n_m else "—"]
        for r in table.iter_rows(named=True)
    ]  # fmt: skip
    done = int(a.coverage["present"].sum())
    return f"<p><b>{done}/{a.coverage.height}</b> evaluations scored.</p>" + _html_table(head, body)


def _missing_html(cov: pl.DataFrame, limit: int = 300) -> str:
    missing = cov.filter(~pl.col("present"))
    if missing.height == 0:
        return "<p>Nothing missing: every evaluation of the spec's grid has a score.</p>"
    rows = missing.head(limit).iter_rows()
    items = "".join(f"<li>{esc(rev)} · {esc(task)} · block {b}</li>" for rev, b, task, _ in rows)
    more = f"<li>… and {missing.height - limit} more</li>" if missing.height > limit else ""
    summary = f"{missing.height} evaluations without a score (failed or not run yet)"
    return f"<details><summary>{summary}</summary><ul>{items}{more}</ul></details>"


def _cost_html(a: Analysis) -> str:
    per_task = scoring_seconds(a.run.scores)
    total, rows = per_task["seconds"].sum(), per_task["rows"].sum()
    text = (
        f"<p>Scoring (CPU, <code>mteb.evaluate</code>): <b>{total:,.1f} s</b> over {rows} subset scores "
        "computed (a commit named twice, like main = step3000, counted once).</p>"
    )
    if a.run.costs is None:
        return text + "<p>Embedding and metric passes: not timed in this run's tables.</p>"
    gpu = gpu_seconds(a.run.costs)
    items = "".join(
        f"<li>{esc(r['phase'])} ({esc(r['device'])}): <b>{r['seconds']:,.1f} s</b> over {r['units']} units"
        + (f", {r['unique_texts']:,} texts forwarded, {r['real_tokens']:,} real / {r['padded_tokens']:,} "
           "padded tokens" if r["phase"] == "embed" and r["unique_texts"] else "")
        + "</li>"
        for r in gpu.iter_rows(named=True)
    )  # fmt: skip
    return text + f"<p>Forward passes (the GPU phases, timed when they ran):</p><ul>{items}</ul>"


def _texts_html(a: Analysis) -> str:
    info = a.run.texts
    if info.height == 0:
        return ""
    n_ckpt, n_rev, n_l = distinct_checkpoints(a).height, len(a.grid.revisions), len(a.grid.layers)
    requested, unique = int(info["requested"].sum()), int(info["unique"].sum())
    head = ["task", "texts mteb asks for (one evaluation)", "unique texts (forwarded once per checkpoint)"]
    body = [[r["task"], r["requested"], r["unique"]] for r in info.iter_rows(named=True)]
    body.append(["all tasks", requested, unique])
    text = (
        f"<p>mteb asks for {requested:,} texts per (checkpoint, layer) evaluation of all tasks; the run "
        "forwards each unique text once per checkpoint for all layers: "
        f"{unique * n_ckpt:,} forward texts for the grid, against {requested * n_rev * n_l:,} if every "
        "evaluation encoded its own.</p>"
    )
    return "<h3>Texts</h3>" + text + _html_table(head, body)


def _links_html(found: list[Path], out: Path) -> str:
    if not found:
        return ""
    links = " · ".join(f'<a href="{esc(os.path.relpath(p, out))}">{esc(p.name)}</a>' for p in found)
    return f"<h3>Tables</h3><p>{links}</p>"


def _html_table(head: list[str], body: list, raw_rows: bool = False) -> str:
    """A table; `body` holds value lists (escaped, numbers right-aligned) or, with raw_rows, `<tr>` HTML."""
    thead = "".join(f"<th>{esc(h)}</th>" for h in head)
    rows = "".join(body) if raw_rows else "".join(f"<tr>{''.join(map(_td, row))}</tr>" for row in body)
    return f"<table class='data'><thead><tr>{thead}</tr></thead><tbody>{rows}</tbody></table>"


def _td(value: Any) -> str:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f"<td class='num'>{esc(value)}</td>" if numeric else f"<td>{esc(value)}</td>"


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _md_inline(text: str) -> str:
    """HTML of one markdown line that uses only **bold** and `code`."""
    out = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(text))
    return re.sub(r"`(.+?)`", r"<code>\1</code>", out)


def esc(value: Any) -> str:
    return html.escape(value if isinstance(value, str) else fmt(value))
