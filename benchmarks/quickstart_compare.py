"""The README's quickstart, side by side: a baseline commit and this checkout, wall time and test figures.

Usage:
    python benchmarks/quickstart_compare.py --baseline 8cbafae --seeds 42 43

Clones ``--baseline`` beside the repository and runs ``python train.py +experiment=quickstart
data.root=ROOT seed=S`` in it and in this checkout, alternating (A B B A: round ``k`` runs both
sides with the ``k``-th seed, the order reversed every other round), each run profiled as
``quickstart_profile.py`` does (its phases are kept per run). Nothing else may run on the machine
meanwhile: every figure is a wall time. The wall-time ratio is the median of the per-round
ratios; the test figures (block-split test photos) are compared as the recipe comparison does:
mean +- sd over the seeds on each side, and the difference of the means with 2 standard errors.
Writes ``<out>/results.json`` and ``<out>/summary.md`` (``results_io``) and each run's log.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quickstart_profile import phases, profile_rows, run_profiled  # noqa: E402
from results_io import REPO, add_out_argument, write_results  # noqa: E402

TEST_METRICS = ("acc", "obo_acc", "mae", "rmse")


def compare_means(a: list[float], b: list[float]) -> dict[str, float]:
    """Mean and sd of each side, and ``b - a`` with two standard errors (Welch's, from the two sds)."""
    sd = [statistics.stdev(x) if len(x) > 1 else 0.0 for x in (a, b)]
    se = math.sqrt(sd[0] ** 2 / len(a) + sd[1] ** 2 / len(b))
    return {"baseline_mean": statistics.mean(a), "baseline_sd": sd[0], "head_mean": statistics.mean(b),
            "head_sd": sd[1], "difference": statistics.mean(b) - statistics.mean(a), "two_se": 2 * se}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="the commit to compare this checkout with")
    parser.add_argument("--root", default=str(REPO.parent / "shared" / "abid"), help="ABID-layout folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43], help="one round per seed")
    add_out_argument(parser, "quickstart_compare")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    baseline = REPO.parent / ".quickstart-baseline"
    shutil.rmtree(baseline, ignore_errors=True)
    subprocess.run(["git", "clone", "-q", str(REPO), str(baseline)], check=True)
    subprocess.run(["git", "-C", str(baseline), "checkout", "-q", args.baseline], check=True)
    sides = {"baseline": baseline, "head": REPO}
    rounds: dict[str, list[float]] = {name: [] for name in sides}
    runs, order = [], []
    try:
        for k, seed in enumerate(args.seeds):
            for name in (list(sides)[::-1] if k % 2 else list(sides)):
                run_dir = (args.out / "runs" / f"{name}-seed{seed}").resolve()
                wall, marks = run_profiled(sides[name], args.root, run_dir, [f"seed={seed}"],
                                           args.out / f"{name}-seed{seed}.log")
                metrics = json.loads((run_dir / "metrics.json").read_text())
                runs.append({"side": name, "seed": seed, "wall_s": wall,
                             "phases_s": phases(wall, marks, profile_rows(run_dir / "fit-profile.txt")),
                             "test": {m: metrics[m] for m in (*TEST_METRICS, "n")}})
                rounds[name].append(wall / 60)
                order.append(name)
                shutil.rmtree(run_dir)  # checkpoints: hundreds of MB
                print(f"{name} seed {seed}: {wall / 60:.2f} min, test MAE {metrics['mae']:.3f}", flush=True)
    finally:
        shutil.rmtree(baseline, ignore_errors=True)
    test = {m: compare_means([r["test"][m] for r in runs if r["side"] == "baseline"],
                             [r["test"][m] for r in runs if r["side"] == "head"]) for m in TEST_METRICS}
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    write_results(
        args.out, name="quickstart_compare", unit="minutes", rounds=rounds, order=order,
        ratios={"head / baseline wall time": ("head", "baseline")},
        what=f"Wall time of the README's quickstart (train, test, calibrate, export) at {args.baseline} (baseline) and "
             f"{head[:12]} (head), each in its own checkout, alternating A B B A with seeds {args.seeds}. Test MAE "
             f"(n = {runs[0]['test']['n']}): baseline {test['mae']['baseline_mean']:.3f} +- "
             f"{test['mae']['baseline_sd']:.3f}, head {test['mae']['head_mean']:.3f} +- {test['mae']['head_sd']:.3f}; "
             f"difference {test['mae']['difference']:+.3f} (2 SE {test['mae']['two_se']:.3f}).",
        config={"baseline": args.baseline, "head": head, "root": args.root, "seeds": args.seeds},
        extra={"test": test, "runs": runs})


if __name__ == "__main__":
    main()
