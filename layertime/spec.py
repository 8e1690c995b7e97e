"""Experiment specs: what to run, validated before anything touches a GPU (docs/design.md §1, §3).

A spec is a YAML file (see `deployments/`). Every mistake is reported as one `SpecError` naming
the field and the bad value; unknown keys are rejected.

Layers are **block indices**, 0-based: block b's output is `hidden_states[b + 1]` (docs/design.md §3).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from layertime import suite
from layertime.errors import Permanent


class SpecError(Permanent, ValueError):
    """A spec that cannot run; the message names the field and the bad value."""


class NeedsConfig(SpecError):
    """`layers` names blocks relative to the model's depth ('all', {last: N}) and the config is unknown."""


_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/]*$")
_RANGE = re.compile(
    r"^(?P<prefix>[A-Za-z_\-]*)(?P<start>\d+)\.\.(?P<prefix2>[A-Za-z_\-]*)(?P<stop>\d+)(?:/(?P<stride>\d+))?$"
)
_LAYER_RANGE = re.compile(r"^(?P<start>-?\d+)\s*\.\.\s*(?P<stop>-?\d+)$")
MAX_BLOCKS = 10_000  # a range this long is a typo, not a model (the largest have ~130 blocks)


def expand_checkpoints(items: list[str]) -> list[str]:
    """Revision names from a list of names and ranges, in order, without repeats.

    `step94000..step143000/1000` means step94000, step95000, ..., step143000 (both ends included).
    """
    out: list[str] = []
    for i, item in enumerate(items):
        for rev in _expand_one(item, f"checkpoints[{i}]"):
            if rev not in out:
                out.append(rev)
    return out


def _expand_one(item: str, where: str) -> list[str]:
    if not isinstance(item, str) or not item.strip():
        raise SpecError(f"{where}: {item!r} is not a revision name")
    if ".." not in item:
        if not _REVISION.match(item) or item.endswith("/") or "//" in item:
            raise SpecError(
                f"{where}: malformed revision {item!r} (expected e.g. 'main', 'step1000' or a commit hash)"
            )
        return [item]
    m = _RANGE.match(item)
    if not m or m["prefix"] != m["prefix2"]:
        raise SpecError(
            f"{where}: malformed revision range {item!r} (expected PREFIX<start>..PREFIX<stop>/<stride>, "
            "e.g. 'step94000..step143000/1000')"
        )
    start, stop, stride = int(m["start"]), int(m["stop"]), int(m["stride"] or 1)
    if stride <= 0:
        raise SpecError(f"{where}: range {item!r} has stride {stride}; it must be positive")
    if stop < start:
        raise SpecError(f"{where}: range {item!r} is empty (stop {stop} < start {start})")
    if (stop - start) % stride:
        raise SpecError(f"{where}: range {item!r}: {stop} is not reached from {start} in steps of {stride}")
    return [f"{m['prefix']}{s}" for s in range(start, stop + 1, stride)]


class LastLayers(BaseModel):
    model_config = ConfigDict(extra="forbid")
    last: int = Field(gt=0, description="the last N blocks of the model")


LayerSpec = Literal["all"] | str | list[int] | LastLayers


def resolve_layers(layers: LayerSpec, num_blocks: int | None) -> list[int]:
    """Block indices named by `layers`, checked against the model's `num_blocks` when known.

    Forms: a list `[15, 16]`, a range `"15..23"` (both ends included), `"all"`, `{last: N}`.
    """
    if isinstance(layers, LastLayers) or layers == "all":
        if num_blocks is None:
            raise NeedsConfig(
                f"layers: {_show(layers)} needs the model's config to know how many blocks it has"
            )
        n = num_blocks if layers == "all" else layers.last
        if n > num_blocks:
            raise SpecError(f"layers: last {n} asks for more blocks than the model has ({num_blocks})")
        return list(range(num_blocks - n, num_blocks))
    if isinstance(layers, str):
        m = _LAYER_RANGE.match(layers.strip())
        if not m:
            raise SpecError(f"layers: {layers!r} is not a list, a range 'A..B', 'all' or {{last: N}}")
        start, stop = int(m["start"]), int(m["stop"])
        if stop < start:
            raise SpecError(f"layers: range {layers!r} is empty")
        # Checked before it is expanded: "0..999999999999" would take minutes and gigabytes to list.
        _check_block(start, num_blocks)
        _check_block(stop, num_blocks)
        if num_blocks is None and stop - start >= MAX_BLOCKS:
            raise SpecError(
                f"layers: range {layers!r} names {stop - start + 1:,} blocks; no model has more than "
                f"{MAX_BLOCKS:,} (layers are 0-based block indices)"
            )
        blocks = list(range(start, stop + 1))
    else:
        blocks = list(dict.fromkeys(layers))
    if not blocks:
        raise SpecError("layers: the list is empty; name at least one block")
    for b in blocks:
        _check_block(b, num_blocks)
    return blocks


def _check_block(b: int, num_blocks: int | None) -> None:
    if b < 0 or (num_blocks is not None and b >= num_blocks):
        limit = f"the model's {num_blocks} blocks (0..{num_blocks - 1})" if num_blocks else "blocks (>= 0)"
        raise SpecError(f"layers: block {b} is outside {limit}; layers are 0-based block indices")


def parse_layers(layers: Any) -> LayerSpec:
    """Check the form of a `layers` value (not yet the model's range) and return it canonical."""
    if isinstance(layers, LastLayers) or layers == "all":
        return layers
    if isinstance(layers, dict):
        if set(layers) != {"last"} or isinstance(layers["last"], bool) or not isinstance(layers["last"], int):
            raise SpecError(f"layers: {layers!r} is not {{last: N}} with a whole number N")
        if layers["last"] <= 0:
            raise SpecError(f"layers: last {layers['last']}: N must be at least 1")
        return LastLayers(last=layers["last"])
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if isinstance(layers, list) and any(isinstance(b, bool) or not isinstance(b, int) for b in layers):
        raise SpecError(f"layers: {layers!r} must hold whole block indices")
    if isinstance(layers, (str, list)):
        resolve_layers(layers, None)
        return layers
    raise SpecError(f"layers: {layers!r} is not a list, a range 'A..B', 'all' or {{last: N}}")


def _show(layers: LayerSpec) -> str:
    return f"{{last: {layers.last}}}" if isinstance(layers, LastLayers) else repr(layers)


_UNSET_VARIABLE = re.compile(r"\$(\w+|\{[^}]*\})")


def expand_path(value: Any, field: str) -> Any:
    """A path as the shell would read it: `~` and `$VARIABLES` expanded, or a SpecError naming `field`.

    Read literally, `run_root: ~/x` made a directory named `~` in the working directory, and the run
    failed only at the merge, after all the work; `run_root: ""` wrote into the working directory.
    """
    if value is None or not isinstance(value, (str, Path)):
        return value  # None where allowed; any other type is pydantic's to name
    text = str(value)
    if not text.strip():
        raise SpecError(f"{field}: {text!r} is empty; give a directory")
    expanded = os.path.expandvars(os.path.expanduser(text))
    if expanded.startswith("~"):
        raise SpecError(f"{field}: {text!r}: no user {expanded[1:].split('/')[0]!r} to expand '~' for")
    if unset := _UNSET_VARIABLE.search(expanded):
        raise SpecError(f"{field}: {text!r}: environment variable {unset[0]} is not set")
    return Path(expanded)


class MetricsSpec(BaseModel):
    """The representation metrics of docs/design.md §5: which corpus, how many views, which layers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    corpus: str = Field(
        "wikitext-103",
        description="'wikitext-103' (the paper's: first `lines` of train, headings and short lines dropped), "
        "'tasks' (a seeded sample of each task's texts) or a text file, one prompt per line",
    )
    lines: int = Field(
        1000, gt=0, description="wikitext-103: lines read before filtering (1000 -> 472 prompts)"
    )
    sample: int = Field(1000, gt=1, description="'tasks': texts sampled per task")
    seed: int = Field(0, description="seeds the task sample and the augmented views")
    views: Literal[0, 2] = Field(2, description="augmented views for InfoNCE and DiME (0: skip them)")
    lidar_views: int = Field(16, ge=0, description="augmented views for LiDAR (0: skip it)")
    all_layers: bool = Field(False, description="measure every block, not only the spec's layers")

    @field_validator("corpus")
    @classmethod
    def _corpus(cls, corpus: str) -> str:
        if corpus in ("wikitext-103", "tasks"):
            return corpus
        return str(expand_path(corpus, "metrics.corpus"))  # a text file

    @field_validator("lidar_views")
    @classmethod
    def _lidar(cls, n: int) -> int:
        if n == 1:
            raise SpecError("metrics.lidar_views: 1 view has no within-sample spread; use 0 or at least 2")
        return n


class SearchSpec(BaseModel):
    """The layer search's settings (`layertime.search`, docs/design.md §11): when to stop, what it may spend.

    An experiment spec with a `search:` block is still a grid spec (`layertime run` scores its whole
    grid and ignores the block); the layer search explores the same grid, unit for unit, and stops early.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    epsilon: float = Field(
        0.5,
        gt=0,
        le=100,
        description="points (mteb's 0-100 scale): the chosen arm may be this far below the best",
    )
    confidence: float = Field(
        0.95, ge=0.5, lt=1, description="stop when P(chosen arm within epsilon of the best) exceeds this"
    )
    budget_cpu_h: float | None = Field(
        None, gt=0, description="scoring CPU-hours the search may spend (null: no cap)"
    )
    budget_gpu_h: float | None = Field(
        None, gt=0, description="embedding GPU-hours the search may spend (null: no cap)"
    )
    batch: int = Field(
        8, ge=1, le=100_000, description="scorings per proposal (at least the scoring workers); whole arms"
    )
    initial_arms: int = Field(
        6, ge=2, le=10_000, description="arms of the space-filling start before the model leads"
    )
    gpu_cpu_ratio: float = Field(
        10.0, gt=0, description="CPU-seconds one GPU-second is worth, to weigh embeddings against scorings"
    )
    seed: int = Field(0, ge=0, description="seeds the start, the model's optimiser restarts and its samples")


class ExperimentSpec(BaseModel):
    """One experiment: a model's checkpoints × layers × tasks, and how to embed and score them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="experiment name; also names the run in the Prefect UI")
    model: str = Field(description="Hugging Face repo id (e.g. EleutherAI/pythia-410m) or a local path")
    checkpoints: list[str] = Field(
        default_factory=lambda: ["main"],
        description="revisions: names, commit hashes and ranges such as 'step94000..step143000/1000'",
    )
    layers: Any = Field(description="block indices (0-based): a list, 'A..B', 'all' or {last: N}")
    final_norm: Literal["all", "last"] = Field(
        "all", description="'all': final norm on every layer (the paper); 'last': raw residual stream"
    )
    pooling: Literal["mean", "last"] = Field(
        "mean", description="mean over real tokens, or the last real token"
    )
    normalize: bool = Field(False, description="L2-normalise pooled embeddings (the paper did not)")
    max_length: int = Field(2048, gt=0, description="tokens per text; longer texts are truncated")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="'auto': bfloat16 on GPUs that support it, float32 otherwise"
    )
    tokens_per_batch: int = Field(16384, gt=0, description="token budget per forward batch (padded tokens)")
    tasks: str | list[str] = Field(
        suite.SUITE_32,
        validate_default=True,
        description=f"a suite ({', '.join(suite.SUITES)}) or task names",
    )
    aggregation: Literal["rule-a", "mteb-v1"] = Field(
        "rule-a", description="'rule-a': the paper's subsets (STS17 en-en, AmazonCounterfactual en+en-ext)"
    )
    run_root: Path = Field(description="directory of this experiment's run (tables, results, caches)")
    store: Path | None = Field(
        None, description="shared store of computed units (default: <run_root>/../store, shared by siblings)"
    )
    hf_cache: Path | None = Field(None, description="Hugging Face hub cache; default: HF_HUB_CACHE")
    keep_embeddings: bool = Field(False, description="keep embeddings after every layer of a unit is scored")
    metrics: MetricsSpec | None = Field(
        default_factory=MetricsSpec, description="representation metrics per checkpoint (null: none)"
    )
    search: SearchSpec | None = Field(
        None, description="the layer search's settings (`layertime search`); a grid run ignores them"
    )

    @field_validator("checkpoints")
    @classmethod
    def _checkpoints(cls, items: list[str]) -> list[str]:
        revisions = expand_checkpoints(items)
        if not revisions:
            raise SpecError("checkpoints: the list is empty; name at least one revision")
        return revisions

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, tasks: str | list[str]) -> list[str]:
        if isinstance(tasks, str):
            if tasks not in suite.SUITES:
                raise SpecError(f"tasks: unknown suite {tasks!r} (known: {', '.join(suite.SUITES)})")
            return list(suite.SUITES[tasks])
        if not tasks:
            raise SpecError("tasks: the list is empty; name a suite or at least one task")
        known = suite.known_tasks()
        for task in tasks:
            if task not in known:
                raise SpecError(
                    f"tasks: unknown task {task!r} (not in {suite.SUITE_32} or {suite.SUITE_DEMO})"
                )
        return list(dict.fromkeys(tasks))

    @field_validator("run_root", "store", "hf_cache", mode="before")
    @classmethod
    def _expand(cls, value: Any, info: ValidationInfo) -> Any:
        return expand_path(value, info.field_name)

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, layers: Any) -> LayerSpec:
        return parse_layers(layers)

    @model_validator(mode="after")
    def _paths(self) -> ExperimentSpec:
        if not self.name.strip():
            raise SpecError("name: must not be empty")
        return self

    def blocks(self, num_blocks: int | None) -> list[int]:
        """The spec's block indices, checked against the model when `num_blocks` is known."""
        return resolve_layers(self.layers, num_blocks)

    @property
    def digest(self) -> str:
        """A short hash of the spec as run (every field, defaults included): stamped on each result."""
        # Without a search block, the hash of every spec written before the block existed is unchanged.
        blob = self.model_dump_json(exclude={"search"} if self.search is None else None).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def load_spec(path: str | Path, **overrides: Any) -> ExperimentSpec:
    """Read and validate a spec file; relative `run_root`/`hf_cache` resolve against the working dir.

    `~` and `$VARIABLES` in `path` are expanded as the shell would (a path quoted in a script reaches
    us as written); an unset variable is a SpecError naming it."""
    path = expand_path(path, "spec file")
    if path.is_dir():
        raise SpecError(f"spec file {str(path)!r} is a directory, not a YAML file")
    if not path.is_file():
        raise SpecError(f"spec file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise SpecError(
            f"{path}: not UTF-8 text (byte {e.object[e.start : e.start + 1]!r} at offset {e.start}); "
            "save the spec as UTF-8"
        ) from None
    except OSError as e:
        raise SpecError(f"spec file {str(path)!r} cannot be read: {e.strerror}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping of fields, got {type(data).__name__}")
    return parse_spec({**data, **overrides}, source=str(path))


def parse_spec(data: dict[str, Any], source: str = "spec") -> ExperimentSpec:
    """Validate a spec mapping; raise `SpecError` naming the first bad field and its value."""
    try:
        return ExperimentSpec.model_validate(data)
    except SpecError as e:
        raise SpecError(f"{source}: {e}") from None
    except ValidationError as e:
        raise SpecError(f"{source}: {_describe(e)}") from None


def _describe(error: ValidationError) -> str:
    err = error.errors()[0]
    field = ".".join(
        str(p)
        for p in err["loc"]
        if not str(p).startswith(("function-", "literal[", "list[", "str", "LastLayers"))
    )
    field = field or ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        model = {"metrics": MetricsSpec, "search": SearchSpec}.get(str(err["loc"][0]), ExperimentSpec)
        return f"unknown key {field!r} (allowed: {', '.join(model.model_fields)})"
    if err["type"] == "missing":
        return f"{field}: missing (required)"
    cause = err.get("ctx", {}).get("error")
    if isinstance(cause, SpecError):
        return str(cause)
    return f"{field}: {err['input']!r}: {err['msg']}"
