"""The `layertime` console script (`[project.scripts]` in pyproject.toml): the library's commands
(layertime/cli.py) plus those that run flows (flows/commands.py: run, submit, slurm-script).

It lives at the checkout's root, beside layertime/, tasks/ and flows/, because it is the one module
that may import both layers: the library never imports or names flows/ or tasks/
(tests/test_library_imports.py), and flows/ and tasks/ are folders of the checkout, never installed
as top-level packages (names anyone may have). An editable install (`make venv`) maps this module to
this file, so the flows are imported from the checkout beside it, from any directory. A plain install
(a wheel) has this module without a checkout: it exits 2 with one line saying so.
"""

from __future__ import annotations

import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent  # the folder holding layertime/, flows/ and tasks/


def main() -> None:
    """Run the `layertime` command from the checkout this module is installed from."""
    commands = CHECKOUT / "flows" / "commands.py"
    if not commands.is_file():
        import typer

        typer.secho(
            f"error: {commands} not found: layertime runs from an editable install of its repository "
            f"(`pip install -e .` there, or `make venv`), not from {CHECKOUT}",
            fg=typer.colors.RED,
            err=True,
        )
        raise SystemExit(2)
    if sys.path[:1] != [str(CHECKOUT)]:
        sys.path.insert(0, str(CHECKOUT))  # ours first, before any other `flows` on the path
    from flows.commands import app

    app()


if __name__ == "__main__":
    main()
