"""One forward pass per unique text, pooled embeddings for every requested layer (docs/design.md §3).

Layer convention: a layer is a 0-based **block index** b; its states are `hidden_states[b + 1]`.
With `final_norm="all"` (the paper's way: the model truncated to b + 1 blocks) every layer gets
the model's final norm, per token, before pooling; `hidden_states[L]` already carries it and is
never normed twice. With `final_norm="last"` the other layers are the raw residual stream.
"""

from __future__ import annotations

import copy
import os
import platform
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from layertime import architecture, checkpoints
from layertime.errors import Permanent
from layertime.hub.cache import from_cache_first
from layertime.spec import SpecError

# CPU forward passes run on this many torch threads, whatever the process set before: BLAS splits
# sums by thread, so the thread count changes the last bits (up to 3.6e-7 on the demo, enough to move
# a classification score by 8e-4), and scoring in the same process (`--plain`, SLURM GPU jobs that
# score) pins BLAS/OpenMP to one thread (bridge.prepare_scoring_process). One, so a unit embedded
# before or after scoring, in the flow or `--plain`, on any core count, gives the same bits (on one
# CPU type and library build: BLAS picks its kernels by instruction set).
CPU_THREADS = 1


class EncoderOutOfMemory(MemoryError):
    """A text that does not fit in GPU memory even in a batch of its own."""


class NonFiniteEmbedding(Permanent, FloatingPointError):
    """A layer produced NaN or inf (fp16 overflow in Pythia's huge-magnitude dimensions, bad weights)."""


LIBRARY_DEVICE_FIX = "run on a GPU node, or pass device='cpu' (float32, slow)"


class DeviceUnavailable(Permanent, ValueError):
    """The device asked for does not exist here (`cuda` on a machine where torch sees no GPU): `what`
    is missing, then the `fix`. The fix depends on how the run was started, so a caller that knows
    replaces the library's (`with_fix`): `--device cpu` for `layertime run --plain`, a cluster
    profile's `device: cpu` for a flow, the `device` argument in a notebook."""

    def __init__(self, what: str, fix: str = LIBRARY_DEVICE_FIX) -> None:
        super().__init__(f"{what}; {fix}" if fix else what)
        self.what, self.fix = what, fix

    def with_fix(self, fix: str) -> DeviceUnavailable:
        return DeviceUnavailable(self.what, fix)

    def __reduce__(self) -> tuple:  # pickled by its parts (a SLURM worker ships it to the flow)
        return type(self), (self.what, self.fix)


def import_model_classes() -> None:
    """Import what loading a model takes, in the calling thread, before threads that load models start.

    transformers resolves `AutoModel` and friends lazily on first use; two threads that load models at
    once on a fresh process (two checkpoints' `gpu` tasks on a new SLURM worker) raced in that, and
    one failed with `ImportError: cannot import name 'AutoModel' from 'transformers'` (issue 23)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer  # noqa: F401


@dataclass(frozen=True)
class EncodeStats:
    """What one `encode` call did: texts asked for vs forwarded, real vs padded tokens."""

    texts: int
    unique_texts: int
    real_tokens: int
    padded_tokens: int
    batches: int
    truncated: int = 0  # unique texts longer than max_length, cut to it
    oom_splits: int = 0  # batches split after running out of GPU memory (their bits may differ)


def token_budget_batches(
    lengths: Sequence[int], tokens_per_batch: int, max_padding: float = 1.10
) -> list[list[int]]:
    """Indices grouped into batches whose padded size (rows × longest row) fits the budget.

    Longest first, so each batch holds texts of similar length. A text joins the open batch only
    while rows × longest ≤ `max_padding` × real tokens, so padded ≤ max_padding × real tokens
    overall, for any mix of lengths; a text longer than the budget gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    real = 0  # real tokens in the open batch
    for i in order:
        if batches:
            padded = (len(batches[-1]) + 1) * lengths[batches[-1][0]]
            if padded <= tokens_per_batch and padded <= max_padding * (real + lengths[i]):
                batches[-1].append(i)
                real += lengths[i]
                continue
        batches.append([i])
        real = lengths[i]
    return batches


def check_device(device: str | torch.device | None) -> torch.device:
    """The torch device to embed on: `device`, else cuda when a GPU is visible, else cpu.

    Asking for a GPU that torch cannot see fails here, naming the device and why, instead of deep
    inside the first forward pass with torch's own words.
    """
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError) as e:
        raise DeviceUnavailable(f"device {device!r} is not a torch device ({e})", fix="") from None
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        why = (
            [f"torch {torch.__version__} is built without CUDA"] if not torch.backends.cuda.is_built() else []
        )
        why += [f"CUDA_VISIBLE_DEVICES={visible!r}"] if visible is not None else []
        raise DeviceUnavailable(
            f"device {str(dev)!r}: no GPU is visible on {platform.node()}"
            + (f" ({'; '.join(why)})" if why else "")
        )
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceUnavailable(
            f"device {str(dev)!r}: only {torch.cuda.device_count()} GPU(s) are visible", fix=""
        )
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """'auto'/None: bfloat16 on a CUDA device that supports it, float32 otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, dtype)


class MultiLayerEncoder:
    """Embed texts with every requested layer of one checkpoint in a single forward pass.

    `encode(texts)` returns {block index: float32 array [len(texts), d]} in input order.

    An empty text (mteb datasets hold some) is embedded as the EOS token alone: a decoder without
    BOS would otherwise get zero tokens, and mean pooling would divide by zero. Encoders that add
    special tokens embed their [CLS] [SEP] as they would for any text.
    """

    def __init__(
        self,
        model: str,
        revision: str | None = None,
        layers: Sequence[int] | str = "all",
        final_norm: str = "all",
        pooling: str = "mean",
        normalize: bool = False,
        max_length: int = 2048,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        tokens_per_batch: int = 16384,
        cache_dir: str | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        if final_norm not in ("all", "last"):
            raise ValueError(f"final_norm must be 'all' or 'last', got {final_norm!r}")
        if pooling not in ("mean", "last"):
            raise ValueError(f"pooling must be 'mean' or 'last', got {pooling!r}")
        from transformers import AutoModel, AutoTokenizer

        self.name = f"{model}@{revision or 'main'}"
        self.device = check_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        try:  # from the cache alone when it holds the checkpoint, whatever HF_HUB_OFFLINE says
            self.tokenizer = from_cache_first(AutoTokenizer.from_pretrained, model, revision, cache_dir)
            self.model = from_cache_first(
                AutoModel.from_pretrained, model, revision, cache_dir, dtype=self.dtype
            )
        except OSError as e:
            raise checkpoints.CheckpointError(f"cannot load {self.name}: {e}") from None
        self.model.eval()  # on the device at its first forward pass (`to_device`)
        self._on_device = False
        self.anatomy = architecture.anatomy(self.model.config)
        L = self.anatomy.num_blocks
        self.layers = list(range(L)) if layers == "all" else [int(b) for b in layers]
        bad = [b for b in self.layers if not 0 <= b < L]
        if bad:
            raise SpecError(f"layers: block {bad[0]} is outside {self.name}'s {L} blocks (0..{L - 1})")
        # The norm runs in float32 on a copy, so bf16 weights never round the pooled values.
        norm = self.anatomy.final_norm(self.model) if final_norm == "all" else None
        self._norm: nn.Module | None = copy.deepcopy(norm).float() if norm is not None else None
        self.final_norm, self.pooling, self.normalize = final_norm, pooling, normalize
        self.max_length, self.tokens_per_batch = max_length, tokens_per_batch
        self.pad_id = self._pad_id()
        self.progress = progress
        self.oom_splits = 0  # batches split after running out of GPU memory, all calls
        self.truncated = 0  # texts of the last tokenize() longer than max_length
        self.last_stats: EncodeStats | None = None

    def to_device(self) -> None:
        """Move the weights to the encoder's device; the first forward pass does it when not done.

        Loading stays in host memory until then, so a GPU worker can read the next checkpoint from
        storage while the current one computes, and hold only one model on the GPU (tasks/units.py).
        """
        if not self._on_device:
            self.model.to(self.device)
            if self._norm is not None:
                self._norm.to(self.device)
            self._on_device = True

    def _pad_id(self) -> int:
        """Decoders pad with EOS (docs/design.md §3; Pythia has no pad token of its own), encoders with their pad.

        Right padding under a causal mask cannot change a real token's state, and pads are
        excluded from pooling, so this choice never changes a number.
        """
        tok = self.tokenizer
        first = (
            (tok.pad_token_id, tok.eos_token_id)
            if self.anatomy.add_special_tokens
            else (tok.eos_token_id, tok.pad_token_id)
        )
        return next((i for i in first if i is not None), 0)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text, truncated to max_length (counted in `self.truncated`); an empty text
        becomes the EOS token alone, as a decoder sees an empty prompt."""
        ids = self._ids(texts, truncate=True)
        at_limit = [t for t, row in zip(texts, ids, strict=True) if len(row) == self.max_length]
        self.truncated = sum(len(row) > self.max_length for row in self._ids(at_limit, truncate=False))
        return [row if row else [self.pad_id] for row in ids]

    def _ids(self, texts: Sequence[str], truncate: bool) -> list[list[int]]:
        if not texts:
            return []
        kwargs = {"truncation": True, "max_length": self.max_length} if truncate else {}
        return self.tokenizer(list(texts), add_special_tokens=self.anatomy.add_special_tokens, **kwargs)[
            "input_ids"
        ]

    def encode(self, texts: Sequence[str]) -> dict[int, np.ndarray]:
        """{block: float32 [len(texts), d]}: each unique text is forwarded once, all layers at once.

        The numbers depend only on `texts` and the encoder's settings, never on earlier calls: the
        batch plan is a function of the texts' token lengths and the configured `tokens_per_batch`
        (a text's last bits depend on its batch-mates), and CPU passes use `CPU_THREADS` threads. A
        batch split after running out of GPU memory is the one exception (`last_stats.oom_splits`).
        """
        splits_before = self.oom_splits
        unique = list(dict.fromkeys(texts))
        row_of = {t: i for i, t in enumerate(unique)}
        ids = self.tokenize(unique)
        out = {b: np.empty((len(unique), self.dim), dtype=np.float32) for b in self.layers}
        batches = token_budget_batches([len(r) for r in ids], self.tokens_per_batch)
        padded = 0
        for batch in batches:
            pooled = self._forward_fitting([ids[i] for i in batch])
            padded += len(batch) * len(ids[batch[0]])
            for b, vectors in pooled.items():
                out[b][batch] = vectors
            if self.progress:
                self.progress(len(batch))
        self.last_stats = EncodeStats(
            len(texts), len(unique), sum(map(len, ids)), padded, len(batches), self.truncated,
            self.oom_splits - splits_before,
        )  # fmt: skip
        order = np.fromiter((row_of[t] for t in texts), dtype=np.int64, count=len(texts))
        return {
            b: (m if len(unique) == len(texts) and _is_identity(order) else m[order]) for b, m in out.items()
        }

    def iter_batches(
        self, texts: Sequence[str]
    ) -> Iterator[tuple[list[int], torch.Tensor, dict[int, torch.Tensor]]]:
        """Token states of every requested layer, batch by batch, for streaming consumers (metrics).

        Yields (indices into `texts`, mask (B, T) on the device, {block: float32 (B, T, D)}) with the
        final norm applied as `final_norm` says; nothing is kept between batches.
        """
        ids = self.tokenize(texts)
        for batch in token_budget_batches([len(r) for r in ids], self.tokens_per_batch):
            mask, states = self._layer_states([ids[i] for i in batch])
            yield batch, mask, states

    @torch.inference_mode()
    def _layer_states(self, rows: list[list[int]]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        T = max(map(len, rows))
        input_ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, row in enumerate(rows):  # right padding: real tokens keep positions 0..len-1
            input_ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        self.to_device()
        self._pin_cpu_threads()
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states
        L = self.anatomy.num_blocks
        states = {}
        for b in self.layers:
            h = hidden[b + 1].float()  # (B, T, D)
            if self._norm is not None and not (b == L - 1 and self.anatomy.last_is_normed()):
                h = self._norm(h)
            states[b] = h
        return mask, states

    def _pin_cpu_threads(self) -> None:
        """Run this thread's CPU forward passes on `CPU_THREADS` torch threads (see there).

        Set before every pass, in the thread that runs it (a Dask worker thread has its own OpenMP
        setting), and not restored afterwards: a restore could lift the one-thread limit that
        scoring in another thread of this process relies on.
        """
        if self.device.type == "cpu" and torch.get_num_threads() != CPU_THREADS:
            torch.set_num_threads(CPU_THREADS)

    def _forward_fitting(self, rows: list[list[int]]) -> dict[int, np.ndarray]:
        """`_forward`, splitting a batch in halves while it runs out of GPU memory.

        Only this batch is split: the token budget of later batches and later calls stays as
        configured, so one out-of-memory moment never changes the batch plan (and with it the last
        bits) of other units. A single text that does not fit alone is an error that says what to
        change.
        """
        try:
            return self._forward(rows)
        except torch.cuda.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(rows) == 1:
                raise EncoderOutOfMemory(
                    f"{self.name}: one text of {len(rows[0])} tokens does not fit in GPU memory even alone; "
                    f"lower max_length (now {self.max_length}) or use a GPU with more memory"
                ) from None
        self.oom_splits += 1
        half = len(rows) // 2
        first, second = self._forward_fitting(rows[:half]), self._forward_fitting(rows[half:])
        return {b: np.concatenate([first[b], second[b]]) for b in first}

    @torch.inference_mode()
    def _forward(self, rows: list[list[int]]) -> dict[int, np.ndarray]:
        mask, states = self._layer_states(rows)
        pooled = torch.stack([self.pool(h, mask) for h in states.values()])  # (layers, B, D)
        host = pooled.cpu().numpy()  # one device sync per batch, not one per layer
        finite = np.isfinite(host).reshape(len(host), -1).all(axis=1)
        if not finite.all():
            b = list(states)[int(np.argmin(finite))]
            raise NonFiniteEmbedding(
                f"{self.name}: layer {b} (hidden_states[{b + 1}]) produced NaN/inf in {self.dtype}; "
                "try dtype: float32"
            )
        return dict(zip(states, host, strict=True))

    def pool(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T, D) token states -> (B, D) float32, as this encoder pools: mean over real tokens (or
        the last real token), then L2 normalisation when asked. Padding may sit left or right."""
        m = mask.bool()
        if self.pooling == "last":
            last = m.shape[1] - 1 - m.flip(1).int().argmax(1)  # (B,) position of the last real token
            vectors = h[torch.arange(h.shape[0], device=h.device), last]
        else:
            vectors = torch.where(m[..., None], h, 0.0).sum(1) / m.sum(1, keepdim=True)
        if self.normalize:
            vectors = torch.nn.functional.normalize(vectors, dim=-1)
        return vectors.float()


def _is_identity(order: np.ndarray) -> bool:
    return bool((order == np.arange(len(order))).all())
