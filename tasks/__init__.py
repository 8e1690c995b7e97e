"""Prefect tasks: thin wrappers over the library's phases (`layertime.phases`) that add names, caching and retries."""
