"""Label-free representation metrics of a layer (docs/design.md §5): the paper's seven, with its bugs fixed.

Every function takes raw hidden states or pooled embeddings and normalises them itself:

- *normalise rows*: centre over the rows (a prompt's real tokens, or the whole dataset), then
  L2-normalise each row: ``z_i = (x_i - mean) / ||x_i - mean||``.
- *matrix entropy* of an N×D matrix Z: ``K = Zn Znᵀ / tr(Zn Znᵀ)`` with eigenvalues λ; keeping
  λ > 0, ``p = λ / Σλ`` and ``H = -Σ p log p`` (α = 1) or ``H = log(Σ p^α) / (1 - α)`` (α ≠ 1), in
  nats. Normalised: ``H / min(log N, log D)``. No element-wise clamp of K (the paper clamped
  negative Gram entries to 0, which changes the spectrum).

Math runs in float64 on the input's device (float32 on devices without float64), never in bf16.
A prompt that cannot be measured is NaN, never an error: too few real tokens (T < 2 for entropy,
T < 3 for curvature), a centred token that is zero (e.g. all tokens identical: its direction is
undefined), or non-finite states. Padding (mask 0) never influences a value, wherever it sits:
padded positions are dropped before any arithmetic, so even NaN there is harmless.

Eigenvalues "> 0" means above the usual rank tolerance ``λ_max · size · eps``: a PSD matrix's zero
eigenvalues come out of a solver as ±round-off, which would otherwise count as tiny probabilities
(harmless for α ≥ 1, but α < 1 would count them).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK_ELEMENTS = {"cpu": 2**20, "default": 2**26}
"""Per-prompt metrics run over row chunks of at most this many (padded) token-state elements.

On a CPU, small chunks keep the float64 temporaries in cache and out of mmap/munmap churn: measured
1.8× faster than whole 16k-token batches at d = 1024 (and faster than one prompt at a time). On an
accelerator, big batches amortise kernel launches; the bound only caps memory (512 MB per float64 copy).
"""

ZERO_RTOL = 1e-10
"""A centred token counts as zero when its norm is at most this fraction of the prompt's largest one.

float32 states that differ at all differ by ≳1e-9 relative; float64 round-off of identical ones is
≲1e-13 (identical tokens even centre to exact zeros, see `_centre_normalise`).
"""


# --------------------------------------------------------------------------------------------- helpers


def _dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _compact(hidden: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Real tokens moved to the front of each row, in order: (hidden (B, T', D), lengths (B,)).

    T' is the longest prompt. Right-padded input (what the encoder yields) is only trimmed;
    left or scattered padding is gathered into place with a stable sort.
    """
    real = mask.to(device=hidden.device, dtype=torch.bool)  # (B, T)
    n = real.sum(1)  # (B,)
    width = max(int(n.max()), 1) if n.numel() else 0
    front = torch.arange(real.shape[1], device=real.device) < n[:, None]  # (B, T)
    if not torch.equal(real, front):
        order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)  # real positions first
        hidden = hidden.gather(1, order[..., None].expand_as(hidden))
    return hidden[:, :width], n


def _centre_normalise(hidden: Tensor, n: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Centre each prompt's real tokens, then L2-normalise them.

    hidden: (B, T, D) compacted (real tokens first), n: (B,) real tokens per prompt.
    Returns (zn (B, T, D) with zeros at padding, valid (B, T), ok (B,)): ok is False where a
    centred token is zero or a state is non-finite; such prompts have zn = 0.
    """
    B, T, D = hidden.shape
    valid = torch.arange(T, device=hidden.device) < n[:, None]  # (B, T)
    pad = ~valid[..., None]  # (B, T, 1)
    # One copy in the compute dtype, then in-place passes: this runs for every layer of every batch.
    h = hidden.to(_dtype(hidden.device), copy=True).masked_fill_(pad, 0.0)
    # Shifting by the first token first (centring is shift-invariant) makes identical tokens
    # centre to exact zeros instead of round-off.
    h.sub_(h[:, :1].clone()).masked_fill_(pad, 0.0)
    h.sub_(h.sum(1, keepdim=True) / n.clamp(min=1)[:, None, None]).masked_fill_(pad, 0.0)
    norms = torch.linalg.vector_norm(h, dim=-1)  # (B, T): NaN or inf where a real state is not finite
    finite = torch.isfinite(norms).all(1)
    zero = valid & (norms <= ZERO_RTOL * norms.amax(1, keepdim=True))
    ok = finite & ~zero.any(1) & (n >= 1)
    h.div_(torch.where(valid & ~zero & finite[:, None], norms, 1.0)[..., None])
    if not bool(ok.all()):
        h.masked_fill_(~ok[:, None, None], 0.0)
    return h, valid, ok


def _normalise_rows(X: Tensor) -> tuple[Tensor, bool]:
    """(N, D) rows centred over the dataset and L2-normalised; False when a centred row is zero."""
    zn, _, ok = _centre_normalise(X[None], torch.tensor([X.shape[0]], device=X.device))
    return zn[0], bool(ok[0])


def _spectral_entropy(values: Tensor, alpha: float, size: int) -> Tensor:
    """Entropy (nats) of p = λ / Σλ over the last axis, λ the values above the rank tolerance."""
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    tol = values.amax(-1, keepdim=True) * size * torch.finfo(values.dtype).eps
    lam = torch.where(values > tol, values, 0.0)
    p = lam / lam.sum(-1, keepdim=True)
    if alpha == 1:
        return -torch.special.xlogy(p, p).sum(-1)
    return torch.log((p**alpha).sum(-1)) / (1 - alpha)  # p = 0 adds 0**alpha = 0


def _gram_eigenvalues(zn: Tensor) -> Tensor:
    """Eigenvalues of each Zn Znᵀ (B, T, T), via the smaller of Zn Znᵀ and Znᵀ Zn (same nonzero ones)."""
    T, D = zn.shape[-2:]
    gram = zn @ zn.mT if T <= D else zn.mT @ zn  # (B, min(T, D), min(T, D))
    return torch.linalg.eigvalsh(gram)


class _Prompts:
    """A batch of prompts, compacted and normalised once for every per-prompt metric."""

    def __init__(self, hidden: Tensor, mask: Tensor) -> None:
        h, self.n = _compact(hidden, mask)
        self.zn, self.valid, self.ok = _centre_normalise(h, self.n)  # (B, T, D), (B, T), (B,)

    def entropy(self, alpha: float) -> Tensor:
        """Raw matrix entropy (nats) per prompt (B,); NaN where T < 2 or not measurable."""
        ok = self.ok & (self.n >= 2)
        H = _spectral_entropy(_gram_eigenvalues(self.zn), alpha, size=max(self.zn.shape[-2:]))
        return torch.where(ok, H, math.nan)

    def normalised_entropy(self, alpha: float) -> Tensor:
        """entropy / min(log T_b, log D) per prompt (B,)."""
        H = self.entropy(alpha)
        return H / _max_entropy(self.n.cpu(), self.zn.shape[-1]).to(H.device, H.dtype)

    def curvature(self) -> Tensor:
        """Mean turning angle per prompt (B,); see `curvature`."""
        zn, valid = self.zn, self.valid
        u = zn[:, 1:] - zn[:, :-1]  # (B, T-1, D): v_k for k = 1..T-1
        vnorm = torch.linalg.vector_norm(u, dim=-1)  # (B, T-1)
        has_v = valid[:, 1:] & (vnorm > ZERO_RTOL)  # zn rows have unit norm: an absolute tolerance
        u.div_(torch.where(has_v, vnorm, 1.0)[..., None])  # unit differences
        pair = has_v[:, 1:] & has_v[:, :-1]  # (B, T-2)
        cos = (u[:, 1:] * u[:, :-1]).sum(-1)  # (B, T-2)
        sign = torch.where(cos < 0, -1.0, 1.0).to(u.dtype)[..., None]
        chord = torch.linalg.vector_norm(torch.addcmul(u[:, 1:], sign, u[:, :-1], value=-1), dim=-1)
        angle = torch.where(pair, 2 * torch.asin((chord / 2).clamp(max=1)), 0.0)  # (B, T-2)
        count = pair.sum(1)
        ok = self.ok & (self.n >= 3) & (count > 0)
        return torch.where(ok, angle.sum(1) / count.clamp(min=1), math.nan)


def _chunks(hidden: Tensor, mask: Tensor) -> Iterator[_Prompts]:
    """The batch as `_Prompts` over row chunks of at most CHUNK_ELEMENTS padded token-state elements."""
    B, T, D = hidden.shape
    limit = CHUNK_ELEMENTS.get(hidden.device.type, CHUNK_ELEMENTS["default"])
    step = max(1, limit // max(1, T * D))
    for i in range(0, B, step):
        yield _Prompts(hidden[i : i + step], mask[i : i + step])


def _max_entropy(n: Tensor | int, D: int) -> Tensor:
    """The normaliser min(log N, log D)."""
    n = torch.as_tensor(n, dtype=torch.float64)
    return torch.minimum(torch.log(n), torch.tensor(math.log(D), dtype=torch.float64))


# --------------------------------------------------------------------------------------------- entropy


def matrix_entropy(Z: Tensor, alpha: float = 1.0, normalized: bool = True) -> float:
    """Matrix-based α-entropy of the rows of Z (N, D), after centring and L2-normalising them.

    ``K = Zn Znᵀ / tr(·)``, ``p = λ(K)`` (λ > 0), ``H = -Σ p log p`` (α = 1) or
    ``log(Σ p^α) / (1 - α)``; with `normalized`, ``H / min(log N, log D)``. NaN when N < 2 or a
    centred row is zero. N centred orthonormal rows give log(N - 1); rank-1 data gives 0.
    """
    prompts = _Prompts(Z[None], torch.ones(1, Z.shape[0], device=Z.device))
    H = prompts.normalised_entropy(alpha) if normalized else prompts.entropy(alpha)
    return float(H[0])


def prompt_entropy(hidden: Tensor, mask: Tensor, alpha: float = 1.0) -> Tensor:
    """Normalised matrix entropy of each prompt's real tokens: (B, T, D), mask (B, T) -> (B,).

    Per prompt b with T_b real tokens: ``matrix_entropy(Z_b) / min(log T_b, log D)``. NaN where
    T_b < 2 or a centred token is zero. A 2-token prompt has entropy 0 (its two centred tokens are
    opposite: rank 1), where the paper's clamp gave 1. Batched: one padded Gram matrix per prompt,
    one batched eigensolver call.
    """
    return torch.cat([chunk.normalised_entropy(alpha) for chunk in _chunks(hidden, mask)])


def prompt_metrics(hidden: Tensor, mask: Tensor, alpha: float = 1.0) -> tuple[Tensor, Tensor]:
    """(prompt_entropy, curvature) of a batch, (B,) each, normalising the tokens once for both."""
    entropies, curvatures = [], []
    for chunk in _chunks(hidden, mask):
        entropies.append(chunk.normalised_entropy(alpha))
        curvatures.append(chunk.curvature())
    return torch.cat(entropies), torch.cat(curvatures)


def dataset_entropy(X: Tensor, alpha: float = 1.0) -> float:
    """Normalised matrix entropy of the pooled embeddings X (N, D), centred over the whole corpus."""
    return matrix_entropy(X, alpha=alpha, normalized=True)


# --------------------------------------------------------------------------------------------- geometry


def curvature(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean turning angle (radians) of each prompt's trajectory of normalised tokens: (B,).

    On the normalised tokens z_k: ``v_k = z_k - z_{k-1}``, angle_k =
    ``arccos(|v_{k+1}·v_k| / (||v_{k+1}|| ||v_k||))`` (in [0, π/2]); the prompt's value is the
    mean over k. A pair with a zero difference vector is left out of the mean; NaN where T < 3,
    no pair is left, or a centred token is zero. The angle is computed from the chord,
    ``2·asin(||u - s·w|| / 2)`` (u, w the unit differences, s the sign of their dot product),
    which equals the arccos form but stays accurate for nearly parallel differences.
    """
    return torch.cat([chunk.curvature() for chunk in _chunks(hidden, mask)])


def effective_rank(X: Tensor) -> float:
    """RankMe effective rank of X (N, D): σ = singular values of the centred X (not L2-normalised),
    ``p = σ / Σσ``, ``exp(-Σ p log p)``. Rank-1 data gives 1; NaN when X has no spread at all."""
    Xc = X.to(_dtype(X.device))
    Xc = Xc - Xc.mean(0)
    sigma = torch.linalg.svdvals(Xc)
    if not bool(sigma.amax() > 0):
        return math.nan
    return math.exp(float(_spectral_entropy(sigma, 1.0, size=max(X.shape))))


# --------------------------------------------------------------------------------------------- augmentations


def infonce(A: Tensor, B: Tensor, tau: float = 0.1) -> tuple[float, float]:
    """InfoNCE between two views A, B (N, D) of the same N samples: (loss, 1 - loss / log N).

    Each view's rows are centred and L2-normalised separately; ``loss`` = mean cross-entropy of the
    logits ``An Bnᵀ / τ`` with row i's target column i. ``1 - loss/log N`` is the paper's
    "mi-lower-bound" form (log N - loss bounds the mutual information, here divided by log N).
    """
    an, ok_a = _normalise_rows(A)
    bn, ok_b = _normalise_rows(B)
    if not (ok_a and ok_b):
        return math.nan, math.nan
    logits = an @ bn.T / tau  # (N, N)
    loss = float(F.cross_entropy(logits, torch.arange(A.shape[0], device=A.device)))
    return loss, 1 - loss / math.log(A.shape[0])


def _joint_entropy(K: Tensor, alpha: float) -> Tensor:
    """α-entropy of trace-normalised PSD matrices K (..., N, N)."""
    return _spectral_entropy(torch.linalg.eigvalsh(K), alpha, size=K.shape[-1])


def dime(A: Tensor, B: Tensor, alpha: float = 1.0, n_perms: int = 10, seed: int = 0) -> float:
    """DiME (difference of matrix entropies) between two views A, B (N, D), in nats.

    With rows centred and L2-normalised per view, ``K_A = An Anᵀ`` and ``K_B = Bn Bnᵀ`` (unit
    diagonal): ``mean_P H(K_A ∘ P K_B Pᵀ) - H(K_A ∘ K_B)`` over `n_perms` random permutations P
    (seeded), H the α-entropy of the trace-normalised Hadamard product. Positive when the views
    agree more than chance pairings do.
    """
    an, ok_a = _normalise_rows(A)
    bn, ok_b = _normalise_rows(B)
    if not (ok_a and ok_b):
        return math.nan
    N = A.shape[0]
    ka, kb = an @ an.T, bn @ bn.T  # (N, N) each
    gen = torch.Generator().manual_seed(seed)
    perms = torch.stack([torch.randperm(N, generator=gen) for _ in range(n_perms)]).to(A.device)  # (P, N)
    shuffled = kb[perms[:, :, None], perms[:, None, :]]  # (P, N, N): P K_B Pᵀ
    H = _joint_entropy(ka * torch.cat([kb[None], shuffled]), alpha)  # (P + 1,)
    return float(H[1:].mean() - H[0])


def lidar(X: Tensor, delta: float = 1e-4) -> float:
    """LiDAR entropy of N samples × V views (N, V, D): the entropy H (nats) of the LDA matrix's
    eigenvalues, not exp(H).

    Each view (X[:, v]) is centred and L2-normalised over the N samples. With class means
    ``μ_i = mean_v x_iv`` and ``μ = mean_i μ_i``: ``Σ_b = mean_i (μ_i - μ)(μ_i - μ)ᵀ``,
    ``Σ_w = mean_{i,v} (x_iv - μ_i)(x_iv - μ_i)ᵀ + δI`` and the LDA matrix
    ``Σ_w^{-1/2} Σ_b Σ_w^{-1/2}``; ``p = λ / Σλ``, ``H = -Σ p log p``. Computed as the spectrum
    of ``L⁻¹ Σ_b L⁻ᵀ`` (Σ_w = L Lᵀ), which is similar to the LDA matrix, through the N×N side.
    Views equal to their means (no within-class spread) leave Σ_w = δI: H is then the entropy
    of Σ_b's spectrum.
    """
    N, V, D = X.shape
    zn, _, ok = _centre_normalise(X.transpose(0, 1), torch.full((V,), N, device=X.device))  # (V, N, D)
    if not bool(ok.all()):
        return math.nan
    zn = zn.transpose(0, 1)  # (N, V, D)
    mu = zn.mean(1)  # (N, D) class means
    within = (zn - mu[:, None]).reshape(N * V, D)  # (N*V, D)
    sigma_w = within.T @ within / (N * V) + delta * torch.eye(D, dtype=zn.dtype, device=zn.device)
    L = torch.linalg.cholesky(sigma_w)
    Y = torch.linalg.solve_triangular(L, (mu - mu.mean(0)).T, upper=False)  # (D, N): L⁻¹ (μ_i - μ)
    gram = Y.T @ Y / N if N <= D else Y @ Y.T / N  # same nonzero spectrum as L⁻¹ Σ_b L⁻ᵀ
    return float(_spectral_entropy(torch.linalg.eigvalsh(gram), 1.0, size=max(N, D)))
