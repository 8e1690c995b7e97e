"""The `layertime` command: the library's commands (layertime/cli.py) plus those that run flows.

`run` starts the layer-by-layer flow in this process (Prefect's embedded default) or, with
--plain, the same phases without Prefect; `submit` starts a deployment on a Prefect server;
`slurm-script` prints the job script of the slurm profile. Prefect and Dask are imported only by
the commands that use them, so `layertime plan` stays quick.
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from layertime import cli
from layertime.cli import SpecPath

app = cli.app


@app.command()
def run(
    spec_path: SpecPath,
    cluster: Annotated[str, typer.Option(help="cluster profile: local (default) or slurm")] = "local",
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
    state = cli.until_stopped(  # SIGINT/SIGTERM: one line, exit 130/143, nothing left running
        spec, where.device, resume,
        lambda: layer_by_layer(str(spec_path), cluster=cluster, force=force, return_state=True),
    )  # fmt: skip
    if not state.is_completed():
        cli.fail(f"the run did not complete ({state.name}): {state.message}")
    cli.print_tables(spec.run_root, state.result())


@app.command()
def submit(
    name: Annotated[str, typer.Argument(help="deployment of flow layer-by-layer: exp1, exp2 or demo")],
    cluster: Annotated[str | None, typer.Option(help="override the deployment's cluster profile")] = None,
) -> None:
    """Start a run of deployment layer-by-layer/NAME on the Prefect server and print its UI link."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    from flows.clusters import profile

    parameters = {}
    if cluster:
        try:
            profile(cluster)
        except ValueError as e:
            cli.fail(str(e))
        parameters["cluster"] = cluster
    try:
        flow_run = run_deployment(f"layer-by-layer/{name}", parameters=parameters, timeout=0)
    except Exception as e:  # noqa: BLE001 -- the server's answer, shown as one line
        cli.fail(f"could not start layer-by-layer/{name} on {PREFECT_API_URL.value()}: {e}")
    ui = PREFECT_UI_URL.value() or "(no UI URL: set PREFECT_UI_URL)"
    typer.echo(f"started flow run {flow_run.name} ({flow_run.id})")
    typer.echo(f"{ui}/runs/flow-run/{flow_run.id}")


@app.command("slurm-script")
def slurm_script(
    spec_path: SpecPath,
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
        typer.echo(job_script(spec_path, overrides or None))
    except ClusterError as e:
        cli.fail(str(e))


if __name__ == "__main__":
    app()
