"""The library's commands: plan, prefetch, verify, report (no Prefect or Dask here), and the helpers
of `run`.

The `layertime` command is these commands plus the ones that run flows (`run`, `submit`,
`slurm-script`), which the orchestration layer adds to `app` (layertime_command.py at the checkout's
root). The library never imports it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shlex
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from layertime.rundir import RunDir

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

T = TypeVar("T")

SpecPath = Annotated[Path, typer.Argument(help="experiment spec (YAML), e.g. deployments/exp2.yaml")]


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def load(path: Path):
    from layertime.spec import SpecError, load_spec

    try:
        return load_spec(path)
    except SpecError as e:
        fail(str(e))


@app.command()
def plan(
    specs: Annotated[list[Path], typer.Argument(help="one or more experiment specs (YAML)")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    gpu_jobs: Annotated[
        int, typer.Option("--gpu-jobs", min=1, help="GPU slots (slurm profile: its max_jobs)")
    ] = 1,
    cpu_jobs: Annotated[
        int | None,
        typer.Option(
            "--cpu-jobs",
            min=1,
            help="one-thread scoring processes (slurm: score_jobs × score_cpus; default: this machine's cores)",
        ),
    ] = None,
    bigmem_jobs: Annotated[
        int,
        typer.Option(
            "--bigmem-jobs", min=0, help="big-memory scoring slots for MindSmallReranking (0: none)"
        ),
    ] = 0,
    gpu_tflops: Annotated[
        float, typer.Option("--gpu-tflops", min=0.001, help="ASSUMED achieved TFLOP/s of one GPU")
    ] = 100.0,
    gpu_from: Annotated[
        Path | None,
        typer.Option(
            "--gpu-from", help="a finished run's root: take the GPU's rate from its tables/costs.csv instead"
        ),
    ] = None,
) -> None:
    """Print the grid of each spec without touching a GPU: checkpoints, layers, tasks, evaluations, units,
    and what it will cost: CPU- and GPU-hours per phase, memory per worker, wall-clock on the given jobs.

    With several specs, also how many (commit, task, layer) units they share (computed once).
    CPU figures come from the measured cost table (layertime/task_costs.csv); GPU figures are derived
    from FLOPs at an ASSUMED achieved rate (--gpu-tflops).
    """
    from layertime import costs
    from layertime import plan as planning
    from layertime.checkpoints import CheckpointError
    from layertime.demo.world import prepare_world
    from layertime.spec import SpecError

    plans = []
    for path in specs:
        spec = load(path)
        prepare_world(spec)
        try:
            plans.append(planning.make_plan(spec))
        except (SpecError, CheckpointError) as e:  # a bad layer range; a damaged cache (a bad ref)
            fail(f"{path}: {e}")
    cpu_jobs = cpu_jobs or os.cpu_count() or 1
    out = {"plans": []}
    for p in plans:
        grid = p.cost_grid()  # before summary(): it may add a note
        flops, source = _gpu_rate(gpu_tflops, gpu_from, costs.forward_params(grid.num_blocks, grid.hidden))
        est = costs.estimate(grid, gpu_jobs, cpu_jobs, bigmem_jobs, flops, source)
        out["plans"].append({**p.summary(), "costs": est})
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
        _echo_costs(p["costs"])
        for note in p["notes"]:
            typer.echo(f"  note: {note}")
    if "combined" in out:
        c = out["combined"]
        typer.echo(
            f"together: {c['evaluations']:,} evaluations, {c['distinct_score_units']:,} distinct score units "
            f"({c['shared_score_units']:,} shared, computed once)"
        )


def _gpu_rate(tflops: float, run_root: Path | None, params: int) -> tuple[float, str | None]:
    """FLOP/s for the GPU estimates: measured from a finished run's costs table, else the assumed rate."""
    from layertime import costs

    if run_root is None:
        return tflops * 1e12, None
    try:
        return costs.measured_gpu_flops(run_root / "tables" / "costs.csv", params)
    except (OSError, ValueError, KeyError) as e:
        fail(f"--gpu-from: {e}")
        raise  # unreachable: fail() exits


def _hours(hours: float) -> str:
    return f"{hours * 60:.0f} min" if hours < 1 else f"{hours:,.1f} h"


def _echo_costs(c: dict) -> None:
    """The plan's cost lines: hours per phase, memory per worker class, simulated wall-clock time."""
    h, mem, jobs = c["hours"], c["memory_gb"], c["jobs"]
    typer.echo(
        f"  CPU-hours   score {h['score']['cpu']:,.1f} ({c['score_cpu_s_per_checkpoint_layer']:,.0f} CPU-s per "
        f"checkpoint × layer), record {h['record']['cpu']:.2f}"
    )
    typer.echo(
        f"  GPU-hours   embed {h['embed']['gpu']:,.2f}, measure {h['measure']['gpu']:,.2f}, waiting for "
        f"checkpoint loads {h['loads']['gpu']:,.2f} (see 'assumed' below)"
    )
    big = ""
    if mem["big_memory_worker"]:
        where = (
            "on its own jobs" if jobs["big_memory"] else "no big-memory jobs: every scoring worker needs it"
        )
        big = f", big-memory worker {mem['big_memory_worker']} GB (MindSmallReranking; {where})"
    typer.echo(
        f"  memory      GPU worker {mem['gpu_worker']} GB, scoring worker {mem['scoring_worker']} GB{big}"
    )
    typer.echo(
        f"  wall-clock  {_hours(c['wall_hours'])} on {jobs['gpu']} GPU + {jobs['cpu']} CPU"
        + (f" + {jobs['big_memory']} big-memory" if jobs["big_memory"] else "")
        + f" jobs; GPU phase {_hours(c['gpu_phase_hours'])}, GPU jobs held {c['gpu_held_hours']:,.2f} GPU-h"
        + f" in all, computing {c['gpu_busy']:.0%} of it"
    )
    gpu, measure = c["assumptions"][:2]
    typer.echo(f"  assumed     {gpu}")
    typer.echo(f"              {measure}")
    typer.echo(f"  measured    CPU: {c['table']} (task_costs.csv, one BLAS thread)")


def _ranges(blocks: list[int]) -> str:
    if blocks and blocks == list(range(blocks[0], blocks[-1] + 1)):
        return f"{blocks[0]}..{blocks[-1]}" if len(blocks) > 1 else str(blocks[0])
    return ", ".join(map(str, blocks))


def prepare_run(spec_path: Path):
    """Load the spec, point mteb's cache at the store, quiet library noise, check checkpoints exist."""
    spec = load(spec_path)
    _check_writable(spec)
    _check_free(spec)
    os.environ.setdefault("MTEB_CACHE", str(RunDir.of(spec.run_root, spec.store).mteb_results))
    _quiet_libraries()
    _check_checkpoints(spec)
    return spec


def _check_writable(spec) -> None:
    """Fail before any work when the run root or the store cannot be created and written."""
    from layertime.io import unwritable

    run = RunDir.of(spec.run_root, spec.store)
    for field, path in (("run_root", run.root), ("store", run.store)):
        if (problem := unwritable(path)) is not None:
            fail(f"{field}: cannot write {path}: {problem}")
    # Directories a finished run wrote: permission bits do not show an immutable one (chattr +i,
    # EPERM even for root), so each is tried with an unnamed temp file, which leaves no trace.
    for field, path in (("run_root", run.root), ("run_root", run.tables), ("run_root", run.root / "report"),
                        ("store", run.store)):  # fmt: skip
        if path.is_dir():
            try:
                tempfile.TemporaryFile(dir=path).close()
            except OSError as e:
                fail(f"{field}: cannot write {path}: {e.strerror}")


def _check_free(spec) -> None:
    """Refuse a run root another run holds now, in a second (the flow would first start Prefect)."""
    from layertime.rundir import RunInUse

    try:
        RunDir.of(spec.run_root, spec.store).check_free()
    except RunInUse as e:
        fail(str(e))


def _check_checkpoints(spec) -> None:
    """Fail before any work when a checkpoint or the model config cannot be found."""
    from layertime.checkpoints import CheckpointError
    from layertime.demo.world import prepare_world
    from layertime.plan import make_plan
    from layertime.spec import SpecError

    prepare_world(spec)
    try:
        make_plan(spec, strict=True)
    except (CheckpointError, SpecError) as e:
        fail(str(e))


def resume_command(
    spec_path: Path, cluster: str = "local", plain: bool = False, device: str | None = None
) -> str:
    """The command that resumes a stopped run (never --force: that would recompute what is finished)."""
    args = ["layertime", "run", str(spec_path)]
    args += ["--plain"] if plain else ([] if cluster == "local" else ["--cluster", cluster])
    args += ["--device", device] if plain and device else []
    return shlex.join(args)


def until_stopped(spec, device: str | None, resume: str, work: Callable[[], T]) -> T:
    """`work()` (the run), ended within seconds by SIGINT or SIGTERM with one line: how many units are
    scored, where they are kept and the command that resumes; exit 130 or 143 (layertime/stopping.py)."""
    from layertime.plan import make_plan
    from layertime.settings import Settings
    from layertime.stopping import run_stoppably

    units = make_plan(spec, strict=True).units()  # prepare_run checked it resolves
    settings, run = Settings.of(spec, device), RunDir.of(spec.run_root, spec.store)

    def finished() -> str:
        # Completion records are written last, so one that exists is a finished unit. Not read back:
        # 6,400 of them on a shared file system would keep the user waiting for the stop.
        done = sum(run.score_record(settings.id, u.checkpoint, u.task, u.layer).is_file() for u in units)
        return (
            f"{done} of {len(units)} (checkpoint, task, layer) units are scored and kept in {run.store}; "
            f"`{resume}` computes the other {len(units) - done}"
        )

    return run_stoppably(work, finished)


def run_plain(spec, device: str | None, force: bool = False, resume: str | None = None) -> None:
    """`run --plain`: the phases without Prefect, with a progress bar; prints where the tables are.
    SIGINT or SIGTERM stop it within seconds, with one line naming `resume` (the command that resumes)."""
    from tqdm import tqdm

    from layertime.phases.plain import run_spec
    from layertime.runroot import IncompatibleRun

    _check_device(device)
    _check_cache(spec)
    bar = tqdm(total=None, unit="unit", desc=f"{spec.name}: (checkpoint, task) units", file=sys.stderr)

    def progress(phase: str, done: int, total: int) -> None:
        bar.total, bar.n = total, done
        bar.refresh()

    from layertime.rundir import RunInUse

    def work():
        with _lines_above(bar):
            return run_spec(spec, progress=progress, device=device, force=force)

    try:
        result = until_stopped(
            spec, device, resume or resume_command(Path("SPEC"), plain=True, device=device), work
        )
    except (RunInUse, IncompatibleRun) as e:
        bar.close()
        fail(str(e))
    except OSError as e:
        if e.errno not in DISK_ERRORS:
            raise
        bar.close()  # a full or read-only disk: the message names the path; finished units are kept
        fail(str(e))
    bar.close()
    typer.echo(f"scored {result.scored} (checkpoint, task, layer) units, {result.skipped} already done")
    typer.echo(
        f"texts: mteb asks for {result.texts_requested:,} per pass; forwarded {result.texts_embedded:,}"
    )
    print_tables(spec.run_root, result.tables)


DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


@contextlib.contextmanager
def _lines_above(bar) -> Iterator[None]:
    """The library's warnings (a rejected file of the store: layertime/records.py) as lines of their
    own above the progress bar, not glued to its end."""

    class Above(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            bar.write(record.getMessage(), file=sys.stderr)

    library, handler = logging.getLogger("layertime"), Above(logging.WARNING)
    library.addHandler(handler)
    try:
        yield
    finally:
        library.removeHandler(handler)


def _check_device(device: str | None) -> None:
    """`--device cuda` on a machine without a GPU fails here, before the run root is touched."""
    from layertime.encoder import DeviceUnavailable, check_device

    try:
        check_device(device)
    except DeviceUnavailable as e:
        fail(f"--device: {e}")


def _check_cache(spec) -> None:
    """What the flow checks before any GPU work (layertime verify, task data not loaded), for --plain."""
    from layertime.hub import verify

    problems = verify.failed(verify.verify(spec, load_tasks=False))
    if problems:
        fail(f"not ready to run {spec.name}:\n{verify.format_table(problems)}")


def print_tables(run_root: Path, tables: dict) -> None:
    typer.echo(f"run root: {run_root}")
    for name, path in tables.items():
        typer.echo(f"  {name:8s} {path}")
    report = Path(run_root) / "report" / "report.html"
    if report.is_file():
        typer.echo(f"  report   {report}")


@app.command()
def prefetch(
    spec_path: SpecPath,
    workers: Annotated[int, typer.Option(help="checkpoints downloaded at once")] = 4,
    verify: Annotated[bool, typer.Option(help="verify offline after downloading")] = True,
) -> None:
    """On a login node (internet): download every checkpoint, task dataset and the metrics corpus the spec
    needs into the HF cache, after checking free space; resumable. Exit 0 ready, 1 failed, 3 disk too small."""
    spec = load(spec_path)
    os.environ.setdefault("MTEB_CACHE", str(RunDir.of(spec.run_root, spec.store).mteb_results))
    from layertime.hub import prefetch as fetching

    try:
        result = fetching.prefetch(spec, workers=workers)
    except fetching.PrefetchError as e:  # InsufficientSpaceError among them: refused before downloading
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(3 if isinstance(e, fetching.InsufficientSpaceError) else 1) from None
    typer.echo(
        f"fetched {fetching.human(result.downloaded_bytes)} "
        f"({len(result.fetched)} of {len(result.plan.fetches)} repo revisions)"
    )
    for name in result.repaired:
        typer.echo(f"  re-fetched {name} (its cached size disagreed with the hub)")
    raise typer.Exit(_verified(spec, spec_path) if verify else 0)


@app.command()
def verify(
    spec_path: SpecPath,
    load_tasks: Annotated[bool, typer.Option(help="load every task's data as the run will")] = True,
    rehash: Annotated[bool, typer.Option(help="hash every weight file again")] = False,
) -> None:
    """Offline: check that everything the spec needs is in the cache; one row per item, with the command
    that fixes each problem. Exit 0 when all is ready, 1 when anything is missing or corrupt,
    2 for a spec that cannot run (a block the model lacks). Writes nothing."""
    spec = load(spec_path)
    _check_blocks(spec, spec_path)
    mteb_cache = RunDir.of(spec.run_root, spec.store).mteb_results
    with tempfile.TemporaryDirectory(prefix="layertime-verify-") as scratch:
        # `import mteb` creates its cache directory: a check must not create the store as it looks.
        os.environ.setdefault("MTEB_CACHE", str(mteb_cache if mteb_cache.is_dir() else scratch))
        code = _verified(spec, spec_path, load_tasks=load_tasks, rehash=rehash)
    raise typer.Exit(code)


def _verified(spec, spec_path: Path, load_tasks: bool = True, rehash: bool = False) -> int:
    """Verify offline and print the table; 0 when all is ok, 1 when anything is missing or corrupt."""
    from layertime.hub import verify as checking

    items = checking.verify(spec, spec_path=spec_path, load_tasks=load_tasks, rehash=rehash)
    checking.print_table(items, spec_path)
    return 1 if checking.failed(items) else 0


def _check_blocks(spec, spec_path: Path) -> None:
    """The spec's layers against the model's config where the cache has it (`run` refuses the same)."""
    from layertime.hub.cache import CorruptRef
    from layertime.plan import make_plan
    from layertime.spec import SpecError

    try:
        make_plan(spec)
    except SpecError as e:
        fail(f"{spec_path}: {e}")
    except CorruptRef:
        pass  # verify's table names it, with its fix


@app.command()
def report(
    run_root: Annotated[Path, typer.Argument(help="run root, e.g. runs/exp2")],
    out: Annotated[Path | None, typer.Option(help="output directory (default RUN/report)")] = None,
) -> None:
    """Write RUN/report/report.html (PNG figures beside it) and summary.md from the run's tables."""
    from layertime.report import write_report

    run_root = Path(os.path.expanduser(str(run_root)))
    if not (run_root / "tables").is_dir():
        fail(f"{run_root}: no tables/ yet (run `layertime run SPEC` first)")
    _check_tables(run_root)
    paths = write_report(run_root, out)
    typer.echo(paths.markdown)
    typer.echo(f"report: {paths.html}")


def _check_tables(run_root: Path) -> None:
    """Each table the report reads is one layertime wrote (readable, with its columns), else one
    message naming the file and the fix, not polars' traceback."""
    import polars as pl

    from layertime import tables

    expected = {"scores": tables.SCORE_SCHEMA, "metrics": tables.METRIC_SCHEMA, "costs": tables.COST_SCHEMA}
    for name, schema in expected.items():
        path = run_root / "tables" / f"{name}.parquet"
        if not path.is_file():
            continue  # the report says what is missing
        try:
            columns = pl.read_parquet(path).columns
        except (pl.exceptions.PolarsError, OSError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            fail(f"{path}: not a table layertime wrote ({reason}); `layertime run SPEC` writes it again")
        if missing := [c for c in schema if c not in columns]:
            fail(
                f"{path}: not a {name} table: no column {', '.join(missing)}; `layertime run SPEC` writes it again"
            )
    environment = run_root / "environment.json"
    if environment.is_file():
        try:
            json.loads(environment.read_text())
        except (ValueError, OSError) as e:
            fail(f"{environment}: not JSON ({e}); `layertime run SPEC` writes it again")


def _quiet_libraries() -> None:
    """Our progress bar, not the per-call bars and load reports of datasets and transformers."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()


if __name__ == "__main__":
    app()
