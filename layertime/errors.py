"""The one line between errors that may heal and errors that cannot (docs/design.md §6, Retries).

A `Permanent` error fails the same way however often it is retried: a spec that cannot run, a
checkpoint or dataset that is not there, a metrics corpus that cannot be loaded, NaN embeddings, a
text that was never embedded. The flow's tasks retry every other error (a dropped connection, a
preempted worker, a full disk that was cleaned) and never a Permanent one, and the GPU task fails only
the unit whose error is Permanent while the checkpoint's other units go on (tasks/units.py).

Each permanent error keeps the built-in base its callers catch it by (`SpecError` is still a
`ValueError`, `LookupMiss` a `KeyError`), and adds `Permanent` as a second base. A plain `ValueError`
or `KeyError` says nothing about whether it heals (a library raises them for a bad byte on the wire as
much as for a wrong name), so only the classes below are ever taken as permanent.
"""

from __future__ import annotations


class Permanent(Exception):
    """An error that retrying cannot heal: the input is wrong or missing, not the moment."""
