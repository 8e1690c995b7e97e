"""The search's model of an arm's value: Gaussian processes over (log step, depth, metrics) (scikit-learn).

**Observations.** A scoring gives one task's score of one arm; an arm's value is the rule-(a) mean of
its T tasks. A complete arm (all T tasks scored) is observed *exactly*. A partial arm (k < T tasks:
records of an interrupted batch, or of a grid run on fewer tasks) is an estimate

    f̂ = mean_{t in S} (y_t - δ_t),      var(f̂) = s² (T - k) / (T k)

where δ_t is task t's offset from the arm mean (the mean over complete arms of y_t - f) and s² the
pooled variance of the residuals y_t - δ_t - f over complete arms (T - 1 degrees of freedom each): the
variance of a mean of k of T values drawn without replacement. Partial arms are used only once two
arms are complete (before that, δ and s² are unknown).

**The kernel** (`sklearn.gaussian_process.GaussianProcessRegressor`, on values standardised by the
observations' mean and standard deviation):

    k(x, x') = c · Matérn_{5/2}(x, x'; ARD) + c_s · Matérn_{5/2}(step, depth; short)
               + ρ · [same checkpoint] + ρ · [same arm]

c, c_s and the length scales are fitted by maximum marginal likelihood (sklearn's L-BFGS); each
partial arm's var(f̂) is added to its diagonal (`alpha`). Arm values are deterministic, yet a smooth
kernel does not follow them: a task's test set is small, so neighbouring checkpoints and layers differ
by a point at random. That roughness is part of the value, not observation noise: the two indicator
terms (`base_kernel`) make it a latent random offset per checkpoint and per arm, so an evaluated arm is
known exactly (the posterior interpolates it) while an unevaluated arm's predictive includes 2ρ.

**Why a mixture over ρ.** With a handful of arms evaluated, far apart, the marginal likelihood cannot
tell a smooth landscape (ρ → 0) from a rough one: on the trajectory world's first six arms it changed
by 0.1 nats between a roughness of 1e-6 and 1e-2 (then a white term), while P(best within ε) fell
from 0.97 to 0.17. Maximum likelihood picks ρ → 0, is then sure of every arm near an evaluated one,
and the stop rule fires with a regret of 2 points (benchmarks/search.py). So ρ is integrated out
rather than fitted: one GP per ρ in `NUGGETS` (a log grid, uniform prior), c and the length scales
fitted for each, the posterior a mixture weighted by each fit's marginal likelihood (Bayesian model
averaging over ρ, the others at their profile maximum). Once close arms are evaluated the likelihood does tell, and the weight moves
to the ρ the landscape has (tests/test_search_model.py).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm
from sklearn.exceptions import ConvergenceWarning
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import RBF, ConstantKernel, Kernel, Matern
from threadpoolctl import threadpool_limits

JITTER = 1e-8  # standardised units, on every training point: keeps Cholesky factors positive definite
LENGTH_SCALE_BOUNDS = (0.03, 30.0)  # features lie in [0, 1]: from a few arms apart to "irrelevant"
RESTARTS = 0  # per roughness: the NUGGETS fits start the optimiser from as many points (halves the fit time)
# The roughness ρ (variance of the standardised values): a log grid from 1% to 32% of their standard
# deviation, the prior over ρ uniform on it.
NUGGETS = (1e-4, 1e-3, 4e-3, 1.6e-2, 1e-1)
SHORT_BOUNDS = (0.01, 0.3)
DELTA_SCALE = 1e-5  # a length scale far below any two checkpoints' (≥ 5e-4) or blocks' (≥ 1/L) distance
IRRELEVANT = 1e6  # a length scale that makes a feature irrelevant to a term


@dataclass(frozen=True)
class ArmObservations:
    """Arm-level observations: arm indices, value estimates (points) and their variances (0: exact)."""

    arms: np.ndarray
    values: np.ndarray
    variances: np.ndarray


def arm_observations(scores: np.ndarray) -> ArmObservations:
    """Arm-level observations from task scores `scores` (arms × tasks, points; NaN where not scored).

    Complete arms are exact; partial arms are offset-corrected means with the variance of the module
    docstring, used once at least two arms are complete.
    """
    seen = ~np.isnan(scores)
    complete = seen.all(axis=1)
    arms = np.flatnonzero(complete)
    values = scores[complete].mean(axis=1)
    variances = np.zeros(len(arms))
    partial = np.flatnonzero(seen.any(axis=1) & ~complete)
    n_tasks = scores.shape[1]
    if len(arms) >= 2 and len(partial) and n_tasks > 1:
        residual = scores[complete] - values[:, None]  # (complete, tasks)
        offset = residual.mean(axis=0)  # δ_t
        s2 = float(((residual - offset) ** 2).sum() / (len(arms) * (n_tasks - 1)))
        k = seen[partial].sum(axis=1)
        estimate = np.nanmean(scores[partial] - offset, axis=1)
        arms = np.concatenate([arms, partial])
        values = np.concatenate([values, estimate])
        variances = np.concatenate([variances, s2 * (n_tasks - k) / (n_tasks * k)])
    order = np.argsort(arms, kind="stable")
    return ArmObservations(arms[order], values[order], variances[order])


def base_kernel(d: int, roughness: float) -> Kernel:
    """c · Matérn_{5/2}(ARD) + c_s · Matérn_{5/2}(step, depth; short) + ρ · [same checkpoint] + ρ · [same arm]
    on `d` features (the first the log-scaled step, the second the depth), ρ = `roughness` fixed.

    The two indicator terms are RBFs with length scales far below the distance between any two
    checkpoints (on the step) or blocks (on the depth), so they are exactly 1 on the same checkpoint
    (resp. arm) and 0 otherwise, *also between a training and a test point*: unlike sklearn's
    WhiteKernel (zero off the training matrix), an evaluated arm's own rough part is then known and the
    posterior interpolates it exactly, while an unevaluated arm's predictive includes ρ twice."""
    checkpoint = RBF(length_scale=np.r_[DELTA_SCALE, np.full(d - 1, IRRELEVANT)], length_scale_bounds="fixed")
    arm = RBF(
        length_scale=np.r_[DELTA_SCALE, DELTA_SCALE, np.full(d - 2, IRRELEVANT)], length_scale_bounds="fixed"
    )
    # A short-range term over (step, depth) only (the metrics' length scales pinned huge): a stationary
    # kernel with one length scale per feature cannot follow both a sharp rise early in training and
    # the plateau after it, and without this term it smooths the rise over the plateau.
    short_bounds = np.array([SHORT_BOUNDS, SHORT_BOUNDS] + [(IRRELEVANT / 10, IRRELEVANT)] * (d - 2))
    return (
        ConstantKernel(1.0, (1e-2, 1e2))
        * Matern(length_scale=np.full(d, 0.3), length_scale_bounds=LENGTH_SCALE_BOUNDS, nu=2.5)
        + ConstantKernel(0.1, (1e-3, 1e2))
        * Matern(
            length_scale=np.r_[0.05, 0.05, np.full(d - 2, IRRELEVANT)],
            length_scale_bounds=short_bounds,
            nu=2.5,
        )
        + ConstantKernel(roughness, "fixed") * checkpoint
        + ConstantKernel(roughness, "fixed") * arm
    )


class ArmModel:
    """GPs over arm features, one per roughness ρ in `NUGGETS`, mixed by marginal likelihood; points."""

    def __init__(
        self,
        features: np.ndarray,
        obs: ArmObservations,
        seed: int,
        fitted: tuple[list, np.ndarray] | None = None,
        standardise: tuple[float, float] | None = None,
    ) -> None:
        """Fit on the observed arms' `features` rows. With `fitted` (kernels, weights) and `standardise`
        (center, scale) given, those are kept as they are (to condition on fantasies within a batch)."""
        self.features = features
        self.obs = obs
        self.center, self.scale = standardise or (float(obs.values.mean()), float(obs.values.std()) or 1.0)
        y = (obs.values - self.center) / self.scale
        alpha = obs.variances / self.scale**2 + JITTER
        d = features.shape[1]
        self.gps: list[GaussianProcessRegressor] = []
        kernels = fitted[0] if fitted else [None] * len(NUGGETS)
        # One BLAS thread: these matrices are small (arms observed), and threads only contend (5x slower
        # on a loaded 2-core machine, benchmarks/search.py).
        with warnings.catch_warnings(), threadpool_limits(1):
            # A length scale at its bound is an answer (the feature is irrelevant), not a failure.
            warnings.simplefilter("ignore", ConvergenceWarning)
            for k, (nugget, kernel) in enumerate(zip(NUGGETS, kernels, strict=True)):
                gp = GaussianProcessRegressor(
                    kernel=kernel or base_kernel(d, nugget),
                    alpha=alpha,
                    optimizer=None if kernel is not None else "fmin_l_bfgs_b",
                    n_restarts_optimizer=0 if kernel is not None else RESTARTS,
                    normalize_y=False,
                    random_state=seed + k,
                )
                self.gps.append(gp.fit(features[obs.arms], y))
        if fitted:
            self.weights = fitted[1]
        else:
            lml = np.array([gp.log_marginal_likelihood_value_ for gp in self.gps])
            self.weights = np.exp(lml - lml.max()) / np.exp(lml - lml.max()).sum()

    @property
    def kernels(self) -> list:
        """The fitted kernels (`kernel_`), one per roughness."""
        return [gp.kernel_ for gp in self.gps]

    def _components(self, arms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(components × arms) means and standard deviations, in points."""
        with threadpool_limits(1):
            out = [gp.predict(self.features[arms], return_std=True) for gp in self.gps]
        means = np.array([self.center + self.scale * m for m, _ in out])
        sds = np.array([self.scale * sd for _, sd in out])
        return means, sds

    def predict(self, arms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The mixture's predictive mean and standard deviation (points) of `arms`, roughness included."""
        means, sds = self._components(arms)
        mean = self.weights @ means
        variance = self.weights @ (sds**2 + means**2) - mean**2
        return mean, np.sqrt(np.maximum(variance, 0.0))

    def expected_improvement(self, arms: np.ndarray, best: float) -> np.ndarray:
        """E[max(f_a - best, 0)] under the mixture: the weighted sum of each GP's closed form."""
        means, sds = self._components(arms)
        return self.weights @ np.array(
            [expected_improvement(m, sd, best) for m, sd in zip(means, sds, strict=True)]
        )

    def sample(self, arms: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        """`n` joint draws (n × arms) from the mixture: each GP gets its weight's share of the draws
        (largest remainders), each share drawn from that GP's joint predictive, roughness included."""
        counts = np.floor(self.weights * n).astype(int)
        remainders = self.weights * n - counts
        counts[np.argsort(-remainders, kind="stable")[: n - counts.sum()]] += 1
        draws = []
        for gp, count in zip(self.gps, counts, strict=True):
            if count:
                with threadpool_limits(1):
                    mean, cov = gp.predict(self.features[arms], return_cov=True)
                draws.append(sample_joint(self.center + self.scale * mean, self.scale**2 * cov, count, rng))
        return np.concatenate(draws)

    def with_fantasy(self, arm: int, value: float) -> ArmModel:
        """This model conditioned on `arm` having been observed exactly at `value`, hyperparameters and
        weights unchanged (the "kriging believer" of a batch: later picks see the earlier ones as done)."""
        keep = self.obs.arms != arm
        obs = ArmObservations(
            np.append(self.obs.arms[keep], arm),
            np.append(self.obs.values[keep], value),
            np.append(self.obs.variances[keep], 0.0),
        )
        return ArmModel(self.features, obs, 0, (self.kernels, self.weights), (self.center, self.scale))


def expected_improvement(mean: np.ndarray, sd: np.ndarray, best: float) -> np.ndarray:
    """E[max(f - best, 0)] for f ~ N(mean, sd²), elementwise; sd = 0 gives max(mean - best, 0)."""
    gap = mean - best
    safe = np.where(sd > 0, sd, 1.0)
    z = gap / safe
    ei = gap * norm.cdf(z) + safe * norm.pdf(z)
    return np.where(sd > 0, np.maximum(ei, 0.0), np.maximum(gap, 0.0))


def sample_joint(mean: np.ndarray, cov: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` joint draws (n × arms) from N(mean, cov), through a Cholesky factor with growing jitter
    (a predictive covariance is positive semi-definite only up to round-off)."""
    scale = max(float(np.mean(np.diag(cov))), 1e-12)
    for jitter in (1e-10, 1e-8, 1e-6, 1e-4):
        try:
            factor = np.linalg.cholesky(cov + jitter * scale * np.eye(len(mean)))
            break
        except np.linalg.LinAlgError:
            continue
    else:  # eigen-decomposition: negative round-off eigenvalues clipped to zero
        values, vectors = np.linalg.eigh(cov)
        factor = vectors * np.sqrt(np.clip(values, 0.0, None))
    return mean + rng.standard_normal((n, len(mean))) @ factor.T
