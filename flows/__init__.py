"""Prefect flows: compose the tasks of tasks/ over the grid of a spec."""
