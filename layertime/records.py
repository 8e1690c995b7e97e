"""What the store holds about finished work, as typed, versioned records, read back checked in this
one place (docs/design.md §7):

    record            file (rundir.RunDir)                              model
    score record      scores/S/<model>/<commit>/<task>/layer_<b>.json   ScoreRecord
    metrics record    metrics/E/<model>/<commit>/M/layer_<b>.json       MetricsRecord
    cost record       costs/S/<model>/<commit>/<unit>.json              CostRecord
    embeddings        embeddings/S/<model>/<commit>/<task>/done.json    EmbeddingsManifest, with the
                      files it lists (texts.json, layer_<b>.npy)
    recorded texts    texts/<task>__<revision>__...json                 TextsRecord

Every record carries its schema `version` (this code reads `VERSION`) and a `digest`, the sha256 of
its canonical JSON without the digest, so any edit breaks it. A record is accepted only when it
parses into its model (no unknown key, no wrong type, no non-finite score), its version is this
code's, its digest holds, and its content is what its unit asked for (`ScoreAsk`, `MetricsAsk`,
`EmbeddingsAsk`). Anything else is absent: one log line names the file and why, the file is removed
(or, for embeddings, rewritten) and its work is done again; it is never merged, never scored and
never a permanent failure.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Self, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from layertime.errors import Permanent
from layertime.io import atomic_write_text

log = logging.getLogger(__name__)

VERSION = 1  # the schema of every record kind; a record of any other version is absent (recomputed)

Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Count = Annotated[int, Field(ge=0)]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content_digest(fields: Mapping[str, Any]) -> str:
    """The digest a record carries: the sha256 of its canonical JSON without the digest (sorted keys,
    no spaces, NaN as NaN), so any edit of its content breaks it."""
    content = {k: v for k, v in fields.items() if k != "digest"}
    return sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode())


def texts_digest(texts: list[str]) -> str:
    """The digest of a text set: the sha256 of its texts.json (`json.dumps(texts)`)."""
    return sha256(json.dumps(texts).encode())


class _Model(BaseModel):
    # Read back strictly (`_load`: no coercion of "0.5" or true into numbers); built by our code leniently
    # (numpy scalars become Python numbers).
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Record(_Model):
    """A record kind: its schema version and the digest of its content."""

    version: Literal[1]
    digest: Sha256

    @classmethod
    def seal(cls, **fields: Any) -> Self:
        """The record of `fields` at this version, its digest computed."""
        draft = cls(version=VERSION, digest="0" * 64, **fields)
        return draft.model_copy(update={"digest": content_digest(draft.model_dump())})

    def whole(self) -> bool:
        """True when the digest is the one of the content (`content_digest`)."""
        return self.digest == content_digest(self.model_dump())

    def dumps(self) -> str:
        return json.dumps(self.model_dump())


R = TypeVar("R", bound=_Record)


def _load(path: Path, model: type[R]) -> tuple[R | None, str | None]:
    """(the record at `path`, None), or (None, why it is not one); why is None when there is no file."""
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as e:
        return None, f"not a JSON record ({type(e).__name__})"
    if not isinstance(data, dict):
        return None, "not a JSON object"
    if data.get("version") != VERSION:
        return None, f"schema version {data.get('version')!r}, this code reads version {VERSION}"
    try:
        record = model.model_validate(data, strict=True)
    except ValidationError as e:
        error = e.errors()[0]
        where = ".".join(map(str, error["loc"])) or "the record"
        return None, f"{where}: {error['msg']}"
    if not record.whole():
        return None, "its digest does not match its content (edited or damaged)"
    return record, None


def _reject(path: Path, why: str, then: str = "computed again") -> None:
    """One log line naming the rejected file and why; the file is removed."""
    log.warning(f"rejected {path}: {why}; {then}")
    path.unlink(missing_ok=True)


def _write(path: Path, record: _Record) -> None:
    atomic_write_text(path, record.dumps())


# --- score records ---------------------------------------------------------------------------------


class ScoreRow(_Model):
    """One mteb main score of one (checkpoint, task, layer, split, subset): a row of the scores table."""

    model: str
    commit: str | None
    layer: Count
    hidden_state: int
    depth: Finite
    task: str
    task_type: str
    subset: str
    split: str
    main_score: Finite
    mteb_version: str
    dataset_revision: str
    seconds: Finite
    peak_memory_gb: Finite | None


class ScoreRecord(_Record):
    """Completion record of one (checkpoint, task, layer): its scores, what produced them, and the
    digest of the embedding file they were scored from."""

    kind: Literal["score"] = "score"
    settings: dict[str, Any]
    provenance: dict[str, Any]
    embeddings_sha256: Sha256
    rows: Annotated[list[ScoreRow], Field(min_length=1)]


@dataclass(frozen=True)
class ScoreAsk:
    """What one (checkpoint, task, layer) asks for: its record must hold exactly this."""

    model: str
    commit: str | None
    task: str
    layer: int
    settings: Mapping[str, Any]
    scores: frozenset[tuple[str, str]]  # (split, subset): the task's evaluation splits and subsets
    bounds: tuple[float, float]  # the range of the task's main score (suite.MAIN_SCORE_RANGE)


def score_mismatch(record: ScoreRecord, ask: ScoreAsk) -> str | None:
    """How `record` departs from what its unit asked for; None when it does not."""
    if record.settings != dict(ask.settings):
        return "written under other settings than its folder's"
    low, high = ask.bounds
    for r in record.rows:
        if (r.model, r.commit, r.task, r.layer, r.hidden_state) != (
            ask.model,
            ask.commit,
            ask.task,
            ask.layer,
            ask.layer + 1,
        ):
            return (
                f"a row of {r.model}@{r.commit} {r.task} layer {r.layer}; the unit is "
                f"{ask.model}@{ask.commit} {ask.task} layer {ask.layer}"
            )
        if not low <= r.main_score <= high:
            return f"main_score {r.main_score} of {r.split}/{r.subset} is outside [{low:g}, {high:g}]"
    got = sorted((r.split, r.subset) for r in record.rows)
    if got != sorted(ask.scores):
        return f"scores of (split, subset) {got}; the unit asks for {sorted(ask.scores)}"
    return None


def read_score(path: Path, ask: ScoreAsk) -> list[dict] | None:
    """The rows of the score record at `path` if it is one its unit asked for, else None (rejected:
    logged and removed)."""
    record, why = _load(path, ScoreRecord)
    if record is not None and (why := score_mismatch(record, ask)) is None:
        return [row.model_dump() for row in record.rows]
    if why is not None:
        _reject(path, why)
    return None


class InvalidRecord(Permanent, ValueError):
    """A record about to be written is not what its unit asked for (mteb's answer, or a bug): the
    same on every try, so never retried."""


def write_score(path: Path, ask: ScoreAsk, rows: list[dict], settings: Mapping[str, Any],
                provenance: Mapping[str, Any], embeddings_sha256: str) -> None:  # fmt: skip
    """Write the score record of `rows`, refusing one that would be rejected when read back."""
    record = ScoreRecord.seal(settings=dict(settings), provenance=dict(provenance),
                              embeddings_sha256=embeddings_sha256, rows=rows)  # fmt: skip
    if (why := score_mismatch(record, ask)) is not None:
        raise InvalidRecord(f"{path}: {why}")
    _write(path, record)


# --- metrics records -------------------------------------------------------------------------------


class MetricRow(_Model):
    """One representation metric of one (checkpoint, layer): a row of the metrics table."""

    model: str
    commit: str | None
    depth: Finite
    layer: Count
    hidden_state: int
    corpus: str
    metric: str
    normalization: str
    value: float  # NaN only where `MetricsAsk.may_be_nan` allows it
    n_prompts: Annotated[int, Field(ge=2)]
    n_skipped: Count


class MetricsRecord(_Record):
    """Completion record of one (checkpoint, layer)'s metrics."""

    kind: Literal["metrics"] = "metrics"
    settings: dict[str, Any]  # the encoder settings (`Settings.encoder_settings`)
    metrics: dict[str, Any]  # the spec's metrics section
    metrics_key: str
    provenance: dict[str, Any]
    rows: Annotated[list[MetricRow], Field(min_length=1)]


@dataclass(frozen=True)
class MetricsAsk:
    """What one (checkpoint, layer)'s metrics record must hold."""

    model: str
    commit: str | None
    layer: int
    settings: Mapping[str, Any]
    metrics_key: str
    metrics: frozenset[tuple[str, str]]  # (metric, normalization)
    may_be_nan: frozenset[str] = field(default_factory=frozenset)  # NaN when no prompt could be measured


def metrics_mismatch(record: MetricsRecord, ask: MetricsAsk) -> str | None:
    """How `record` departs from what its layer asked for; None when it does not."""
    if record.settings != dict(ask.settings) or record.metrics_key != ask.metrics_key:
        return "written under other settings or another metrics key than its folder's"
    for r in record.rows:
        if (r.model, r.commit, r.layer, r.hidden_state) != (ask.model, ask.commit, ask.layer, ask.layer + 1):
            return f"a row of {r.model}@{r.commit} layer {r.layer}; the unit is {ask.model}@{ask.commit} layer {ask.layer}"
        if r.n_skipped > r.n_prompts:
            return f"{r.metric}/{r.normalization}: {r.n_skipped} prompts skipped of {r.n_prompts}"
        unmeasured = r.metric in ask.may_be_nan and r.n_skipped == r.n_prompts
        if not math.isfinite(r.value) and not (unmeasured and math.isnan(r.value)):
            return f"{r.metric}/{r.normalization} is {r.value}"
    got = sorted((r.metric, r.normalization) for r in record.rows)
    if got != sorted(ask.metrics):
        return f"metrics {got}; the layer asks for {sorted(ask.metrics)}"
    return None


def read_metrics(path: Path, ask: MetricsAsk) -> list[dict] | None:
    """The rows of the metrics record at `path` if it is the one its layer asked for, else None."""
    record, why = _load(path, MetricsRecord)
    if record is not None and (why := metrics_mismatch(record, ask)) is None:
        return [row.model_dump() for row in record.rows]
    if why is not None:
        _reject(path, why)
    return None


def write_metrics(path: Path, ask: MetricsAsk, rows: list[dict], metrics: Mapping[str, Any],
                  provenance: Mapping[str, Any]) -> None:  # fmt: skip
    record = MetricsRecord.seal(settings=dict(ask.settings), metrics=dict(metrics), metrics_key=ask.metrics_key,
                                provenance=dict(provenance), rows=rows)  # fmt: skip
    if (why := metrics_mismatch(record, ask)) is not None:
        raise InvalidRecord(f"{path}: {why}")
    _write(path, record)


# --- cost records ----------------------------------------------------------------------------------


class CostRecord(_Record):
    """Measured cost of one GPU unit (a task's embeddings, a checkpoint's metrics): a row of `costs`."""

    kind: Literal["cost"] = "cost"
    phase: Literal["embed", "measure"]
    task: str | None
    seconds: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    device: str
    texts: Count | None = None
    unique_texts: Count | None = None
    real_tokens: Count | None = None
    padded_tokens: Count | None = None
    batches: Count | None = None
    truncated: Count | None = None
    oom_splits: Count | None = None  # batches split after running out of GPU memory
    peak_memory_gb: Finite | None = None
    peak_gpu_memory_gb: Finite | None = None

    def row(self) -> dict[str, Any]:
        return self.model_dump(exclude={"version", "digest", "kind"})


def read_cost(path: Path) -> CostRecord | None:
    """The cost record at `path`, or None (none there, or rejected: logged and removed)."""
    record, why = _load(path, CostRecord)
    if why is not None:
        _reject(path, why, "measured again when its unit is computed again")
    return record


def write_cost(path: Path, cost: CostRecord) -> None:
    _write(path, cost)


# --- a unit's embeddings ---------------------------------------------------------------------------


class EmbeddingFile(_Model):
    """One file of a unit's embeddings: its size and content digest; for a layer, its shape."""

    size: Count
    sha256: Sha256
    layer: Count | None  # None: texts.json
    rows: Count  # texts (texts.json) or vectors (a layer)
    dim: Count | None  # a layer's width; None for texts.json


class EmbeddingsManifest(_Record):
    """A (checkpoint, task) unit's manifest (done.json, written last): whose embeddings these are,
    of which texts, every valid file with its digest, and what embedding them cost."""

    kind: Literal["embeddings"] = "embeddings"
    model: str
    commit: str | None
    task: str
    texts_sha256: Sha256  # `texts_digest` of the texts embedded
    texts: Count
    files: dict[str, EmbeddingFile]
    cost: CostRecord


@dataclass(frozen=True)
class EmbeddingsAsk:
    """Whose embeddings a unit needs: the checkpoint, the task and its recorded texts."""

    model: str
    commit: str | None
    task: str
    texts_sha256: str
    texts: int

    @classmethod
    def of(cls, model: str, commit: str | None, task: str, texts: list[str]) -> EmbeddingsAsk:
        return cls(model, commit, task, texts_digest(texts), len(texts))


def layer_file(block: int) -> str:
    return f"layer_{block}.npy"


class RejectedEmbeddings(ValueError):
    """A layer's file is not the one its manifest lists (digest, shape) or holds non-finite values."""


@dataclass
class EmbeddingsCheck:
    """What a unit's embeddings hold: the files verified whole, and those rejected (name -> why)."""

    manifest: EmbeddingsManifest | None
    good: dict[str, EmbeddingFile]
    rejected: dict[str, str]

    def holds(self, blocks: list[int]) -> bool:
        """True when texts.json and every layer of `blocks` are verified whole."""
        return all(name in self.good for name in ["texts.json", *map(layer_file, blocks)])


def check_embeddings(path: Path, ask: EmbeddingsAsk) -> EmbeddingsCheck:
    """Every file of the unit at `path` checked against its manifest and what the unit asks for: a
    file is good when its size and sha256 are the manifest's, and, for a layer, it is a float32 matrix
    of the manifest's shape (a row per text) with finite values only. Reads every listed file."""
    manifest, why = _load(path / "done.json", EmbeddingsManifest)
    if manifest is None:
        return EmbeddingsCheck(None, {}, {"done.json": why} if why else {})
    mine = (manifest.model, manifest.commit, manifest.task, manifest.texts_sha256, manifest.texts)
    if mine != (ask.model, ask.commit, ask.task, ask.texts_sha256, ask.texts):
        why = (f"the embeddings of {manifest.model}@{manifest.commit} {manifest.task} ({manifest.texts} texts "
               f"{manifest.texts_sha256[:12]}); the unit is {ask.model}@{ask.commit} {ask.task} "
               f"({ask.texts} texts {ask.texts_sha256[:12]})")  # fmt: skip
        return EmbeddingsCheck(manifest, {}, {"done.json": why})
    good, rejected = {}, {}
    for name, entry in manifest.files.items():
        try:
            _verified(path / name, entry, manifest)
        except RejectedEmbeddings as e:
            rejected[name] = str(e)
        else:
            good[name] = entry
    return EmbeddingsCheck(manifest, good, rejected)


def _verified(path: Path, entry: EmbeddingFile, manifest: EmbeddingsManifest) -> np.ndarray | None:
    """The layer's vectors (None for texts.json) after checking the file against its manifest entry;
    RejectedEmbeddings saying why it is not."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RejectedEmbeddings(f"listed in the manifest but unreadable ({e.strerror})") from None
    if len(data) != entry.size:
        raise RejectedEmbeddings(f"{len(data)} bytes, the manifest lists {entry.size}")
    if sha256(data) != entry.sha256:
        raise RejectedEmbeddings("its content digest differs from the manifest's (edited or damaged)")
    if entry.layer is None:
        if path.name != "texts.json" or entry.sha256 != manifest.texts_sha256:
            raise RejectedEmbeddings("not the texts the manifest names")
        return None
    if path.name != layer_file(entry.layer):
        raise RejectedEmbeddings(f"the manifest lists it as layer {entry.layer}")
    try:
        vectors = np.load(io.BytesIO(data), allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise RejectedEmbeddings(f"not a .npy array ({e})") from None
    if (
        vectors.dtype != np.float32
        or vectors.shape != (manifest.texts, entry.dim)
        or entry.rows != manifest.texts
    ):
        raise RejectedEmbeddings(f"a {vectors.dtype} array of shape {vectors.shape}, the manifest lists "
                                 f"float32 ({manifest.texts}, {entry.dim})")  # fmt: skip
    if not np.isfinite(vectors).all():
        raise RejectedEmbeddings(f"{int((~np.isfinite(vectors)).sum())} non-finite values")
    return vectors


def load_layer(path: Path, ask: EmbeddingsAsk, block: int) -> tuple[np.ndarray, str]:
    """One layer's vectors (float32 [texts, d]) and its file's sha256, checked as `check_embeddings`
    checks them; RejectedEmbeddings naming the file and why when they cannot be scored."""
    manifest, why = _load(path / "done.json", EmbeddingsManifest)
    where = path / layer_file(block)
    if manifest is None:
        raise RejectedEmbeddings(f"{path / 'done.json'}: {why or 'missing'}")
    if (manifest.model, manifest.commit, manifest.task, manifest.texts_sha256) != (
        ask.model, ask.commit, ask.task, ask.texts_sha256
    ):  # fmt: skip
        raise RejectedEmbeddings(f"{path}: the embeddings of another unit or another text set")
    entry = manifest.files.get(layer_file(block))
    if entry is None:
        raise RejectedEmbeddings(f"{where}: not listed in the manifest")
    try:
        vectors = _verified(where, entry, manifest)
    except RejectedEmbeddings as e:
        raise RejectedEmbeddings(f"{where}: {e}") from None
    return vectors, entry.sha256


def embedding_file(path: Path, layer: int | None, rows: int, dim: int | None) -> EmbeddingFile:
    """The manifest entry of a file just written."""
    data = path.read_bytes()
    return EmbeddingFile(size=len(data), sha256=sha256(data), layer=layer, rows=rows, dim=dim)


def write_manifest(path: Path, manifest: EmbeddingsManifest) -> None:
    _write(path / "done.json", manifest)


# --- recorded texts --------------------------------------------------------------------------------


class TextsRecord(_Record):
    """The texts mteb asks for on one task (one recording pass), cached in the store."""

    kind: Literal["texts"] = "texts"
    task: str
    dataset_revision: str
    mteb_version: str
    texts: Annotated[list[str], Field(min_length=1)]
    requested: Count
    texts_sha256: Sha256


def read_texts(path: Path, task: str, dataset_revision: str, mteb_version: str) -> TextsRecord | None:
    """The recorded texts at `path` if whole and of this task, revision and mteb version, else None."""
    record, why = _load(path, TextsRecord)
    if record is not None:
        if (record.task, record.dataset_revision, record.mteb_version) != (
            task,
            dataset_revision,
            mteb_version,
        ):
            why = f"the texts of {record.task}@{record.dataset_revision} (mteb {record.mteb_version})"
        elif record.requested < len(record.texts) or record.texts_sha256 != texts_digest(record.texts):
            why = "its text count or text digest does not hold"
        else:
            return record
    if why is not None:
        _reject(path, why, "recorded again")
    return None


def peek_texts(path: Path) -> TextsRecord | None:
    """The recorded texts at `path` if they read back whole, else None; never removed (a reader of
    the store that changes nothing: the report)."""
    return _load(path, TextsRecord)[0]


def write_texts(path: Path, task: str, dataset_revision: str, mteb_version: str, texts: list[str],
                requested: int) -> None:  # fmt: skip
    record = TextsRecord.seal(task=task, dataset_revision=dataset_revision, mteb_version=mteb_version,
                              texts=texts, requested=requested, texts_sha256=texts_digest(texts))  # fmt: skip
    _write(path, record)
