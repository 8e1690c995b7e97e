"""Everything about the Hugging Face hub and its cache, in one package.

- `cache`: the cache's on-disk layout (the only module that knows it), the cache in effect, the offline
  switch, loading from the cache first, a task dataset's local snapshot, the `hf download` fix command.
- `prefetch`: fill the cache on a machine with internet (`layertime prefetch SPEC`).
- `verify`: check, offline, that the cache holds everything a spec needs (`layertime verify SPEC`).
- `fake`: fabricate a cache in the hub's layout, for tests and the demo (no network).
"""
