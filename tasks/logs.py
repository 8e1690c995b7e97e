"""The library's warnings in the log of the Prefect run they happen in.

The library logs through the standard `logging` module and knows nothing of Prefect: a file of the
store that it rejects (layertime/records.py) is one WARNING line of the `layertime` logger. Without
this, that line would reach the console of the process it happens in (a Dask worker, a SLURM job)
but not the flow run's log in the UI. `library_to_api` sends the `layertime` logger's warnings to the
API of the flow or task run in whose context they are logged; outside any run (the library used
alone) nothing is sent, and the line still reaches the console as before (the logger propagates).
"""

from __future__ import annotations

import logging
import sys

from prefect.exceptions import MissingContextError
from prefect.logging.handlers import APILogHandler

LIBRARY_LOGGER = "layertime"


class _RunLogHandler(APILogHandler):
    """Prefect's API log handler, silent outside a run context (its default warns there)."""

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], MissingContextError):
            return
        super().handleError(record)


def library_to_api() -> None:
    """Send the library's warnings to the current Prefect run's log, in this process (idempotent)."""
    logger = logging.getLogger(LIBRARY_LOGGER)
    if not any(isinstance(h, _RunLogHandler) for h in logger.handlers):
        logger.addHandler(_RunLogHandler(level=logging.WARNING))
