"""How often would the search goal be met? bench/search.py's comparison, simulated over many seeds and budgets.

bench/search.py measures 3 seeds per budget, each seed half an hour or more of training here, so it cannot
say how likely its result is, nor what 100 or 200 trials would show. This replaces training (only training)
with a model of it fitted to the real learning curves in bench/results/search_wide_40x9.json (wide space,
2,000 training examples, 9 epochs, 240 trials) and runs the comparison many times:
- mean curve: per epoch, validation accuracy of the 5 nearest real trials in hyperparameter space (scaled
  log10 learning rate, log2 batch, width, dropout), weighted by distance, averaged on a logit scale;
- noise: the out-of-fold residual curve (9 epochs) of one of the 5 nearest complete real trials: the real
  seed-to-seed and validation noise plus the mean curve's own error (so if anything too large;
  --noise-scales shows what the verdict owes to it), correlated across epochs, larger where training is
  unstable. It is drawn by (seed, trial number), as the real benchmark seeds Keras with seed + trial number.
Search space, samplers and pruners are the tune step's own (`mlsteps.search`); as in `mlsteps.tune`, a trial
reports each epoch and the pruner is asked between epochs. Epochs to target are counted as in bench/search.py.
Prints a fit check and tables; writes bench/results/search_simulation.json and a plot (.png).
Run in the steps environment:  .venvs/steps/bin/python bench/search_simulation.py [--seeds 150 --trials 40]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, table, write  # noqa: E402
from search import SPACES, TOLERANCE, epochs_to_reach  # noqa: E402

from mlsteps.search import make_pruner, make_sampler, parse_space, suggest  # noqa: E402

SOURCE = RESULTS / "search_wide_40x9.json"
EPOCHS = 9
K = 5  # neighbours
WEIGHTS = np.array([1.0, 0.5, 0.3, 0.3])  # distance weights: learning rate matters most
LOW, HIGH = np.array([-5.0, 5.0, 8.0, 0.0]), np.array([-1.0, 9.0, 64.0, 0.7])  # the wide space, scaled to 0..1
FLOOR, CEIL = 0.09, 0.885  # accuracies lie between chance and a little above the best real trial (86.6 %)


def features(params: dict) -> np.ndarray:
    raw = [np.log10(params["learning_rate"]), np.log2(params["batch_size"]), params["width"], params["dropout"]]
    return (np.array(raw) - LOW) / (HIGH - LOW)


def to_logit(accuracy):
    u = np.clip((np.asarray(accuracy) - FLOOR) / (CEIL - FLOOR), 0.002, 0.998)
    return np.log(u / (1 - u))


def from_logit(z):
    return FLOOR + (CEIL - FLOOR) / (1 + np.exp(-np.asarray(z)))


def knn(x_train: np.ndarray, y_train: np.ndarray, x: np.ndarray) -> np.ndarray:
    distance = np.sqrt((((x[:, None, :] - x_train[None]) * WEIGHTS) ** 2).sum(-1))
    nearest = np.argsort(distance, 1)[:, :K]
    d = np.take_along_axis(distance, nearest, 1)
    w = np.exp(-2 * (d / (d[:, -1:] + 1e-6)) ** 2)
    return (y_train[nearest] * w).sum(1) / w.sum(1)


class Surrogate:
    """Learning curves for any hyperparameters, from the real trials of one bench/search.py results file."""

    def __init__(self, results: dict, noise_scale: float = 1.0):
        # The 240 trials of random search and the default TPE + successive halving (not of other settings
        # measured later in the same file), as the published fit and results were made from.
        trials = [t for c in results["comparisons"] for name in ("random", "tpe_successive_halving")
                  for t in c["runs"][name]["trials"]]
        self.by_epoch = []  # per epoch: (features, logit accuracy) of every trial that trained that far
        for e in range(EPOCHS):
            seen = [t for t in trials if len(t["curve"]) > e]
            self.by_epoch.append((np.array([features(t["params"]) for t in seen]),
                                  to_logit([t["curve"][e] for t in seen])))
        complete = [t for t in trials if len(t["curve"]) == EPOCHS]
        self.donors = np.array([features(t["params"]) for t in complete])
        curves = to_logit([t["curve"] for t in complete])
        # Out-of-fold residuals: each complete trial against a model fitted without it (10 folds).
        fold = np.random.default_rng(0).permutation(len(complete)) % 10
        self.residuals = np.zeros_like(curves)
        for e, (x, y) in enumerate(self.by_epoch):
            for f in range(10):
                held = fold == f
                keep = ~np.any(np.all(np.isclose(x[:, None, :], self.donors[held][None]), -1), 1)
                self.residuals[held, e] = curves[held, e] - knn(x[keep], y[keep], self.donors[held])
        self.noise_scale = noise_scale
        self.fit = {}
        for e in (0, 2, 8):  # how well the mean curve predicts real trials it was not fitted to
            real = from_logit(curves[:, e])
            error = real - from_logit(curves[:, e] - self.residuals[:, e])
            top = real > 0.83
            self.fit[f"epoch {e + 1}"] = {
                "out_of_fold_r2": round(float(1 - (error ** 2).sum() / ((real - real.mean()) ** 2).sum()), 3),
                "rmse_pt": round(100 * float(np.sqrt(np.mean(error ** 2))), 2),
                "rmse_pt_above_83pct": round(100 * float(np.sqrt(np.mean(error[top] ** 2))), 2) if top.any() else None}

    def curve(self, params: dict, seed: int, number: int) -> np.ndarray:
        x = features(params)
        mean = np.array([knn(*self.by_epoch[e], x[None])[0] for e in range(EPOCHS)])
        rng = np.random.default_rng([seed, number, 7])
        distance = np.sqrt((((self.donors - x) * WEIGHTS) ** 2).sum(-1))
        donor = rng.choice(np.argsort(distance)[:K])
        return from_logit(mean + self.noise_scale * self.residuals[donor])


def settings(variant: str, seed: int) -> tuple:
    """(sampler, pruner) of TPE + successive halving as the tune step makes them, or of one other setting."""
    import optuna

    def tpe(**changed: Any) -> Any:  # the tune step's TPE with one change
        return optuna.samplers.TPESampler(
            **{"seed": seed, "multivariate": True, "constant_liar": True, "n_startup_trials": 5, **changed})

    halving = optuna.pruners.SuccessiveHalvingPruner
    samplers = {"TPE start-up 2": lambda: tpe(n_startup_trials=2), "TPE start-up 10": lambda: tpe(n_startup_trials=10),
                "TPE gamma 5 %": lambda: tpe(gamma=lambda n: min(math.ceil(0.05 * n), 25)),
                "TPE univariate": lambda: tpe(multivariate=False)}
    pruners = {"reduction factor 2": lambda: halving(min_resource=1, reduction_factor=2),
               "reduction factor 4": lambda: halving(min_resource=1, reduction_factor=4),
               "first rung at epoch 3": lambda: halving(min_resource=3, reduction_factor=3),
               "median pruner": lambda: make_pruner("median", EPOCHS),
               "Hyperband": lambda: make_pruner("hyperband", EPOCHS)}
    if variant not in {"default", *samplers, *pruners}:
        raise ValueError(f"unknown setting {variant!r}")
    sampler = samplers[variant]() if variant in samplers else make_sampler("tpe", seed)
    pruner = pruners[variant]() if variant in pruners else make_pruner("successive_halving", EPOCHS)
    return sampler, pruner


VARIANTS = ["reduction factor 2", "reduction factor 4", "first rung at epoch 3", "median pruner", "Hyperband",
            "TPE start-up 2", "TPE start-up 10", "TPE gamma 5 %", "TPE univariate"]  # the table's order


def run_search(surrogate: Surrogate, space: dict, sampler: Any, pruner: Any, trials: int, seed: int) -> list[dict]:
    """One search as `mlsteps.tune` runs it on one worker, training replaced by the surrogate."""
    import optuna

    history = []

    def objective(trial):
        params = suggest(trial, space)
        curve = surrogate.curve(params, seed, trial.number)
        for epoch in range(EPOCHS):
            trial.report(float(curve[epoch]), epoch + 1)
            if epoch + 1 < EPOCHS and trial.should_prune():
                history.append({"params": params, "curve": curve[:epoch + 1].tolist(), "pruned": True})
                raise optuna.TrialPruned()
        history.append({"params": params, "curve": curve.tolist(), "pruned": False})
        return float(curve[-1])

    # Named: Hyperband puts a trial in a bracket by a hash of the study's name (a random one if unnamed).
    study = optuna.create_study(study_name=f"simulated-{seed}", direction="maximize", sampler=sampler,
                                pruner=pruner)
    study.optimize(objective, n_trials=trials)
    return history


def random_search(surrogate: Surrogate, space: dict, trials: int, seed: int) -> list[dict]:
    return run_search(surrogate, space, make_sampler("random", seed), make_pruner("none", EPOCHS), trials, seed)


def compare(surrogate: Surrogate, space: dict, trials: int, seed: int, variant: str = "default") -> dict:
    """Random search vs TPE + successive halving (or another setting) for one seed: bench/search.py's numbers."""
    random = random_search(surrogate, space, trials, seed)
    tpe = run_search(surrogate, space, *settings(variant, seed), trials, seed)
    best = max(t["curve"][-1] for t in random)
    complete = [t["curve"][-1] for t in tpe if not t["pruned"]]
    return {"seed": seed, "random_best": best, "random_to_target": epochs_to_reach(random, best - TOLERANCE),
            "random_epochs": sum(len(t["curve"]) for t in random),
            "tpe_best": max(complete) if complete else None, "tpe_to_target": epochs_to_reach(tpe, best - TOLERANCE),
            "tpe_epochs": sum(len(t["curve"]) for t in tpe), "tpe_pruned": sum(t["pruned"] for t in tpe)}


def ratios(per_seed: list[dict], against: str = "random_to_target") -> tuple[np.ndarray, np.ndarray]:
    """TPE's epochs to target over random search's ``against`` (its epochs to target, or "random_epochs": its
    whole budget): per seed, and per benchmark of 3 seeds summed as bench/search.py does (inf where TPE never
    reached the target)."""
    tpe = np.array([np.inf if p["tpe_to_target"] is None else p["tpe_to_target"] for p in per_seed], float)
    rnd = np.array([p[against] for p in per_seed], float)
    return tpe / rnd, np.array([tpe[i:i + 3].sum() / rnd[i:i + 3].sum() for i in range(0, len(per_seed) - 2, 3)])


def summarise(per_seed: list[dict]) -> dict:
    """Shares of seeds and of 3-seed benchmarks that meet the goal."""
    per_seed_ratio, blocks = ratios(per_seed)
    _, against_budget = ratios(per_seed, against="random_epochs")
    return {"seeds": len(per_seed), "median_ratio": round(float(np.median(per_seed_ratio)), 2),
            "share_seeds_at_most_third": round(float(np.mean(per_seed_ratio <= 1 / 3)), 3),
            "benchmarks_of_3_seeds": len(blocks),
            "benchmarks_meeting_goal": int(np.sum(blocks <= 1 / 3)),
            "share_benchmarks_meeting_goal": round(float(np.mean(blocks <= 1 / 3)), 3),
            # The goal's other reading: against random search's whole budget (it spends all of it before it
            # knows which trial was its best), as bench/search.py's "ratio to random's whole budget".
            "benchmarks_meeting_goal_against_random_budget": int(np.sum(against_budget <= 1 / 3)),
            "share_seeds_target_never_reached": round(float(np.mean(~np.isfinite(per_seed_ratio))), 3),
            "whole_budget_ratio": round(sum(p["tpe_epochs"] for p in per_seed)
                                        / sum(p["random_epochs"] for p in per_seed), 2),
            "share_tpe_best_at_least_random": round(float(np.mean(
                [p["tpe_best"] is not None and p["tpe_best"] >= p["random_best"] for p in per_seed])), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=150, help="seeds per budget (3 make one benchmark)")
    parser.add_argument("--trials", type=int, nargs="+", default=[16, 40, 100, 200], help="trial budgets")
    parser.add_argument("--noise-scales", type=float, nargs="+", default=[1.0, 0.5],
                        help="residual noise multipliers (1: as measured; 0.5: a quieter validation metric)")
    parser.add_argument("--variant-trials", type=int, default=40,
                        help="trial budget at which other pruner and sampler settings are tried (0: none)")
    args = parser.parse_args()
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    real = json.loads(SOURCE.read_text())
    space = parse_space(SPACES["wide"])
    seeds = list(range(1000, 1000 + args.seeds))
    fit, rows, results = None, [], []
    for noise in args.noise_scales:
        surrogate = Surrogate(real, noise)
        if fit is None:
            # Does a simulated random search of 40 trials find what the real ones found?
            bests = [100 * max(t["curve"][-1] for t in random_search(surrogate, space, 40, s))
                     for s in range(100000, 100100)]
            fit = {"learning_curves": surrogate.fit, "best_of_40_random_pct": {
                "simulated_median": round(float(np.median(bests)), 2),
                "simulated_10_to_90_pct": [round(float(np.quantile(bests, q)), 2) for q in (0.1, 0.9)],
                "real_seeds_42_43_44": [round(100 * c["runs"]["random"]["best"], 2) for c in real["comparisons"]]}}
            print(json.dumps(fit, indent=1), flush=True)
        for trials in args.trials:
            started = time.monotonic()
            per_seed = [compare(surrogate, space, trials, s) for s in seeds]
            s = summarise(per_seed)
            results.append({"noise_scale": noise, "trials": trials, "summary": s, "per_seed": per_seed})
            rows.append([noise, f"{trials}x{EPOCHS}", s["median_ratio"], s["share_seeds_at_most_third"],
                         f"{s['benchmarks_meeting_goal']} of {s['benchmarks_of_3_seeds']}",
                         f"{s['benchmarks_meeting_goal_against_random_budget']} of {s['benchmarks_of_3_seeds']}",
                         s["share_seeds_target_never_reached"], s["whole_budget_ratio"],
                         s["share_tpe_best_at_least_random"]])
            print(f"noise {noise}, {trials} trials: {json.dumps(s)} ({time.monotonic() - started:.0f} s)", flush=True)
    headers = ["noise", "budget", "median ratio", "seeds <= 1/3", "3-seed benchmarks <= 1/3",
               "<= 1/3 of random's whole budget", "never reached",
               "whole budget", "TPE best >= random's"]
    print(table(headers, rows))
    # Other settings of the tune step's TPE and pruner, one change each, as measured noise: does any make the
    # goal likely? (The default is the first row of the budget's table above: same seeds, same surrogate.)
    variant_rows, variants = [], []
    if args.variant_trials:
        surrogate = Surrogate(real, 1.0)
        for variant in VARIANTS:
            per_seed = [compare(surrogate, space, args.variant_trials, s, variant) for s in seeds]
            s = summarise(per_seed)
            variants.append({"variant": variant, "trials": args.variant_trials, "summary": s})
            variant_rows.append([variant, f"{args.variant_trials}x{EPOCHS}", s["median_ratio"],
                                 f"{s['benchmarks_meeting_goal']} of {s['benchmarks_of_3_seeds']}",
                                 f"{s['benchmarks_meeting_goal_against_random_budget']} of "
                                 f"{s['benchmarks_of_3_seeds']}",
                                 s["share_seeds_target_never_reached"], s["whole_budget_ratio"],
                                 s["share_tpe_best_at_least_random"]])
            print(f"{variant}: {json.dumps(s)}", flush=True)
        variant_headers = ["setting (noise 1)", "budget", "median ratio", "3-seed benchmarks <= 1/3",
                           "<= 1/3 of random's whole budget", "never reached", "whole budget", "TPE best >= random's"]
        print(table(variant_headers, variant_rows))
    path = write("search_simulation", {"source": str(SOURCE.relative_to(ROOT)), "search_space": SPACES["wide"],
                                       "fit": fit, "table": {"headers": headers, "rows": rows},
                                       "variants_table": variant_rows, "results": results,
                                       "variants": variants})
    print(f"wrote {path}")
    print(f"plot: {plot(results, real, path.with_suffix('.png'))}")


def plot(results: list[dict], real: dict, path: Path) -> Path:
    """Per budget, the spread of 3-seed benchmark ratios (the goal's measure), the goal and the real benchmark."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    noises = sorted({r["noise_scale"] for r in results}, reverse=True)
    fig, axes = plt.subplots(1, len(noises), figsize=(5.5 * len(noises), 3.8), squeeze=False, sharey=True)
    cap = 4.0  # a benchmark in which some seed never reached the target is drawn at the right edge
    for ax, noise in zip(axes[0], noises):
        for r in (r for r in results if r["noise_scale"] == noise):
            blocks = np.sort(np.minimum(ratios(r["per_seed"])[1], cap))
            share = np.arange(1, len(blocks) + 1) / len(blocks)
            ax.step(blocks, share, where="post", label=f"{r['trials']} trials of {EPOCHS} epochs")
        ax.axvline(1 / 3, color="tab:red", linestyle="--", linewidth=1, label="goal: 1/3")
        measured = real["searches"]["tpe_successive_halving"]["ratio_to_random"]
        ax.axvline(measured, color="black", linestyle=":", linewidth=1,
                   label=f"real 40-trial benchmark: {measured:.2f}")
        ax.set_xscale("log")
        ax.set_xlim(0.05, cap * 1.05)
        ax.set_title(f"noise x{noise:g}" + (" (as measured)" if noise == 1 else ""))
        ax.set_xlabel("epochs to target, TPE + successive halving / random (3 seeds summed)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=7)
    axes[0][0].set_ylabel("share of simulated 3-seed benchmarks")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
