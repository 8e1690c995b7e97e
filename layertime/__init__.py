"""layertime: every hidden layer of a language model, at every checkpoint, scored as a text embedding.

A library usable from a notebook: it imports neither Prefect nor Dask (tasks/ and flows/ do).
Layers are 0-based block indices: block b's output is `hidden_states[b + 1]`.
"""

__version__ = "0.1.0"
