"""Prefect tasks: thin wrappers over `layertime.pipeline` that add names, caching and retries."""
