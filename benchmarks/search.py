"""Benchmark of the layer search (issue 21): replaying full grids whose truth is known.

For each grid — the trajectory world (`deployments/search-demo.yaml`, its full grid scored once by
`layertime run --plain` and cached in its run root), and any finished run root given with `--replay` —
the search (`layertime.search`) and five baselines (`layertime.search.baselines`: random search,
LinUCB over (checkpoint, layer) arms with the metrics as features, the last layer, the DiME argmax per
checkpoint, successive halving over tasks) are replayed against an oracle that answers only what is
asked and counts it (`layertime.search.replay`). Over `--seeds` seeds (20), per method:

- **to ε**: evaluations, scoring CPU-s (and % of the grid's) and embedding GPU-s spent until the chosen
  arm (the best arm evaluated on every task) is within ε (0.5 points) of the true best;
- **regret at 5 / 10 / 25 %** of the grid's scoring CPU-s: the chosen arm's true regret when that much
  was spent (the last state within the budget);
- for the search, **the stop rule**: where it stopped (% of the grid) and how often it stopped with a
  regret above ε — calibrated when ≤ 1 − confidence = 5% of seeds.

Medians over seeds; costs are the run's measured ones (`scores.seconds` per scoring, `costs.seconds`
per embedding: on the CPU machine that scored the truth, "GPU-s" are its embedding seconds).
The deterministic baselines (LinUCB, last layer, DiME) do not depend on the seed.

The scale world (`deployments/scale.yaml`) is not replayed by default: its truth is exp2's 6,400
evaluations, ≥ 22 CPU-min of scoring alone at the 214 s per 1,024 evaluations measured in
RESULTS.md (2026-12-06 12:28), over a landscape of 4 blocks × 50 late checkpoints of a 143-step
model; `--replay RUN_ROOT` replays it from any run root that has it.

Usage:

    python benchmarks/search.py                          # the trajectory world; appends to RESULTS.md
    python benchmarks/search.py --replay runs/exp2 --no-write
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import cpu_model, load_average  # noqa: E402

from layertime.search import baselines  # noqa: E402
from layertime.search.replay import Grid, Point, grid_from_run, replay  # noqa: E402
from layertime.spec import SearchSpec, load_spec  # noqa: E402

TRUTH_SPEC = ROOT / "deployments" / "search-demo.yaml"
FRACTIONS = (0.05, 0.10, 0.25)
HARD_CAP = 0.5  # a search whose stop rule has not fired by half the grid is cut there (and counted)


def cpu_seconds() -> float:
    """CPU-seconds of this process and its finished children (user + system)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def truth(spec_path: Path) -> tuple[Grid, dict]:
    """The full grid of `spec_path`'s run root, scored now (in this process, `run_spec`) unless cached."""
    spec = load_spec(spec_path)
    try:
        return grid_from_run(spec.run_root, spec.name), {"cached": True}
    except (FileNotFoundError, ValueError) as e:
        print(f"truth of {spec.name}: {e}; scoring the full grid now", flush=True)
    from layertime.pipeline import run_spec

    before, wall = cpu_seconds(), time.time()
    result = run_spec(spec)
    info = {
        "cached": False,
        "cpu_s": cpu_seconds() - before,
        "wall_s": time.time() - wall,
        "scored": result.scored,
    }
    return grid_from_run(spec.run_root, spec.name), info


@dataclass
class Outcome:
    """One method on one seed: the cost to ε, the regrets at the budget fractions, the stop."""

    to_eps: Point | None
    regrets: dict[float, float]
    stop: Point | None = None
    cpu_s: float = 0.0  # the benchmark's own CPU-s for this run (the search's overhead)
    extra: dict = field(default_factory=dict)


def first_within(trace: list[Point], epsilon: float) -> Point | None:
    return next((p for p in trace if p.regret <= epsilon), None)


def regret_at(trace: list[Point], budget: float) -> float:
    """The chosen arm's regret once `budget` scoring CPU-s are spent: the last state within it."""
    within = [p for p in trace if p.cpu_s <= budget + 1e-9]
    return within[-1].regret if within else float("inf")


def outcome(trace: list[Point], grid_cpu: float, epsilon: float) -> Outcome:
    return Outcome(first_within(trace, epsilon), {f: regret_at(trace, f * grid_cpu) for f in FRACTIONS})


def run_search(
    grid: Grid, seed: int, epsilon: float, batch: int, use_metrics: bool, ratio: float | None = None
) -> Outcome:
    settings = SearchSpec(epsilon=epsilon, seed=seed, batch=batch)
    if ratio is not None:
        settings = settings.model_copy(update={"gpu_cpu_ratio": ratio})
    grid_cpu = grid.cost()[0]
    before = time.process_time()
    cap = max(FRACTIONS) * grid_cpu
    trace = replay(grid, settings, HARD_CAP * grid_cpu, past_stop=cap, use_metrics=use_metrics)
    stop = next((p for p in trace if p.stop), None)
    result = outcome(trace, grid_cpu, epsilon)
    result.stop = stop
    result.cpu_s = time.process_time() - before
    return result


def run_halving(grid: Grid, seed: int, epsilon: float) -> Outcome:
    """Successive halving at every start size n: the smallest n reaching ε, and the largest n within each
    budget fraction."""
    grid_cpu = grid.cost()[0]
    finals = [baselines.successive_halving(grid, n, seed) for n in range(2, grid.space.n_arms + 1)]
    to_eps = min((p for p in finals if p.regret <= epsilon), key=lambda p: p.cpu_s, default=None)
    regrets = {}
    for f in FRACTIONS:
        within = [p for p in finals if p.cpu_s <= f * grid_cpu]
        regrets[f] = max(within, key=lambda p: p.cpu_s).regret if within else float("inf")
    return Outcome(to_eps, regrets)


def one_seed(
    grid: Grid, seed: int, epsilon: float, batch: int, ablation: bool, ratio: float | None = None
) -> dict[str, Outcome]:
    """Every seeded method on `seed` (one BLAS thread: the GP matrices are small)."""
    grid_cpu = grid.cost()[0]
    with threadpool_limits(1):
        out = {"search": run_search(grid, seed, epsilon, batch, True, ratio)}
        if ablation:
            out["search, no metrics"] = run_search(grid, seed, epsilon, batch, False, ratio)
        out["random"] = outcome(baselines.random_search(grid, seed), grid_cpu, epsilon)
        out["successive halving"] = run_halving(grid, seed, epsilon)
    s = out["search"]
    print(
        f"  seed {seed}: search to ε at {s.to_eps and s.to_eps.evaluations} evaluations, stopped at "
        f"{s.stop and s.stop.evaluations} with regret {s.stop and round(s.stop.regret, 3)} "
        f"({s.cpu_s:.1f} CPU-s)",
        flush=True,
    )
    return out


def evaluate(
    grid: Grid,
    seeds: int,
    epsilon: float,
    batch: int,
    jobs: int = 1,
    ablation: bool = False,
    ratio: float | None = None,
) -> dict[str, list[Outcome]]:
    """Every method over `seeds` seeds, the seeds spread over `jobs` processes."""
    grid_cpu = grid.cost()[0]
    args = [(grid, seed, epsilon, batch, ablation, ratio) for seed in range(seeds)]
    if jobs > 1:
        with multiprocessing.get_context("spawn").Pool(jobs) as pool:
            per_seed = pool.starmap(one_seed, args)
    else:
        per_seed = [one_seed(*a) for a in args]
    out: dict[str, list[Outcome]] = {name: [r[name] for r in per_seed] for name in per_seed[0]}
    out["LinUCB"] = [outcome(baselines.linucb(grid), grid_cpu, epsilon)]
    out["last layer"] = [outcome(baselines.last_layer(grid), grid_cpu, epsilon)]
    dime = baselines.metric_argmax(grid, "dime")
    if dime is not None:
        out["DiME argmax"] = [outcome(dime, grid_cpu, epsilon)]
    return out


def _median(values: list[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    if len(finite) * 2 <= len(values):  # the median itself is "never"
        return float("inf")
    return statistics.median(sorted(values))


def _fmt(x: float, digits: int = 2) -> str:
    return "never" if not np.isfinite(x) else f"{x:.{digits}f}"


def landscape(grid: Grid) -> list[str]:
    """A few lines on the grid's shape: the best arm, how the best layer moves, how many arms are near it."""
    space = grid.space
    values = grid.values.reshape(len(space.checkpoints), len(space.blocks))
    best = int(np.argmax(grid.values))
    arm = space.arm(best)
    per_ckpt = [space.blocks[int(np.argmax(row))] for row in values]
    picks = np.linspace(0, len(space.checkpoints) - 1, 8).round().astype(int)
    path = ", ".join(f"{space.checkpoints[c]}: L{per_ckpt[c]} {values[c].max():.1f}" for c in picks)
    near = int((grid.values >= grid.best - 0.5).sum())
    return [
        f"- arms {space.n_arms} = {len(space.checkpoints)} checkpoints × {len(space.blocks)} blocks, "
        f"{len(space.tasks)} tasks; values {grid.values.min():.1f}..{grid.best:.1f} points",
        f"- best arm {arm.checkpoint} · layer {arm.block}: {grid.best:.2f}; arms within 0.5 of it: {near}",
        f"- best layer over training (checkpoint: layer, its value): {path}",
        f"- last layer of the last checkpoint: {values[-1, -1]:.2f} (regret {grid.best - values[-1, -1]:.2f})",
    ]


def table(grid: Grid, results: dict[str, list[Outcome]], epsilon: float) -> list[str]:
    grid_cpu, grid_gpu = grid.cost()
    evals = grid.space.n_arms * len(grid.space.tasks)
    lines = [
        f"Full grid: {evals:,} evaluations, {grid_cpu:,.0f} scoring CPU-s, {grid_gpu:,.0f} embedding s.",
        "",
        f"| method (seeds) | evaluations to ε={epsilon:g} | scoring CPU-s to ε (% of grid) | embedding s to ε "
        "| regret at 5% | at 10% | at 25% | stopped at (% of grid) | stops with regret > ε |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, outs in results.items():
        cost = [o.to_eps.cpu_s if o.to_eps else float("inf") for o in outs]
        ev = [o.to_eps.evaluations if o.to_eps else float("inf") for o in outs]
        gpu = [o.to_eps.gpu_s if o.to_eps else float("inf") for o in outs]
        regrets = [_fmt(_median([o.regrets[f] for o in outs])) for f in FRACTIONS]
        stop_at, bad = "", ""
        stops = [o.stop for o in outs if o.stop is not None]
        if name.startswith("search"):
            stop_at = f"{_fmt(100 * _median([s.cpu_s / grid_cpu for s in stops] or [float('inf')]), 1)}%"
            n_bad = sum(s.regret > epsilon for s in stops)
            bad = f"{n_bad} of {len(outs)} ({len(outs) - len(stops)} not stopped by {HARD_CAP:.0%})"
        c = _median(cost)
        lines.append(
            f"| {name} ({len(outs)}) | {_fmt(_median(ev), 0)} | {_fmt(c, 0)} ({_fmt(100 * c / grid_cpu, 1)}%) "
            f"| {_fmt(_median(gpu), 0)} | {' | '.join(regrets)} | {stop_at} | {bad} |"
        )
    return lines


def targets(grid: Grid, results: dict[str, list[Outcome]], epsilon: float, confidence: float) -> list[str]:
    grid_cpu = grid.cost()[0]

    def to_eps(name: str) -> float:
        return _median([o.to_eps.cpu_s if o.to_eps else float("inf") for o in results[name]])

    search, rand = to_eps("search"), to_eps("random")
    stops = [o.stop for o in results["search"]]
    bad = sum(s is not None and s.regret > epsilon for s in stops)
    ratio = rand / search if np.isfinite(search) and search > 0 else float("nan")
    met = lambda ok: "**met**" if ok else "**not met**"  # noqa: E731
    return [
        f"- within {epsilon:g} points with ≤ 10% of the grid's scoring CPU (median): "
        f"{100 * search / grid_cpu:.1f}% — {met(search <= 0.10 * grid_cpu)}",
        f"- ≥ 3× cheaper than random search to the same regret (median scoring CPU-s to ε): "
        f"{_fmt(ratio, 1)}× — {met(ratio >= 3)}",
        f"- stop rule calibrated (regret > ε in ≤ {1 - confidence:.0%} of seeds): {bad} of {len(stops)} "
        f"— {met(bad <= (1 - confidence) * len(stops))}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--epsilon", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=SearchSpec().batch, help="scorings per proposal")
    parser.add_argument("--replay", type=Path, action="append", default=[], help="a finished run root")
    parser.add_argument("--no-trajectory", action="store_true", help="only the --replay run roots")
    parser.add_argument(
        "--gpu-cpu-ratio",
        type=float,
        default=None,
        help="the search's gpu_cpu_ratio (default: the spec's); 1 where embeddings ran on the same CPUs",
    )
    parser.add_argument("--jobs", type=int, default=1, help="processes over the seeds")
    parser.add_argument("--ablation", action="store_true", help="also the search without the metrics")
    parser.add_argument("--no-write", action="store_true", help="print, do not append to RESULTS.md")
    args = parser.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_before = load_average()
    grids: list[tuple[Grid, dict]] = []
    if not args.no_trajectory:
        grids.append(truth(TRUTH_SPEC))
    grids += [(grid_from_run(root), {"cached": True, "root": str(root)}) for root in args.replay]
    sections = [
        f"## Layer search — {started} — {cpu_model()}, {__import__('os').cpu_count()} cores, no GPU",
        "",
        f"`python benchmarks/search.py --seeds {args.seeds} --jobs {args.jobs}{' --ablation' * args.ablation}"
        f"{'' if args.gpu_cpu_ratio is None else f' --gpu-cpu-ratio {args.gpu_cpu_ratio:g}'}`: the search (ε = {args.epsilon:g} points, "
        f"confidence {SearchSpec().confidence:g}, batch {args.batch} scorings, gpu_cpu_ratio "
        f"{args.gpu_cpu_ratio if args.gpu_cpu_ratio is not None else SearchSpec().gpu_cpu_ratio:g}) and the baselines replayed on "
        "full grids (medians over seeds). Load average (1 min) before / after: "
        f"{load_before} / LOAD_AFTER; timings of the replay itself are CPU-s (one BLAS thread).",
    ]
    for grid, info in grids:
        print(f"grid {grid.name}: {grid.space.n_arms} arms", flush=True)
        results = evaluate(
            grid, args.seeds, args.epsilon, args.batch, args.jobs, args.ablation, args.gpu_cpu_ratio
        )
        overhead = _median([o.cpu_s for o in results["search"]])
        sections += ["", f"### {grid.name}", ""]
        if "cpu_s" in info:
            sections.append(
                f"Truth scored now: {info['cpu_s']:,.0f} CPU-s ({info['wall_s']:,.0f} s wall, {info['scored']} "
                "evaluations), `run_spec` in this process."
            )
        sections += landscape(grid) + [""] + table(grid, results, args.epsilon) + [""]
        sections.append(f"The search's own CPU per replay (model fits, samples; median): {overhead:.1f} s.")
        sections += ["", "Targets (issue 21):", ""] + targets(
            grid, results, args.epsilon, SearchSpec().confidence
        )
        print(json.dumps({"grid": grid.name, **info}), flush=True)
    text = "\n".join(sections).replace("LOAD_AFTER", load_average()) + "\n"
    print(text)
    if not args.no_write:
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as out:
            out.write("\n" + text)


if __name__ == "__main__":
    main()
