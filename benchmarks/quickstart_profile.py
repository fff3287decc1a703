"""Where the quickstart's minutes go: each phase of one run of the README's main job.

Usage:
    python benchmarks/quickstart_profile.py --root ../shared/abid
    python benchmarks/quickstart_profile.py --root ../shared/abid --repo ../baseline-clone   # another checkout
    python benchmarks/quickstart_profile.py --root ../shared/abid -- trainer.max_epochs=2    # a shorter run

Runs ``python train.py +experiment=quickstart data.root=ROOT`` (plus any overrides after ``--``) with
Lightning's ``SimpleProfiler`` (its report of every hook's time) and the ``MetricLines`` callback
(one log line per event, each stamped here on arrival), and splits the wall time into phases:

- ``start``: the interpreter, imports and the Hydra config, up to ``Seed set``;
- ``data setup``: the photo index and the decoded-photo cache (the data module's ``setup``);
- per training step: ``forward`` (the module's ``training_step``: forward, loss, train metrics),
  ``backward``, ``optimizer`` (the rest of the optimizer step: AdamW and the schedule),
  ``data wait`` (waiting for the next batch), ``EMA`` (the weight average's update);
- per epoch: ``validation`` and ``checkpoints`` (writing ``last.ckpt`` and the best);
- ``test``, then ``calibration, report and export``, then the process's end.

``--repo`` runs another checkout's ``train.py`` and ``bincount`` (its ``src/`` first on the path)
with this interpreter's packages: a side-by-side comparison of two commits on one machine.
Writes ``<out>/results.json`` and ``<out>/summary.md`` (``results_io``) and keeps the run's log.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import REPO, add_out_argument, write_results  # noqa: E402

# a SimpleProfiler report row: |  action  |  mean (s)  |  calls  |  total (s)  |  percent  |
PROFILE_ROW = re.compile(r"^\|\s+(.+?)\s+\|\s+([-\d.e]+)\s+\|\s+(\d+)\s+\|\s+([\d.e-]+)\s+\|", re.M)
STEP_ACTIONS = {  # phase -> the profiler's action (a name that ends so)
    "forward": "SingleDeviceStrategy.training_step",
    "backward": "SingleDeviceStrategy.backward",
    "data wait": "[_TrainingEpochLoop].train_dataloader_next",
    "EMA": "WeightAveraging.on_train_batch_end",  # EMAWeightAveraging or WeightAveraging
}
MARKS = {  # the log line that ends each phase
    "seed": "Seed set to",
    "fit start": "[bincount] fit start",
    "train start": "[bincount] train start",
    "fit end": "[bincount] fit end",
    "test": "[bincount] test ",
    "exported": "run folder: ",
}


def profile_rows(path: Path) -> dict[str, dict[str, float]]:
    """``{action: {"mean": s, "calls": n, "total": s}}`` of a ``SimpleProfiler`` report file."""
    rows = {}
    for action, mean, calls, total in PROFILE_ROW.findall(path.read_text()):
        if action not in ("Action", "Total"):
            rows[action] = {"mean": float(mean) if mean != "-" else 0.0, "calls": int(calls), "total": float(total)}
    return rows


def action_total(rows: dict[str, dict[str, float]], suffix: str) -> float:
    """Total seconds of the actions whose name ends with ``suffix`` (0 when none ran)."""
    return sum(r["total"] for name, r in rows.items() if name.endswith(suffix))


def run_profiled(repo: Path, root: str, run_dir: Path, overrides: list[str], log: Path) -> tuple[float, dict]:
    """One profiled quickstart in ``repo``; its wall time (s) and the arrival time (s) of each :data:`MARKS` line.

    Raises:
        RuntimeError: If the run fails (the log's last lines in the message).
    """
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh run, not a resumed one
    profiler = f"{{_target_: lightning.pytorch.profilers.SimpleProfiler, dirpath: {run_dir}, filename: profile}}"
    cmd = [sys.executable, "train.py", "+experiment=quickstart", f"data.root={root}", f"hydra.run.dir={run_dir}",
           f"+trainer.profiler={profiler}", "+callbacks.metric_lines={_target_: bincount.callbacks.MetricLines}",
           *overrides]
    env = {**os.environ, "PYTHONPATH": str(repo / "src"), "PYTHONUNBUFFERED": "1"}  # lines stamped as printed
    marks: dict[str, float] = {}
    start = time.monotonic()
    with log.open("w") as f, subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                              text=True) as proc:
        for line in proc.stdout:
            now = time.monotonic() - start
            f.write(f"{now:9.3f} {line}")
            for name, text in MARKS.items():
                if text in line and name not in marks:
                    marks[name] = now
    wall = time.monotonic() - start
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-5:])
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}); {log} ends:\n{tail}")
    return wall, marks


def phases(wall: float, marks: dict[str, float], fit: dict[str, dict[str, float]]) -> dict[str, float]:
    """The run's wall time split into phases (seconds; see the module docstring). They add up to ``wall``.

    The training loop (from ``train start`` to ``fit end``) is split by the profiler's actions; what
    none of them covers (Lightning's hooks, logging, metric aggregation, the schedule) is ``loop: other``.
    Validation includes Lightning's sanity check (two batches before training starts), which is
    taken out of ``fit set-up``.
    """
    steps = {name: action_total(fit, suffix) for name, suffix in STEP_ACTIONS.items()}
    steps["optimizer"] = action_total(fit, "BinCountModule.optimizer_step") - steps["forward"] - steps["backward"]
    validation = action_total(fit, "SingleDeviceStrategy.validation_step") + action_total(fit, "val_next")
    val_batch = fit.get("[_EvaluationLoop].val_next", {}).get("mean", 0.0) + next(
        (r["mean"] for name, r in fit.items() if name.endswith("validation_step")), 0.0)
    sanity = 2 * val_batch  # Lightning's num_sanity_val_steps
    checkpoints = action_total(fit, "save_checkpoint")
    setup = action_total(fit, "DataModule.setup")
    loop = marks["fit end"] - marks["train start"]
    out = {"start": marks["seed"], "data setup": setup,
           "fit set-up (model, sanity check)": marks["train start"] - marks["seed"] - setup - sanity,
           **{f"step: {k}": v for k, v in steps.items()}, "validation": validation, "checkpoints": checkpoints}
    out["loop: other (hooks, logging, metrics)"] = loop + sanity - sum(steps.values()) - validation - checkpoints
    out["test"] = marks["test"] - marks["fit end"]
    out["calibration, report and export"] = marks["exported"] - marks["test"]
    out["end (MLflow, teardown)"] = wall - marks["exported"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="../shared/abid", help="ABID-layout folder (data.root)")
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose train.py runs (default: this one)")
    add_out_argument(parser, "quickstart_profile")
    parser.add_argument("overrides", nargs="*", help="more train.py overrides")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    run_dir = (args.out / "run").resolve()
    wall, marks = run_profiled(args.repo.resolve(), args.root, run_dir, args.overrides, args.out / "train.log")
    fit = profile_rows(run_dir / "fit-profile.txt")
    split = phases(wall, marks, fit)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    commit = subprocess.run(["git", "-C", str(args.repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    shutil.rmtree(run_dir)  # the profile is the result; the run's checkpoints are hundreds of MB
    write_results(
        args.out, name="quickstart_profile", unit="seconds", rounds={"wall": [wall]},
        what=f"Where the wall time of one quickstart run goes ({' '.join(args.overrides) or 'as the README runs it'}; "
             f"train.py of {args.repo.name} at {commit[:12]}), split by Lightning's SimpleProfiler and the run's "
             "log lines: " + "; ".join(f"{k} {v:.1f} s" for k, v in split.items()) + ".",
        config={"root": args.root, "overrides": args.overrides, "repo_commit": commit.strip()},
        extra={"phases_s": split, "phase_share": {k: v / wall for k, v in split.items()},
               "steps": fit.get("run_training_batch", {}).get("calls"),
               "test": {k: metrics[k] for k in ("acc", "obo_acc", "mae", "rmse", "n")},
               "profiler_fit": fit, "marks_s": marks})


if __name__ == "__main__":
    main()
