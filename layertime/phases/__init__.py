"""The phases of a run as plain functions over the run's files (docs/design.md §2):

    record.py   the texts mteb will ask for, one recording pass per task
    embed.py    a (checkpoint, task) unit's embeddings, every layer from one forward pass per text
    measure.py  a checkpoint's representation metrics, one completion record per layer
    gpu.py      a checkpoint's GPU work from one model load: its metrics, then its units' embeddings
    score.py    mteb main scores of a unit's layers, one completion record per layer
    merge.py    the run's tables from the completion records
    plain.py    every phase in turn in this process (`layertime run --plain`)

Each can be called from a notebook, a test, `run_spec` or a Prefect task (tasks/units.py); they share
their arguments through one `context.Context`. The completion records (layertime/records.py) are the
only truth for "done": the tables are merged from them, whoever ran the units.
"""
