"""Representation metrics of every layer of one checkpoint, streamed from the encoder (docs/design.md §5).

`measure(encoder, prompts)` makes one pass over the prompts and one over their augmented views:

- token pass: for each batch from `MultiLayerEncoder.iter_batches` and each layer, the per-prompt
  metrics (prompt entropy, curvature) are computed from the token states at once, and the batch's
  pooled embeddings are kept; the token states are then dropped. Nothing larger than one batch of
  token states (all layers) is ever held.
- view pass: the same for the augmented views (`layertime.augment.views`), pooled only.
- dataset metrics per layer from the pooled embeddings: dataset entropy and effective rank from the
  prompts; InfoNCE and DiME from views 0 and 1; LiDAR from views 0..lidar_views-1 (the 2-view set
  is the start of the LiDAR set, so the view pass costs max(n_views, lidar_views) forwards).

The token states are the encoder's: its final-norm setting applies (docs/design.md §3: by default every layer
gets the final norm). Pooled embeddings are made as the encoder pools for scoring (mean over real
tokens by default, L2-normalised only if the encoder is), in float32, so the metrics describe the
embeddings that are scored. Pooled embeddings stay on the encoder's device
(prompts × (1 + views) × layers × d float32: ~0.8 GB for 472 prompts, 16 views, 25 layers, d = 1024).

Rows (the caller adds checkpoint and model columns): metric, normalization —
``prompt_entropy``/``max_entropy`` (mean over prompts of H / min(log T, log D)),
``curvature``/``raw`` (radians), ``dataset_entropy``/``max_entropy``, ``effective_rank``/``raw``,
``infonce``/``raw`` (the loss) and ``mi_lower_bound`` (1 - loss/log N), ``dime``/``raw`` (nats)
and ``max_entropy``, ``lidar``/``raw`` (H in nats) and ``max_entropy`` (H / min(log N, log D)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from layertime import augment, metrics
from layertime.encoder import MultiLayerEncoder

DEFAULT_CORPUS = "wikitext-103"


@dataclass
class TokenPass:
    """Per-layer results of one streamed pass: per-prompt metrics (N,), NaN where skipped; pooled (N, D)."""

    entropy: dict[int, Tensor]
    curvature: dict[int, Tensor]
    pooled: dict[int, Tensor]


def token_pass(encoder: MultiLayerEncoder, texts: Sequence[str], per_prompt: bool = True) -> TokenPass:
    """One streamed pass over `texts`: per-prompt metrics (when asked) and pooled embeddings, all layers."""
    N, D, dev = len(texts), encoder.dim, encoder.device
    nan = torch.full((N,), math.nan, dtype=torch.float64, device=dev)
    out = TokenPass(
        entropy={b: nan.clone() for b in encoder.layers} if per_prompt else {},
        curvature={b: nan.clone() for b in encoder.layers} if per_prompt else {},
        pooled={b: torch.empty(N, D, dtype=torch.float32, device=dev) for b in encoder.layers},
    )
    for indices, mask, states in encoder.iter_batches(texts):
        rows = torch.tensor(indices, device=dev)
        for b, h in states.items():
            out.pooled[b][rows] = encoder.pool(h, mask)
            if per_prompt:
                entropy, curvature = metrics.prompt_metrics(h, mask)
                out.entropy[b][rows], out.curvature[b][rows] = entropy.double(), curvature.double()
    return out


def pooled_views(
    encoder: MultiLayerEncoder, texts: Sequence[str], n_views: int, seed: int
) -> dict[int, Tensor]:
    """{block: (N, V, D) float32}: pooled embeddings of `n_views` augmented views of every text."""
    if n_views == 0:
        return {}
    flat = [t for view in augment.views(texts, n_views, seed) for t in view]  # view-major: v * N + i
    pooled = token_pass(encoder, flat, per_prompt=False).pooled
    return {b: x.reshape(n_views, len(texts), -1).transpose(0, 1) for b, x in pooled.items()}  # (N, V, D)


PER_PROMPT = frozenset({"prompt_entropy", "curvature"})  # means over prompts: NaN when none could be measured


def metric_names(n_views: int, lidar_views: int) -> list[tuple[str, str]]:
    """(metric, normalization) of every row `layer_values` gives a layer, in its order."""
    names = [("prompt_entropy", "max_entropy"), ("curvature", "raw"), ("dataset_entropy", "max_entropy"),
             ("effective_rank", "raw")]  # fmt: skip
    if n_views:
        names += [("infonce", "raw"), ("infonce", "mi_lower_bound"), ("dime", "raw"), ("dime", "max_entropy")]
    if lidar_views:
        names += [("lidar", "raw"), ("lidar", "max_entropy")]
    return names


def layer_values(
    tokens: TokenPass, views: dict[int, Tensor], b: int, n_views: int, lidar_views: int, seed: int
) -> list[tuple]:
    """(metric, normalization, value, n_skipped) of layer b."""
    X = tokens.pooled[b]
    N, D = X.shape
    norm = min(math.log(N), math.log(D))
    out = [
        _mean("prompt_entropy", "max_entropy", tokens.entropy[b]),
        _mean("curvature", "raw", tokens.curvature[b]),
    ]
    out += [("dataset_entropy", "max_entropy", metrics.dataset_entropy(X), 0)]
    out += [("effective_rank", "raw", metrics.effective_rank(X), 0)]
    if n_views:
        A, B = views[b][:, 0], views[b][:, 1]
        loss, bound = metrics.infonce(A, B)
        d = metrics.dime(A, B, seed=seed)
        out += [("infonce", "raw", loss, 0), ("infonce", "mi_lower_bound", bound, 0)]
        out += [("dime", "raw", d, 0), ("dime", "max_entropy", d / norm, 0)]
    if lidar_views:
        H = metrics.lidar(views[b][:, :lidar_views])
        out += [("lidar", "raw", H, 0), ("lidar", "max_entropy", H / norm, 0)]
    return out


def _mean(metric: str, normalization: str, per_prompt: Tensor) -> tuple:
    """Mean over the prompts that could be measured, and how many could not."""
    kept = per_prompt[~torch.isnan(per_prompt)]
    value = float(kept.mean()) if kept.numel() else math.nan
    return metric, normalization, value, int(per_prompt.numel() - kept.numel())


def check_views(n_views: int, lidar_views: int) -> None:
    if n_views not in (0, 2):
        raise ValueError(
            f"n_views must be 2 (InfoNCE and DiME compare two views) or 0 to skip them, got {n_views}"
        )
    if lidar_views == 1 or lidar_views < 0:
        raise ValueError(f"lidar_views must be 0 (skip LiDAR) or at least 2, got {lidar_views}")


def measure(
    encoder: MultiLayerEncoder,
    prompts: list[str],
    n_views: int = 2,
    lidar_views: int = 16,
    seed: int = 0,
    corpus: str = DEFAULT_CORPUS,
) -> list[dict]:
    """Every metric of every layer of `encoder` on `prompts`, as tidy rows (see the module docstring).

    Row keys: layer (block index), hidden_state (b + 1), corpus, metric, normalization, value,
    n_prompts (prompts in the corpus), n_skipped (prompts a per-prompt metric could not measure:
    too short, or a zero centred token). `seed` drives the augmentations (and so the views).
    """
    check_views(n_views, lidar_views)
    if len(prompts) < 2:
        raise ValueError(f"measure needs at least 2 prompts, got {len(prompts)}")
    tokens = token_pass(encoder, prompts)
    views = pooled_views(encoder, prompts, max(n_views, lidar_views), seed)
    return [
        {
            "layer": b,
            "hidden_state": b + 1,
            "corpus": corpus,
            "metric": metric,
            "normalization": normalization,
            "value": value,
            "n_prompts": len(prompts),
            "n_skipped": skipped,
        }
        for b in encoder.layers
        for metric, normalization, value, skipped in layer_values(
            tokens, views, b, n_views, lidar_views, seed
        )
    ]
