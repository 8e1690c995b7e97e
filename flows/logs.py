"""The run's log at exp2's size: one line per task run that succeeded would bury everything else.

Prefect's task engine logs "Finished in state Completed()" (or "Cached(...)") at INFO for every task
run. exp2 makes ~6,500 task runs, so the flow run's Logs tab in the UI (and the worker's output) would
be those lines and little else (issue 15). `quiet_finished_task_runs` drops exactly these INFO
records from the `prefect.task_runs` logger, before any handler (console or API) sees them; a task
run that fails, crashes or is retried still logs at WARNING/ERROR, and a task's own log lines are
kept. The task runs' states stay in the UI's task-run list, and the progress artifact counts them.
"""

from __future__ import annotations

import logging

TASK_RUN_LOGGER = "prefect.task_runs"
FINISHED = "Finished in state "


class _DropFinishedOk(logging.Filter):
    """False for the INFO "Finished in state ..." record of a task run that completed."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not str(record.msg).startswith(FINISHED)


def quiet_finished_task_runs() -> None:
    """Drop completed task runs' "Finished in state" lines in this process (idempotent). Dask's INFO
    chatter (cluster start-up and teardown) goes too, as `layertime run` does."""
    logger = logging.getLogger(TASK_RUN_LOGGER)
    if not any(isinstance(f, _DropFinishedOk) for f in logger.filters):
        logger.addFilter(_DropFinishedOk())
    logging.getLogger("distributed").setLevel(logging.WARNING)
