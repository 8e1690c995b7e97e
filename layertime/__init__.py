"""layertime: every hidden layer of a language model, at every checkpoint, scored as a text embedding.

A library usable from a notebook: it imports neither Prefect nor Dask (tasks/ and flows/ do).
Layers are 0-based block indices: block b's output is `hidden_states[b + 1]`.
"""

__version__ = "0.1.0"

# Bump when a change alters numbers (pooling, scoring, tables); refactors and comments keep results.
# It is part of every unit's settings id, so results of two code versions never share a record, and a
# run root refuses to mix them in its tables without --force (runroot.claim_run_root).
CODE_VERSION = "3"  # 3: CPU embeddings on one torch thread; full-precision scores, never mteb's cache
