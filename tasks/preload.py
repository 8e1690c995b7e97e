"""A Dask worker preload of the SLURM GPU jobs (`--preload tasks.preload`, flows/clusters.job_kwargs).

Imported once, in the worker's main thread, before any task thread starts: what loading a model takes
(transformers resolves `AutoModel` lazily, and two `gpu` tasks starting together on a fresh worker raced
in that: `ImportError: cannot import name 'AutoModel' from 'transformers'`, issue 23), and the tasks'
module itself. The flow's process does the same before its local cluster starts (flows/layer_by_layer.py).
"""

from layertime.encoder import import_model_classes

import_model_classes()

import tasks.units  # noqa: E402, F401 -- what the tasks unpickle, imported before they do
