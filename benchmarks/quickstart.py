"""The README's quickstart, timed, then evaluated again from ``model/`` and from its checkpoint.

Usage:
    python benchmarks/quickstart.py --root ../shared/abid
    python benchmarks/quickstart.py --root ../shared/abid -- trainer.precision=32-true

Runs ``python train.py +experiment=quickstart data.root=ROOT`` (plus any overrides after ``--``)
into ``<out>/runs/qs``, then ``eval.py`` on the same block-split test photos from the exported
``model/`` and from the checkpoint the run tested. Writes ``<out>/metrics.json`` (the run's own)
and ``<out>/run.json``: the commands, the wall time, the precision the trainer chose, the
calibration, both evaluations and whether their ``predictions.csv`` equal the run's byte for byte.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import lightning
import torch

from bincount.atomic import atomic_write
from bincount.models.export import read_model_card
from bincount.precision import cpu_has_bf16

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` in the repository with its output in ``log``; its wall time in seconds.

    Raises:
        RuntimeError: If it fails (the log's last lines in the message).
    """
    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-5:])
        raise RuntimeError(f"{shlex_join(cmd)} failed (exit {proc.returncode}); {log} ends:\n{tail}")
    return time.perf_counter() - start


def shlex_join(cmd: list[str]) -> str:
    """``cmd`` as the README writes it (``python`` for this interpreter)."""
    return shlex.join(["python", *cmd[1:]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="../shared/abid", help="ABID-layout folder (data.root)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "quickstart")
    parser.add_argument("overrides", nargs="*", help="more train.py overrides")
    args = parser.parse_args()

    run_dir = args.out / "runs" / "qs"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh run, not a resumed one
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    train_cmd = [sys.executable, "train.py", "+experiment=quickstart", f"data.root={args.root}",
                 f"hydra.run.dir={run_dir}", *args.overrides]
    train_log = run_dir.parent / "qs.log"
    wall = run(train_cmd, train_log)
    chosen = re.search(r"trainer\.precision=auto: (\S+) \((.*)\)", train_log.read_text())
    card = read_model_card(run_dir / "model")
    checkpoint = run_dir / "checkpoints" / card.checkpoint

    evals, eval_cmds = {}, []
    for name, source in (("model_dir", f"model_dir={run_dir / 'model'}"), ("ckpt_path", f"ckpt_path={checkpoint}")):
        eval_dir = args.out / "runs" / f"eval_{name}"
        cmd = [sys.executable, "eval.py", source, f"data.root={args.root}", "data.split=block",
               f"hydra.run.dir={eval_dir}"]
        eval_cmds.append(shlex_join(cmd))
        run(cmd, args.out / "runs" / f"eval_{name}.log")
        metrics = json.loads((eval_dir / "metrics.json").read_text())
        evals[name] = {k: metrics[k] for k in ("acc", "obo_acc", "mae", "rmse", "n")}
        evals[name]["predictions_equal_the_runs"] = (
            (eval_dir / "predictions.csv").read_bytes() == (run_dir / "predictions.csv").read_bytes())

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    result = {
        "command": shlex_join(train_cmd),
        "eval_commands": eval_cmds,
        "commit": commit.stdout.strip() or None,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "cpu_bf16_instructions": cpu_has_bf16(), "python": platform.python_version(),
                    "torch": torch.__version__, "lightning": lightning.__version__},
        "precision": {"chosen": chosen.group(1), "reason": chosen.group(2)} if chosen else "set by an override",
        "train_wall_min": wall / 60,
        "tested_checkpoint": card.checkpoint,
        "calibration": card.calibration and card.calibration.to_dict(),
        "eval": evals,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.out / "metrics.json", "wb") as f:
        f.write((run_dir / "metrics.json").read_bytes())
    with atomic_write(args.out / "run.json") as f:
        f.write(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("precision", "train_wall_min", "eval")}, indent=2))


if __name__ == "__main__":
    main()
