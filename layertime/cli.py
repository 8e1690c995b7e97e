"""The `layertime` command: plan and run experiments (more commands arrive with their issues)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help=(
        "Score every hidden layer of a language model, at every training checkpoint, as a text "
        "embedding on MTEB.\n\nLayers are 0-based block indices: block b = hidden_states[b + 1]. "
        "Start with `layertime plan deployments/demo.yaml`, then `layertime run deployments/demo.yaml`."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

SpecPath = Annotated[Path, typer.Argument(help="experiment spec (YAML), e.g. deployments/exp2.yaml")]


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _load(path: Path):
    from layertime.spec import SpecError, load_spec

    try:
        return load_spec(path)
    except SpecError as e:
        _fail(str(e))


@app.command()
def plan(
    specs: Annotated[list[Path], typer.Argument(help="one or more experiment specs (YAML)")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Print the grid of each spec without touching a GPU: checkpoints, layers, tasks, evaluations, units.

    With several specs, also how many (commit, task, layer) units they share (computed once).
    """
    from layertime import plan as planning
    from layertime.pipeline import prepare_world
    from layertime.spec import SpecError

    plans = []
    for path in specs:
        spec = _load(path)
        prepare_world(spec)
        try:
            plans.append(planning.make_plan(spec))
        except SpecError as e:
            _fail(f"{path}: {e}")
    out = {"plans": [p.summary() for p in plans]}
    if len(plans) > 1:
        out["combined"] = planning.combined(plans)
    if as_json:
        typer.echo(json.dumps(out if len(plans) > 1 else out["plans"][0], indent=2))
        return
    for p in out["plans"]:
        typer.echo(f"{p['name']}: {p['model']}")
        typer.echo(f"  checkpoints {p['checkpoints']} ({p['distinct_checkpoints']} distinct commits)")
        typer.echo(f"  layers      {p['layers']} (blocks {_ranges(p['blocks'])}, 0-based block indices)")
        typer.echo(f"  tasks       {p['tasks']}")
        typer.echo(f"  evaluations {p['evaluations']:,}")
        u = p["units"]
        typer.echo(f"  units       score {u['score']:,}, embed {u['embed']:,}, measure {u['measure']:,}")
        for note in p["notes"]:
            typer.echo(f"  note: {note}")
    if "combined" in out:
        c = out["combined"]
        typer.echo(
            f"together: {c['evaluations']:,} evaluations, {c['distinct_score_units']:,} distinct score units "
            f"({c['shared_score_units']:,} shared, computed once)"
        )


def _ranges(blocks: list[int]) -> str:
    if blocks and blocks == list(range(blocks[0], blocks[-1] + 1)):
        return f"{blocks[0]}..{blocks[-1]}" if len(blocks) > 1 else str(blocks[0])
    return ", ".join(map(str, blocks))


@app.command()
def run(
    spec_path: SpecPath,
    device: Annotated[
        str | None, typer.Option(help="torch device; default cuda when present, else cpu")
    ] = None,
) -> None:
    """Run a spec in this process (no server, no cluster): embed, score and merge, resuming finished units."""
    spec = _load(spec_path)
    os.environ.setdefault("MTEB_CACHE", str(Path(spec.run_root) / "mteb"))
    from tqdm import tqdm

    _quiet_libraries()

    from layertime.checkpoints import CheckpointError
    from layertime.pipeline import run_spec

    bar = tqdm(total=None, unit="unit", desc=f"{spec.name}: (checkpoint, task) units", file=sys.stderr)

    def progress(phase: str, done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        result = run_spec(spec, progress=progress, device=device)
    except CheckpointError as e:
        bar.close()
        _fail(str(e))
    bar.close()
    typer.echo(f"scored {result.scored} (checkpoint, task, layer) units, {result.skipped} already done")
    typer.echo(
        f"texts: mteb asks for {result.texts_requested:,} per pass; forwarded {result.texts_embedded:,}"
    )
    typer.echo(f"run root: {result.run_root}")
    for name, path in result.tables.items():
        typer.echo(f"  {name:8s} {path}")


def _quiet_libraries() -> None:
    """Our progress bar, not the per-call bars and load reports of datasets and transformers."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()


if __name__ == "__main__":
    app()
