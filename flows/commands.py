"""The `layertime` command: the library's commands (layertime/cli.py) plus those that run flows.

`run` starts the layer-by-layer flow in this process (Prefect's embedded default) or, with
--plain, the same phases without Prefect; `search` starts the layer-search flow the same way; `submit` starts a deployment on a Prefect server;
`slurm-script` prints the job script of a SLURM profile and `slurm-check` asks SLURM whether its jobs
can ever start. Prefect and Dask are imported only by the commands that use them, so `layertime plan`
stays quick.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import random
import shutil
from pathlib import Path
from typing import Annotated

import typer

from layertime import cli, leftovers
from layertime.cli import SpecPath

app = cli.app


@app.command()
def run(
    spec_path: SpecPath,
    cluster: Annotated[
        str, typer.Option(help="cluster profile: local (default), slurm, slurm-cpu (deployments/clusters/)")
    ] = "local",
    plain: Annotated[
        bool, typer.Option("--plain", help="run without Prefect: one process, one unit at a time")
    ] = False,
    device: Annotated[
        str | None, typer.Option(help="--plain only: torch device (default cuda if present)")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="take over a run root another code version wrote (recomputes)")
    ] = False,
) -> None:
    """Run a spec now, from this terminal: the layer-by-layer flow on Prefect's embedded default
    (no server needed), or with --plain the same phases without Prefect. Finished units are reused."""
    spec = cli.prepare_run(spec_path)
    resume = cli.resume_command(spec_path, cluster, plain, device)
    if plain:
        cli.run_plain(spec, device, force, resume)
        return
    from flows.clusters import profile
    from flows.layer_by_layer import layer_by_layer

    logging.getLogger("distributed").setLevel(logging.WARNING)  # the task runs are the progress to watch

    try:
        where = profile(cluster)
    except ValueError as e:  # an unknown profile, or a bad field of it: before any work
        cli.fail(str(e))
    if where.slurm is not None:
        import flows.slurm  # noqa: F401 -- here, in the main thread: it sets a signal handler (its doc)

    def work():
        # Entered in the run's own thread: Prefect's temporary settings live in a context variable.
        with _embedded_prefect():
            return layer_by_layer(str(spec_path), cluster=cluster, force=force, return_state=True)

    state = cli.until_stopped(spec, where.device, resume, work)  # SIGINT/SIGTERM: one line, exit 130/143
    if not state.is_completed():
        cli.fail(_why(state))
    cli.print_tables(spec.run_root, state.result())


@app.command()
def search(
    spec_path: SpecPath,
    cluster: Annotated[str, typer.Option(help="cluster profile: local (default) or slurm")] = "local",
    force: Annotated[
        bool, typer.Option("--force", help="take over a run root another code version wrote (recomputes)")
    ] = False,
) -> None:
    """Search a spec's grid for its best (checkpoint, layer) now, from this terminal: the layer-search
    flow on Prefect's embedded default, with the spec's `search:` settings. Its evaluations are the grid's
    units: recorded ones are reused, and a stopped search resumes from them."""
    import shlex

    spec = cli.prepare_run(spec_path)
    resume = shlex.join(
        ["layertime", "search", str(spec_path), *([] if cluster == "local" else ["--cluster", cluster])]
    )
    from flows.clusters import profile
    from flows.layer_search import layer_search

    logging.getLogger("distributed").setLevel(logging.WARNING)
    try:
        where = profile(cluster)
    except ValueError as e:
        cli.fail(str(e))

    def work():
        with _embedded_prefect():
            return layer_search(str(spec_path), cluster=cluster, force=force, return_state=True)

    state = cli.until_stopped(spec, where.device, resume, work)
    if not state.is_completed():
        cli.fail(_why(state))
    result = state.result()
    if (chosen := result["chosen"]) is None:
        typer.echo(f"no arm evaluated on every task ({result['stop']})")
    else:
        typer.echo(
            f"chosen: {chosen['checkpoint']} layer {chosen['layer']}: {chosen['value']:.2f} points "
            f"(best of the grid at most {chosen['best_upper']:.2f} with probability 0.95); {result['stop']}"
        )
    spent = result["spent"]
    typer.echo(
        f"{spent['evaluations']} of {spent['grid_evaluations']} evaluations, {spent['cpu_h']:.3g} of "
        f"{spent['grid_cpu_h']:.3g} CPU-h, {spent['gpu_h']:.3g} of {spent['grid_gpu_h']:.3g} GPU-h (expected, full grid)"
    )
    cli.print_tables(spec.run_root, result["tables"])


def _why(state) -> str:
    """The last line of a run that did not complete: a full or read-only disk as `--plain` says it
    (the path being written and the space left, layertime/io.py), else the flow's own message."""
    try:
        state.result()
    except OSError as e:
        if e.errno in cli.DISK_ERRORS:
            return str(e)
    except Exception:  # noqa: BLE001 -- any other failure: the state's message says it
        pass
    return f"the run did not complete ({state.name}): {state.message}"


EMBEDDED_STARTUP_TIMEOUT_S = 600  # Prefect's 20 s was not enough on a loaded 2-core machine (issue 14.9)


def _embedded_prefect() -> contextlib.AbstractContextManager:
    """Settings for Prefect's embedded server when no API URL is configured: a database of this run's
    own, a startup timeout a busy machine can meet, no telemetry. Settings the user gave are kept.

    By default every embedded run shares `~/.prefect/prefect.db`, and two runs at once on one machine
    fail with `database is locked`. The database goes to a temporary directory on local disk (TMPDIR),
    not the run root: run roots often live on cluster file systems where SQLite's locks are unreliable,
    and a run's truth is its store (completion records), not Prefect's history.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        return contextlib.nullcontext()
    # Importing mteb seeds Python's global `random` with 42 (mteb/_set_seed.py: its tasks seed when
    # created), and Prefect draws the temporary server's port from it: every run picked 8654, and of
    # two runs at once the second could talk to the first's server, failing when the first finished.
    # Reseeding from the OS gives each run its own draw; scores never read this generator (mteb
    # reseeds its evaluators, and scoring runs in processes of its own).
    random.seed()
    # Its owner is named inside, so a run killed before its atexit (SIGKILL) has it removed by the
    # next run's start (layertime/leftovers.py), and never one of another live run.
    home = leftovers.owned_temp_dir("prefect")
    # Registered before the server starts, so it runs after Prefect's own exit handler stops it (LIFO).
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    return temporary_settings(
        set_defaults={
            "server.database.connection_url": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
            "server.memo_store_path": home / "memo_store.toml",
            "server.ephemeral.startup_timeout_seconds": EMBEDDED_STARTUP_TIMEOUT_S,
            # No heartbeat to Prefect's telemetry service: offline it logged "Failed to send
            # telemetry", and on a busy machine its write to the database raised a 40-line
            # `database is locked` traceback (issue 23).
            "server.analytics_enabled": False,
        }
    )


@app.command()
def submit(
    name: Annotated[str, typer.Argument(help="deployment of flow layer-by-layer: exp1, exp2 or demo")],
    cluster: Annotated[str | None, typer.Option(help="override the deployment's cluster profile")] = None,
    overrides: Annotated[
        str | None,
        typer.Option(
            help='spec fields for this run, as JSON: \'{"layers": "20..23"}\' (checked before submitting)'
        ),
    ] = None,
    cluster_overrides: Annotated[
        str | None,
        typer.Option(
            "--cluster-overrides",
            help='cluster profile fields for this run, as JSON: \'{"partition": "a100"}\' (checked before submitting)',
        ),
    ] = None,
) -> None:
    """Start a run of deployment layer-by-layer/NAME on the Prefect server; print its UI link (without
    PREFECT_API_URL, the commands that follow it).

    The run happens in the worker's process: `LAYERTIME_SLURM_*` variables set for this command change
    nothing; set them where the worker starts, or pass the fields here with --cluster-overrides."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    from flows.clusters import profile

    parameters: dict = {}
    api = PREFECT_API_URL.value()
    with get_client(sync_client=True) as client:
        deployment = _deployment(client, name, api)
    if cluster:
        parameters["cluster"] = cluster
    if cluster or cluster_overrides is not None:
        fields = (
            _json_object("--cluster-overrides", cluster_overrides) if cluster_overrides is not None else None
        )
        where = cluster or deployment.parameters.get("cluster", "local")
        try:  # as this machine sees the profile; the worker's LAYERTIME_SLURM_* may differ
            profile(where, fields)
        except ValueError as e:
            cli.fail(f"--cluster-overrides: {e}" if fields is not None else str(e))
        if fields is not None:
            parameters["cluster_overrides"] = fields
    if overrides is not None:
        parameters["overrides"] = _checked_overrides(overrides, deployment)
    try:
        flow_run = run_deployment(deployment.id, parameters=parameters, timeout=0)
    except Exception as e:  # noqa: BLE001 -- the server's answer, shown as one line
        cli.fail(f"could not start layer-by-layer/{name} on {api or 'the local Prefect database'}: {e}")
    typer.echo(f"started flow run {flow_run.name} ({flow_run.id}) of layer-by-layer/{name}")
    ui = PREFECT_UI_URL.value() if api else None  # without a server, Prefect's UI URL leads nowhere
    if ui:
        typer.echo(f"{ui}/runs/flow-run/{flow_run.id}")
    else:
        typer.echo(
            f"no Prefect UI is known here (PREFECT_API_URL is not set); follow the run with "
            f"`prefect flow-run inspect {flow_run.id}` and `prefect flow-run logs {flow_run.id}`"
        )


def _deployment(client, name: str, api: str | None):
    """Deployment layer-by-layer/NAME, or exit 2 naming it, the server and the deployments it has."""
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.exceptions import ObjectNotFound

    where = api or "the local Prefect database (PREFECT_API_URL is not set)"
    try:
        return client.read_deployment_by_name(f"layer-by-layer/{name}")
    except ObjectNotFound:
        known = client.read_deployments(flow_filter=FlowFilter(name=FlowFilterName(any_=["layer-by-layer"])))
    except Exception as e:  # noqa: BLE001 -- no server there: one line naming it
        cli.fail(f"could not reach the Prefect API at {where}: {type(e).__name__}: {e}")
    names = ", ".join(sorted(d.name for d in known)) or "none"
    hint = "" if api else "; set PREFECT_API_URL to the server you deployed to (http://HOST:4200/api)"
    cli.fail(
        f"deployment: no layer-by-layer/{name} on {where}; it has: {names} "
        f"(`prefect deploy --all` in the repository creates exp1, exp2 and demo){hint}"
    )


def _checked_overrides(text: str, deployment) -> dict:
    """--overrides as a mapping of spec fields, validated against the deployment's spec; exit 2 if bad."""
    from layertime.spec import SpecError, load_spec

    fields = _json_object("--overrides", text)
    spec = Path(deployment.parameters.get("spec", "deployments/demo.yaml"))
    workdir = Path(deployment.path) if deployment.path and Path(deployment.path).is_dir() else Path.cwd()
    spec = spec if spec.is_absolute() else workdir / spec
    if not spec.is_file():
        cli.fail(
            f"--overrides: cannot check them: the deployment's spec {spec} is not here (submit from the repository)"
        )
    try:
        load_spec(spec, **fields)
    except SpecError as e:
        cli.fail(f"--overrides: {e}")
    return fields


def _json_object(option: str, text: str) -> dict:
    """`text` as a JSON object of fields, or exit 2 naming the option."""
    import json

    try:
        fields = json.loads(text)
    except json.JSONDecodeError as e:
        cli.fail(f"{option}: not JSON ({e}): {text!r}")
    if not isinstance(fields, dict):
        cli.fail(f"{option}: expected a JSON object of fields, got {text!r}")
    return fields


@app.command("slurm-check")
def slurm_check(
    cluster: Annotated[str, typer.Option(help="SLURM profile: slurm (default), slurm-cpu, ...")] = "slurm",
    cluster_overrides: Annotated[
        str | None, typer.Option("--cluster-overrides", help="profile fields, as JSON: '{\"cpus\": 2}'")
    ] = None,
) -> None:
    """Ask SLURM whether the profile's jobs (GPU, scoring, big-memory) can ever start here: what each
    partition offers, each profile field that asks for more (and the most it can be), and
    `sbatch --test-only` of each job script. Exit 0 when they can, 1 when not, 2 for a bad profile.

    Run it where the worker runs, with the worker's environment (its LAYERTIME_SLURM_* variables)."""
    from flows.clusters import profile
    from flows.slurm_check import check

    fields = _json_object("--cluster-overrides", cluster_overrides) if cluster_overrides is not None else None
    try:
        where = profile(cluster, fields)
    except ValueError as e:
        cli.fail(str(e))
    if where.slurm is None:
        cli.fail(f"--cluster: {cluster!r} is not a SLURM profile")
    try:
        ok, lines = check(where.slurm, cluster)
    except RuntimeError as e:
        cli.fail(str(e))
    for line in lines:
        typer.echo(line)
    raise typer.Exit(0 if ok else 1)


@app.command("slurm-script")
def slurm_script(
    spec_path: SpecPath,
    cluster: Annotated[str, typer.Option(help="SLURM profile: slurm (default), slurm-cpu, ...")] = "slurm",
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override a profile field, e.g. --set partition=gpu")
    ] = None,
) -> None:
    """Print the job script the slurm profile would submit for SPEC, to check on the login node."""
    cli.load(spec_path)
    from flows.clusters import ClusterError, job_script

    overrides = dict(item.split("=", 1) for item in set_ or [] if "=" in item)
    if set_ and len(overrides) != len(set_):
        cli.fail(f"--set: expected FIELD=VALUE, got {[i for i in set_ if '=' not in i]}")
    try:
        typer.echo(job_script(spec_path, overrides or None, name=cluster))
    except ClusterError as e:
        cli.fail(str(e))


if __name__ == "__main__":
    app()
