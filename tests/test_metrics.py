"""Representation metrics: analytic cases derived here, an independent numpy reference, padding and batching."""

import math

import numpy as np
import pytest
import torch

from layertime import metrics

RTOL = 1e-6  # float64 math against float64 numpy


# ------------------------------------------------------------------------------------ numpy reference
# Written from docs/design.md §5 alone, the literal way (always the N×N Gram, arccos, Σ_w^{-1/2} by eigh),
# sharing no code with layertime.metrics.


def np_normalise(Z: np.ndarray) -> np.ndarray:
    c = Z - Z.mean(0)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def np_entropy(lam: np.ndarray, alpha: float = 1.0) -> float:
    lam = lam[lam > lam.max() * 1e-12]
    p = lam / lam.sum()
    return float(-(p * np.log(p)).sum()) if alpha == 1 else float(np.log((p**alpha).sum()) / (1 - alpha))


def np_matrix_entropy(Z: np.ndarray, alpha: float = 1.0, normalized: bool = True) -> float:
    Zn = np_normalise(Z)
    K = Zn @ Zn.T
    H = np_entropy(np.linalg.eigvalsh(K / np.trace(K)), alpha)
    return H / min(math.log(Z.shape[0]), math.log(Z.shape[1])) if normalized else H


def np_curvature(Z: np.ndarray) -> float:
    Zn = np_normalise(Z)
    v = Zn[1:] - Zn[:-1]
    angles = []
    for a, b in zip(v[1:], v[:-1], strict=True):
        if np.linalg.norm(a) > 0 and np.linalg.norm(b) > 0:
            cos = abs(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b))
            angles.append(math.acos(min(cos, 1.0)))
    return float(np.mean(angles))


def np_effective_rank(X: np.ndarray) -> float:
    s = np.linalg.svd(X - X.mean(0), compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return math.exp(-(p * np.log(p)).sum())


def np_infonce(A: np.ndarray, B: np.ndarray, tau: float = 0.1) -> float:
    logits = np_normalise(A) @ np_normalise(B).T / tau
    m = logits.max(1, keepdims=True)
    logsumexp = (m + np.log(np.exp(logits - m).sum(1, keepdims=True)))[:, 0]
    return float((logsumexp - np.diag(logits)).mean())


def np_dime(A: np.ndarray, B: np.ndarray, perms: list[np.ndarray], alpha: float = 1.0) -> float:
    An, Bn = np_normalise(A), np_normalise(B)
    ka, kb = An @ An.T, Bn @ Bn.T

    def H(K):
        return np_entropy(np.linalg.eigvalsh(K / np.trace(K)), alpha)

    return float(np.mean([H(ka * kb[np.ix_(p, p)]) for p in perms]) - H(ka * kb))


def np_lidar(X: np.ndarray, delta: float = 1e-4) -> float:
    N, V, D = X.shape
    Xn = np.stack([np_normalise(X[:, v]) for v in range(V)], axis=1)
    mu = Xn.mean(1)
    sb = sum(np.outer(m - mu.mean(0), m - mu.mean(0)) for m in mu) / N
    sw = sum(np.outer(x - mu[i], x - mu[i]) for i in range(N) for x in Xn[i]) / (N * V) + delta * np.eye(D)
    w, U = np.linalg.eigh(sw)
    inv_sqrt = U @ np.diag(w**-0.5) @ U.T
    return np_entropy(np.linalg.eigvalsh(inv_sqrt @ sb @ inv_sqrt))


def torch_perms(N: int, n_perms: int, seed: int) -> list[np.ndarray]:
    """The permutations `dime` documents: n_perms draws of randperm(N) from a generator seeded with `seed`."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randperm(N, generator=gen).numpy() for _ in range(n_perms)]


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x))


def simplex(N: int, D: int, seed: int = 0) -> np.ndarray:
    """N orthonormal rows in D ≥ N dims, scaled and shifted: centred, they are a regular simplex."""
    Q, _ = np.linalg.qr(rng(seed).normal(size=(D, N)))  # (D, N), orthonormal columns
    return 3.0 * Q.T + rng(seed + 1).normal(size=D)  # centring and row scaling do not matter


# ------------------------------------------------------------------------------------ analytic cases


def test_rank_one_data_has_zero_entropy_and_effective_rank_one():
    # Rows a_i·v + b: centred, every row is a multiple of v, so K = Zn Znᵀ has rank 1: p = (1), H = 0.
    a, v, b = rng().normal(size=(40, 1)), rng(1).normal(size=(1, 16)), rng(2).normal(size=(1, 16))
    Z = t(a * v + b)
    assert metrics.matrix_entropy(Z, normalized=False) == pytest.approx(0.0, abs=1e-10)
    assert metrics.dataset_entropy(Z) == pytest.approx(0.0, abs=1e-10)
    assert metrics.matrix_entropy(Z, alpha=2.0) == pytest.approx(0.0, abs=1e-10)
    # One nonzero singular value: p = (1), exp(0) = 1.
    assert metrics.effective_rank(Z) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("N,D", [(8, 8), (6, 40)])
def test_centred_orthonormal_rows_have_entropy_log_n_minus_one(N, D):
    # Centred orthonormal rows e_i - 1/N·1 have pairwise cosines -1/(N-1): K = N/(N-1)·(I - 11ᵀ/N),
    # eigenvalues N/(N-1) (N-1 times) and 0, so p is uniform over N-1 values and H = log(N-1).
    Z = t(simplex(N, D))
    assert metrics.matrix_entropy(Z, normalized=False) == pytest.approx(math.log(N - 1), rel=1e-12)
    assert metrics.matrix_entropy(Z) == pytest.approx(
        math.log(N - 1) / min(math.log(N), math.log(D)), rel=1e-12
    )
    # Rényi entropies of a uniform distribution are all log(N-1).
    for alpha in (0.5, 2.0, 3.0):
        assert metrics.matrix_entropy(Z, alpha, normalized=False) == pytest.approx(math.log(N - 1), rel=1e-12)


def test_two_token_prompt_has_zero_entropy_where_the_paper_clamp_gave_one():
    # Two centred tokens are z and -z: K = [[1, -1], [-1, 1]] / 2 has eigenvalues (1, 0), H = 0.
    h = torch.randn(1, 2, 16, dtype=torch.float64)
    assert metrics.prompt_entropy(h, torch.ones(1, 2)).item() == pytest.approx(0.0, abs=1e-12)
    # The paper clamped K's entries at 0: [[1, 0], [0, 1]] / 2, eigenvalues (1/2, 1/2), H = log 2 -> 1.
    clamped = np.clip(np.array([[1.0, -1.0], [-1.0, 1.0]]) / 2, 0, None)
    assert np_entropy(np.linalg.eigvalsh(clamped)) / math.log(2) == pytest.approx(1.0)


def test_tokens_turning_by_a_constant_angle_have_that_curvature():
    # T points equally spaced on a circle (a full turn): their mean is 0 and their norms equal, so
    # centring and normalising keep them; consecutive chords v_k turn by the step angle φ = 2π/T.
    for T in (5, 12, 30):
        phi = 2 * math.pi / T
        k = np.arange(T)
        circle = np.stack([np.cos(k * phi), np.sin(k * phi)], 1)  # (T, 2)
        Q, _ = np.linalg.qr(rng(T).normal(size=(24, 2)))  # embed the plane in 24 dims
        Z = 5.0 * circle @ Q.T + rng(T + 1).normal(size=24)
        expected = phi if phi <= math.pi / 2 else math.pi - phi  # |cos|: angles fold into [0, π/2]
        got = metrics.curvature(t(Z)[None], torch.ones(1, T)).item()
        assert got == pytest.approx(expected, rel=1e-9)


def test_identical_views_give_the_closed_form_infonce():
    # A = B = centred orthonormal rows: cos(i, i) = 1, cos(i, j) = -1/(N-1). Row i's loss is
    # -1/τ + log(e^{1/τ} + (N-1) e^{-1/((N-1)τ)}) = log(1 + (N-1) exp(-N / ((N-1) τ))), for every i.
    N, tau = 10, 0.1
    Z = t(simplex(N, 32))
    loss, bound = metrics.infonce(Z, Z, tau)
    expected = math.log(1 + (N - 1) * math.exp(-N / ((N - 1) * tau)))
    assert loss == pytest.approx(expected, rel=1e-10)
    assert bound == pytest.approx(1 - expected / math.log(N), rel=1e-12)


def test_views_equal_to_their_means_leave_lidar_the_entropy_of_the_between_class_spectrum():
    # All V views of sample i identical: the within-class scatter is 0, Σ_w = δI, and the LDA matrix
    # is Σ_b / δ — same p. For simplex rows (already centred after normalising) Σ_b has N-1 equal
    # eigenvalues: H = log(N-1), whatever δ.
    N, V = 9, 4
    X = np.repeat(simplex(N, 20)[:, None], V, axis=1)  # (N, V, D)
    for delta in (1e-4, 1.0):
        assert metrics.lidar(t(X), delta) == pytest.approx(math.log(N - 1), rel=1e-9)


def test_alpha_two_entropy_is_minus_log_frobenius_norm_squared():
    # Σ p² = tr(K²) = ||K||_F² for symmetric K with tr K = 1: no eigenvalues needed.
    Z = rng(3).normal(size=(12, 7))
    Zn = np_normalise(Z)
    K = Zn @ Zn.T / 12
    assert metrics.matrix_entropy(t(Z), alpha=2.0, normalized=False) == pytest.approx(
        -math.log((K**2).sum()), rel=1e-12
    )


# ------------------------------------------------------------------------------------ against numpy


@pytest.mark.parametrize("N,D", [(30, 12), (12, 30)])
@pytest.mark.parametrize("alpha", [1.0, 2.0, 0.5])
def test_matrix_entropy_matches_numpy(N, D, alpha):
    Z = rng(N + D).normal(size=(N, D)) * rng(1).uniform(0.1, 10, size=D)  # anisotropic
    for normalized in (True, False):
        assert metrics.matrix_entropy(t(Z), alpha, normalized) == pytest.approx(
            np_matrix_entropy(Z, alpha, normalized), rel=RTOL
        )


def test_float32_input_is_computed_in_float64():
    Z = rng(4).normal(size=(20, 10)).astype(np.float32)
    assert metrics.matrix_entropy(t(Z)) == pytest.approx(np_matrix_entropy(Z.astype(np.float64)), rel=RTOL)
    h = t(Z)[None]
    assert metrics.curvature(h, torch.ones(1, 20)).item() == pytest.approx(
        np_curvature(Z.astype(np.float64)), rel=RTOL
    )


def test_prompt_metrics_match_numpy_per_prompt():
    lengths = [3, 9, 17, 40, 5]
    B, T, D = len(lengths), max(lengths), 24
    h = rng(5).normal(size=(B, T, D)) + 2.0
    mask = (np.arange(T)[None] < np.array(lengths)[:, None]).astype(np.int64)
    ent = metrics.prompt_entropy(t(h), t(mask))
    curv = metrics.curvature(t(h), t(mask))
    for b, n in enumerate(lengths):
        assert ent[b].item() == pytest.approx(np_matrix_entropy(h[b, :n]), rel=RTOL)
        assert curv[b].item() == pytest.approx(np_curvature(h[b, :n]), rel=RTOL)


def test_dataset_metrics_match_numpy():
    X = rng(6).normal(size=(50, 20)) @ rng(7).normal(size=(20, 20))
    assert metrics.dataset_entropy(t(X)) == pytest.approx(np_matrix_entropy(X), rel=RTOL)
    assert metrics.effective_rank(t(X)) == pytest.approx(np_effective_rank(X), rel=RTOL)


def test_view_metrics_match_numpy():
    A = rng(8).normal(size=(40, 16))
    B = A + 0.5 * rng(9).normal(size=(40, 16))
    loss, bound = metrics.infonce(t(A), t(B), tau=0.1)
    assert loss == pytest.approx(np_infonce(A, B), rel=RTOL)
    assert bound == pytest.approx(1 - np_infonce(A, B) / math.log(40), rel=RTOL)
    for alpha in (1.0, 2.0):
        expected = np_dime(A, B, torch_perms(40, 10, seed=3), alpha)
        assert metrics.dime(t(A), t(B), alpha=alpha, n_perms=10, seed=3) == pytest.approx(expected, rel=RTOL)


@pytest.mark.parametrize("N,V,D", [(30, 4, 12), (10, 16, 24)])
def test_lidar_matches_numpy(N, V, D):
    X = rng(N).normal(size=(N, 1, D)) + 0.3 * rng(V).normal(size=(N, V, D))
    assert metrics.lidar(t(X)) == pytest.approx(np_lidar(X), rel=RTOL)
    assert metrics.lidar(t(X), delta=1e-2) == pytest.approx(np_lidar(X, 1e-2), rel=RTOL)


def test_dime_is_seeded_and_rewards_agreeing_views():
    A = t(rng(10).normal(size=(30, 8)))
    noise = t(rng(11).normal(size=(30, 8)))
    assert metrics.dime(A, A + 0.1 * noise, seed=1) == metrics.dime(A, A + 0.1 * noise, seed=1)
    assert metrics.dime(A, A + 0.1 * noise) > metrics.dime(A, noise)


# ------------------------------------------------------------------------------------ batching, padding, skipping


def _ragged(lengths: list[int], D: int = 16, seed: int = 12) -> list[torch.Tensor]:
    return [t(rng(seed + i).normal(size=(n, D)) * 3 + 1) for i, n in enumerate(lengths)]


def _pad(prompts: list[torch.Tensor], left: bool, fill: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    T, D = max(p.shape[0] for p in prompts), prompts[0].shape[1]
    h = torch.full((len(prompts), T, D), fill, dtype=torch.float64)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        span = slice(T - len(p), T) if left else slice(0, len(p))
        h[i, span], mask[i, span] = p, 1
    return h, mask


def test_batched_equals_one_prompt_at_a_time():
    prompts = _ragged([7, 1, 12, 2, 30, 3])
    h, mask = _pad(prompts, left=False)
    batched = metrics.prompt_entropy(h, mask), metrics.curvature(h, mask)
    for got, want in zip(
        metrics.prompt_metrics(h, mask), batched, strict=True
    ):  # one normalisation, same values
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    for i, p in enumerate(prompts):
        one = torch.ones(1, len(p))
        alone = metrics.prompt_entropy(p[None], one), metrics.curvature(p[None], one)
        for got, want in zip(batched, alone, strict=True):
            torch.testing.assert_close(got[i : i + 1], want, rtol=1e-12, atol=1e-12, equal_nan=True)
        if len(p) >= 2:
            assert batched[0][i].item() == pytest.approx(metrics.matrix_entropy(p), rel=1e-12)


def test_chunking_does_not_change_values(monkeypatch):
    prompts = _ragged([7, 1, 12, 2, 30, 3, 9])
    h, mask = _pad(prompts, left=False)
    whole = metrics.prompt_metrics(h, mask)
    monkeypatch.setitem(metrics.CHUNK_ELEMENTS, "cpu", 1)  # one prompt per chunk
    for got, want in zip(metrics.prompt_metrics(h, mask), whole, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, equal_nan=True)
    monkeypatch.setitem(metrics.CHUNK_ELEMENTS, "cpu", 3 * 30 * 16)  # three prompts per chunk
    torch.testing.assert_close(metrics.curvature(h, mask), whole[1], rtol=1e-12, atol=1e-12, equal_nan=True)


def test_left_and_right_padding_agree_and_padding_content_is_ignored():
    prompts = _ragged([5, 11, 2, 8])
    right = _pad(prompts, left=False)
    left = _pad(prompts, left=True, fill=math.nan)  # NaN in the padding must not leak
    huge = _pad(prompts, left=False, fill=1e30)
    for fn in (metrics.prompt_entropy, metrics.curvature):
        want = fn(*right)
        torch.testing.assert_close(fn(*left), want, rtol=1e-12, atol=1e-12, equal_nan=True)
        torch.testing.assert_close(fn(*huge), want, rtol=1e-12, atol=1e-12, equal_nan=True)
        assert torch.isfinite(want[[0, 1, 3]]).all()


def test_scattered_padding_keeps_token_order():
    p = _ragged([6])[0]
    h = torch.zeros(1, 9, 16, dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 0, 1, 1, 0, 1, 1]])
    h[0, mask[0].bool()] = p
    assert metrics.curvature(h, mask).item() == pytest.approx(np_curvature(p.numpy()), rel=1e-12)


def test_too_short_and_degenerate_prompts_are_nan():
    D = 8
    x = torch.randn(D, dtype=torch.float64)
    a, b = torch.randn(D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
    prompts = [
        x[None],  # T = 1: no entropy, no curvature
        torch.stack([a, b]),  # T = 2: entropy 0, no curvature
        x.repeat(5, 1),  # identical tokens: every centred token is zero
        torch.stack([a, b, (a + b) / 2]),  # the middle token equals the mean: a zero centred token
        torch.stack([a, b, x]),  # fine
        x[None, :][:0],  # T = 0: all padding
    ]
    h, mask = _pad(prompts, left=False)
    ent, curv = metrics.prompt_entropy(h, mask), metrics.curvature(h, mask)
    assert torch.isnan(ent[[0, 2, 3, 5]]).all() and ent[1].item() == pytest.approx(0.0, abs=1e-12)
    assert torch.isnan(curv[[0, 1, 2, 3, 5]]).all() and torch.isfinite(curv[4]) and torch.isfinite(ent[4])
    assert math.isnan(metrics.matrix_entropy(x[None])) and math.isnan(metrics.dataset_entropy(x.repeat(4, 1)))
    assert math.isnan(metrics.effective_rank(x.repeat(4, 1)))
    nonfinite = h.clone()
    nonfinite[4, 1, 0] = math.inf  # a real token: that prompt cannot be measured, the others can
    again = metrics.prompt_entropy(nonfinite, mask)
    assert torch.isnan(again[4]) and again[1] == ent[1]


def test_a_zero_difference_pair_is_left_out_of_the_mean():
    # Tokens a, b, b, c, d: v_2 = b - b = 0, so the pairs (v_1, v_2) and (v_2, v_3) are left out and
    # the prompt's curvature is the angle of the one pair left, (v_3, v_4).
    a, b, c, d = (torch.randn(12, dtype=torch.float64) for _ in range(4))
    Z = torch.stack([a, b, b, c, d])
    Zn = np_normalise(Z.numpy())
    v3, v4 = Zn[3] - Zn[2], Zn[4] - Zn[3]
    expected = math.acos(abs(v3 @ v4) / (np.linalg.norm(v3) * np.linalg.norm(v4)))
    assert metrics.curvature(Z[None], torch.ones(1, 5)).item() == pytest.approx(expected, rel=1e-9)
    # Only zero differences: nothing left to average.
    assert math.isnan(metrics.curvature(torch.stack([a, a, b, b])[None], torch.ones(1, 4)).item())
