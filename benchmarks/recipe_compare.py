"""Counting recipes side by side: the Udacity ML-engineer capstone's recipe vs bincount's candidates, same data, same budget.

Usage:
    python benchmarks/recipe_compare.py --root ../shared/abid --seeds 0 1 2 --budget-min 10
    python benchmarks/recipe_compare.py --root ../shared/abid --recipes udacity_capstone quickstart --seeds 0
    python benchmarks/recipe_compare.py --report-only

Every recipe of ``benchmarks/recipes.yaml`` is a list of ``train.py`` overrides. Each (recipe, seed)
run trains with ``trainer.max_time`` = the budget (the same wall-clock on this machine, so the same
CPU-minutes), on the same photos of ``--root``, and is tested on the same block-split test ids
(``data.seed`` is fixed; ``seed`` only changes initialisation and augmentation). Recipes are
chosen on validation figures only; test figures are reported, never used to choose.

Runs append to ``<out>/results.jsonl`` and finished ones are skipped, so an interrupted
comparison resumes where it stopped. Seeds run one after the other, every recipe at each seed,
the recipes in reverse order at every other seed (ABBA), so no recipe always trains first.
``<out>/results.md`` (tables), ``<out>/recipe_compare.png`` (test MAE and accuracy vs wall-clock
minutes) and, through ``results_io``, ``<out>/results.json`` and ``<out>/summary.md`` (test MAE
per recipe and seed, each recipe's MAE over the reference's as the median of per-seed ratios
where both ran the same seeds, every run under ``extra``; the command and commit are this
invocation's, the runs may be older) are rewritten from all results after every run.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

if str(Path(__file__).resolve().parent) not in sys.path:  # results_io, also when tests load this file by path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import add_out_argument, git_state, machine, versions, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPES = Path(__file__).with_name("recipes.yaml")


def load_recipes(path: Path = RECIPES) -> dict[str, dict]:
    """``{name: {"doc": str, "overrides": [str, ...]}}`` from the recipes file."""
    recipes = yaml.safe_load(path.read_text())
    for name, recipe in recipes.items():
        if not isinstance(recipe.get("overrides"), list):
            raise ValueError(f"{path}: recipe {name!r} needs an 'overrides' list")
    return recipes


def val_at_checkpoint(run_dir: Path) -> dict[str, float]:
    """Validation figures of the epoch whose checkpoint was tested (from the CSV log)."""
    from bincount.models.export import read_model_card

    name = read_model_card(run_dir / "model").checkpoint or ""
    epochs: dict[int, dict[str, float]] = {}
    for log in sorted((run_dir / "csv").glob("version_*/metrics.csv")):
        for row in csv.DictReader(log.open()):
            for key in ("val/acc", "val/mae", "val/loss"):
                if row.get(key):
                    epochs.setdefault(int(row["epoch"]), {})[key] = float(row[key])
    if not epochs:
        return {}
    epoch = int(name.removeprefix("epoch_").removesuffix(".ckpt")) if name.startswith("epoch_") else max(epochs)
    return {"epoch": epoch, "epochs_run": max(epochs) + 1, **epochs.get(epoch, {})}


def run_one(name: str, overrides: list[str], seed: int, root: str, budget_min: float, out: Path) -> dict:
    """Train one (recipe, seed) with ``train.py`` and collect its figures."""
    run_dir = out / "runs" / f"{name}-s{seed}"
    minutes = int(budget_min)
    seconds = round((budget_min - minutes) * 60)
    cmd = [sys.executable, str(REPO / "train.py"), *overrides, f"data.root={root}", f"seed={seed}",
           f"hydra.run.dir={run_dir}", f"+trainer.max_time=00:00:{minutes:02d}:{seconds:02d}"]
    print(f"[recipe_compare] {name} seed {seed}: {' '.join(cmd[2:])}", flush=True)
    log_path = out / "runs" / f"{name}-s{seed}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-5:])
        raise RuntimeError(f"{name} seed {seed} failed (exit {proc.returncode}); {log_path} ends:\n{tail}")
    test = json.loads((run_dir / "metrics.json").read_text())
    return {
        "recipe": name, "seed": seed, "budget_min": budget_min, "wall_min": wall / 60,
        "machine": machine(), "versions": versions(), "git": git_state(),
        "val": val_at_checkpoint(run_dir),
        "test": {k: test[k] for k in ("acc", "obo_acc", "mae", "rmse", "n", "per_class_acc", "decode",
                                      "baseline_majority_count", "baseline_majority_acc", "baseline_majority_mae")},
    }


def read_results(out: Path) -> list[dict]:
    path = out / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def _fmt(values: list[float]) -> str:
    mean, sd = _mean_sd(values)
    return f"{mean:.3f}" if math.isnan(sd) else f"{mean:.3f} ± {sd:.3f}"


def summarise(results: list[dict], reference: str) -> str:
    """Markdown: one row per recipe (mean ± sd over seeds), per-run rows, and each recipe vs ``reference``."""
    by_recipe: dict[str, list[dict]] = {}
    for r in results:
        by_recipe.setdefault(r["recipe"], []).append(r)
    first = results[0]["test"]
    lines = [
        f"Test: the block-split test ids, n = {first['n']}; always answering {first['baseline_majority_count']}: "
        f"acc {first['baseline_majority_acc']:.3f}, MAE {first['baseline_majority_mae']:.3f}. "
        "Mean ± sd over seeds.",
        "",
        "| recipe | seeds | val acc | val MAE | test acc | test ±1 acc | test MAE | test RMSE | wall min |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in by_recipe.items():
        t = [r["test"] for r in runs]
        v = [r["val"] for r in runs]
        lines.append(
            f"| {name} | {len(runs)} | {_fmt([x.get('val/acc', float('nan')) for x in v])} "
            f"| {_fmt([x.get('val/mae', float('nan')) for x in v])} | {_fmt([x['acc'] for x in t])} "
            f"| {_fmt([x['obo_acc'] for x in t])} | {_fmt([x['mae'] for x in t])} | {_fmt([x['rmse'] for x in t])} "
            f"| {_fmt([r['wall_min'] for r in runs])} |"
        )
    counts = list(first["per_class_acc"])
    lines += ["", "Per-count test accuracy (mean over seeds):", "",
              "| recipe | " + " | ".join(counts) + " |", "|---|" + "---|" * len(counts)]
    for name, runs in by_recipe.items():
        cells = []
        for c in counts:
            vals = [r["test"]["per_class_acc"][c] for r in runs if r["test"]["per_class_acc"][c] is not None]
            cells.append(f"{statistics.fmean(vals):.3f}" if vals else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Runs:", "", "| recipe | seed | epochs | tested epoch | val acc | val MAE | test acc | test MAE "
              "| wall min |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        v, t = r["val"], r["test"]
        lines.append(f"| {r['recipe']} | {r['seed']} | {v.get('epochs_run', '-')} | {v.get('epoch', '-')} "
                     f"| {v.get('val/acc', float('nan')):.3f} | {v.get('val/mae', float('nan')):.3f} "
                     f"| {t['acc']:.3f} | {t['mae']:.3f} | {r['wall_min']:.1f} |")
    if reference in by_recipe:
        lines += ["", f"Against `{reference}` (difference of means; 'within noise' when it is under twice its "
                  "standard error over seeds; a recipe with one seed has no noise estimate):", ""]
        ref = by_recipe[reference]
        for name, runs in by_recipe.items():
            if name == reference:
                continue
            parts = []
            for key, label in (("acc", "acc"), ("mae", "MAE")):
                a = [r["test"][key] for r in runs]
                b = [r["test"][key] for r in ref]
                diff = statistics.fmean(a) - statistics.fmean(b)
                if len(a) > 1 and len(b) > 1:
                    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
                    noise = "within noise" if abs(diff) < 2 * se else "beyond noise"
                    parts.append(f"{label} {diff:+.3f} (2 SE = {2 * se:.3f}, {noise})")
                else:
                    parts.append(f"{label} {diff:+.3f} (one seed: no noise estimate)")
            lines.append(f"- `{name}`: " + "; ".join(parts))
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    """Test MAE and accuracy of every run vs its wall-clock minutes, one colour per recipe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    names = list(dict.fromkeys(r["recipe"] for r in results))
    for i, name in enumerate(names):
        runs = [r for r in results if r["recipe"] == name]
        for ax, key in zip(axes, ("mae", "acc")):
            ax.scatter([r["wall_min"] for r in runs], [r["test"][key] for r in runs], label=name, color=f"C{i}")
    base = results[0]["test"]
    for ax, key, label in ((axes[0], "baseline_majority_mae", "test MAE (objects)"),
                           (axes[1], "baseline_majority_acc", "test accuracy")):
        ax.axhline(base[key], color="grey", linestyle="--", label=f"always {base['baseline_majority_count']}")
        ax.set_xlabel("wall-clock minutes on this machine (train + test + export)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    budgets = ", ".join(f"{b:g}" for b in sorted({r["budget_min"] for r in results}))
    fig.suptitle(f"recipes on the block-split test ids (n={base['n']}); each run trains its recipe's epochs or "
                 f"stops at its time budget ({budgets} min)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(out: Path, reference: str) -> None:
    results = read_results(out)
    if not results:
        print(f"no results in {out}/results.jsonl yet")
        return
    text = summarise(results, reference)
    (out / "results.md").write_text(text)
    plot(results, out / "recipe_compare.png")
    print(text)
    write_summary(out, results, reference)


def write_summary(out: Path, results: list[dict], reference: str) -> None:
    """``results.json`` and ``summary.md`` of ``results_io``: test MAE per recipe, seed by seed."""
    runs: dict[str, list[tuple[int, float]]] = {}  # recipe -> [(seed, budget)], in seed order
    mae: dict[str, list[float]] = {}
    for r in sorted(results, key=lambda r: r["seed"]):
        runs.setdefault(r["recipe"], []).append((r["seed"], r["budget_min"]))
        mae.setdefault(r["recipe"], []).append(r["test"]["mae"])
    ratios = {f"{name} / {reference} (test MAE)": (name, reference) for name in mae
              if name != reference and reference in runs and runs[name] == runs[reference]}
    budgets = sorted({r["budget_min"] for r in results})
    # the machine of the runs, where every run recorded the same one (runs before it was kept: not recorded)
    kept = {json.dumps({k: r.get(k) for k in ("machine", "versions")}, sort_keys=True) for r in results}
    same = len(kept) == 1 and all(r.get("machine") for r in results)
    provenance = {"machine": results[-1]["machine"], "versions": results[-1]["versions"],
                  "git": results[-1]["git"]} if same else {}
    write_results(out, name="recipe_compare", unit="test MAE (objects)", rounds=mae, ratios=ratios,
                  order=[r["recipe"] for r in results],
                  what=f"Counting recipes of benchmarks/recipes.yaml trained with trainer.max_time = the budget "
                       f"({', '.join(f'{b:g}' for b in budgets)} min) on the same photos, tested on the same "
                       f"block-split test ids (n = {results[0]['test']['n']}); a round is a seed. A ratio only "
                       f"where a recipe ran the same seeds at the same budgets as `{reference}`.",
                  config={"reference": reference, "seeds_and_budgets": runs, "budget_min": budgets},
                  extra={"runs": results}, provenance=provenance)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="../shared/abid", help="ABID-layout folder (data.root)")
    parser.add_argument("--recipes", nargs="+", help="names in recipes.yaml (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--budget-min", type=float, default=10.0, help="trainer.max_time of every run, minutes")
    add_out_argument(parser, "recipe_compare")
    parser.add_argument("--reference", default="udacity_capstone", help="recipe the others are compared with")
    parser.add_argument("--report-only", action="store_true", help="rewrite the table and plot, train nothing")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        recipes = load_recipes()
        names = args.recipes or list(recipes)
        unknown = sorted(set(names) - set(recipes))
        if unknown:
            parser.error(f"unknown recipes {unknown}; {RECIPES} has {sorted(recipes)}")
        done = {(r["recipe"], r["seed"]) for r in read_results(args.out)}
        for k, seed in enumerate(args.seeds):  # seed-major: a stopped comparison has every recipe at the first seeds
            for name in (names[::-1] if k % 2 else names):  # ABBA: no recipe always trains first
                if (name, seed) in done:
                    continue
                result = run_one(name, recipes[name]["overrides"], seed, str(Path(args.root).resolve()),
                                 args.budget_min, args.out)
                with (args.out / "results.jsonl").open("a") as f:
                    f.write(json.dumps(result) + "\n")
                write_report(args.out, args.reference)
    write_report(args.out, args.reference)


if __name__ == "__main__":
    main()
