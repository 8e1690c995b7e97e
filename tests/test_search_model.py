"""The search's model (layertime/search/model.py): known answers on small synthetic landscapes."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import integrate, stats
from search_grids import PYTHIA_LIKE_STEPS, landscape, smooth_grid

from layertime.search.model import (
    ArmModel,
    ArmObservations,
    arm_observations,
    expected_improvement,
    sample_joint,
)


def test_the_posterior_recovers_a_smooth_function() -> None:
    grid = smooth_grid(PYTHIA_LIKE_STEPS, blocks=8, tasks=1, roughness=0.0)
    features = grid.space.features(use_metrics=False)
    truth = landscape(PYTHIA_LIKE_STEPS, 8).reshape(-1)
    seen = np.random.default_rng(0).choice(grid.space.n_arms, 40, replace=False)
    model = ArmModel(features, ArmObservations(np.sort(seen), truth[np.sort(seen)], np.zeros(40)), seed=0)
    others = np.setdiff1d(np.arange(grid.space.n_arms), seen)
    mean, sd = model.predict(others)
    error = mean - truth[others]
    assert np.sqrt(np.mean(error**2)) < 0.5  # points, on a landscape spanning 25
    assert np.mean(np.abs(error) <= 2 * sd) >= 0.9  # and it knows how far it can be off
    assert np.allclose(model.predict(np.sort(seen))[0], truth[np.sort(seen)], atol=0.05)


def test_arm_observations_offsets_and_finite_population_variance() -> None:
    # 3 complete arms (tasks offset by -1, 0, +1 with residuals), 1 arm with 2 of its 3 tasks scored.
    scores = np.array(
        [
            [9.0, 10.0, 11.5],
            [19.0, 20.5, 21.0],
            [28.5, 30.0, 31.0],
            [np.nan, 40.0, 41.0],
            [np.nan, np.nan, np.nan],
        ]
    )
    obs = arm_observations(scores)
    assert obs.arms.tolist() == [0, 1, 2, 3]
    assert (
        obs.values[:3].tolist() == pytest.approx(scores[:3].mean(axis=1).tolist())
        and obs.variances[:3].sum() == 0
    )
    # By hand: residuals from each complete arm's mean, task offsets δ = their mean over arms, s² pooled
    # with T - 1 = 2 degrees of freedom per arm; the partial arm is its offset-corrected mean.
    residual = scores[:3] - scores[:3].mean(axis=1, keepdims=True)
    delta = residual.mean(axis=0)
    s2 = ((residual - delta) ** 2).sum() / (3 * 2)
    assert obs.values[3] == pytest.approx(np.mean([40.0 - delta[1], 41.0 - delta[2]]))
    assert obs.variances[3] == pytest.approx(s2 * (3 - 2) / (3 * 2))


def test_partial_arms_wait_for_two_complete_ones() -> None:
    scores = np.array([[1.0, 2.0], [np.nan, 3.0]])
    obs = arm_observations(scores)
    assert obs.arms.tolist() == [0]


def test_expected_improvement_matches_its_integral() -> None:
    mean, sd, best = np.array([1.0, 0.0, 2.0]), np.array([0.5, 2.0, 0.0]), 1.2
    ei = expected_improvement(mean, sd, best)
    for m, s, value in zip(mean[:2], sd[:2], ei[:2], strict=True):
        integral, _ = integrate.quad(
            lambda f, m=m, s=s: (f - best) * stats.norm.pdf(f, m, s), best, m + 12 * s
        )
        assert value == pytest.approx(integral, rel=1e-6)
    assert ei[2] == pytest.approx(0.8)  # a known value: its improvement, exactly


def test_joint_samples_have_the_asked_mean_and_covariance_even_when_singular() -> None:
    a = np.array([[1.0, 0.5], [0.5, 2.0], [1.5, 2.5]])
    cov = a @ a.T  # rank 2 of 3: Cholesky needs the jitter, or the eigen-decomposition
    mean = np.array([1.0, -2.0, 0.5])
    draws = sample_joint(mean, cov, 200_000, np.random.default_rng(0))
    assert np.allclose(draws.mean(axis=0), mean, atol=0.03)
    assert np.allclose(np.cov(draws.T), cov, rtol=0.03, atol=0.03)


def test_the_roughness_weights_follow_the_landscape() -> None:
    # The same arms of a smooth and of a rough landscape: the rough one moves the mixture's weight to
    # larger roughness, and its unevaluated arms get wider predictions.
    steps = PYTHIA_LIKE_STEPS
    smooth = smooth_grid(steps, blocks=8, tasks=1, roughness=0.0, seed=0)
    rough = smooth_grid(steps, blocks=8, tasks=1, roughness=2.0, seed=0)
    seen = np.sort(np.random.default_rng(1).choice(smooth.space.n_arms, 60, replace=False))
    others = np.setdiff1d(np.arange(smooth.space.n_arms), seen)
    fits = {}
    for name, grid in (("smooth", smooth), ("rough", rough)):
        features = grid.space.features(use_metrics=False)
        fits[name] = ArmModel(features, ArmObservations(seen, grid.values[seen], np.zeros(len(seen))), seed=0)
    roughness = np.arange(len(fits["smooth"].weights))  # index into NUGGETS, ascending
    assert fits["rough"].weights @ roughness > fits["smooth"].weights @ roughness + 1
    assert np.median(fits["rough"].predict(others)[1]) > 2 * np.median(fits["smooth"].predict(others)[1])


def test_a_fantasy_pins_its_arm_and_keeps_the_hyperparameters() -> None:
    grid = smooth_grid(PYTHIA_LIKE_STEPS, blocks=8, tasks=1, roughness=0.3)
    features = grid.space.features(use_metrics=False)
    seen = np.arange(0, grid.space.n_arms, 7)
    model = ArmModel(features, ArmObservations(seen, grid.values[seen], np.zeros(len(seen))), seed=0)
    believed = model.with_fantasy(100, 55.0)
    mean, sd = believed.predict(np.array([100]))
    assert mean[0] == pytest.approx(55.0, abs=1e-3) and sd[0] < 1e-2
    assert [str(k) for k in believed.kernels] == [str(k) for k in model.kernels]
    assert np.array_equal(believed.weights, model.weights)
