"""The README's quickstart, timed, then evaluated again from ``model/`` and from its checkpoint.

Usage:
    python benchmarks/quickstart.py --root ../shared/abid
    python benchmarks/quickstart.py --root ../shared/abid -- trainer.precision=32-true

Runs ``python train.py +experiment=quickstart data.root=ROOT`` (plus any overrides after ``--``)
into ``<out>/runs/qs``, then ``eval.py`` on the same block-split test photos from the exported
``model/`` and from the checkpoint the run tested. Writes ``<out>/metrics.json`` and
``<out>/confusion_matrix.png`` (the run's own) and, through ``results_io``, ``<out>/results.json``
and ``<out>/summary.md``: the training wall time in minutes (one run: one round, no ratio; compare
precisions with ``train_precision.py``), the command, machine, versions and commit, and under
``extra`` the eval commands, the precision the trainer chose, the calibration, both evaluations and
whether their ``predictions.csv`` equal the run's byte for byte.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bincount.atomic import atomic_write
from bincount.models.export import read_model_card
from bincount.precision import cpu_has_bf16
from results_io import add_out_argument, write_results  # benchmarks/ is on sys.path

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
    add_out_argument(parser, "quickstart")
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

    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.json", "confusion_matrix.png"):  # the run's own report, kept beside the timing
        with atomic_write(args.out / name, "wb") as f:
            f.write((run_dir / name).read_bytes())
    test = evals["model_dir"]
    write_results(
        args.out, name="quickstart", unit="minutes", rounds={"train wall time": [wall / 60]},
        what=f"Wall time of the README's quickstart ({shlex_join(train_cmd)}: train, test, calibrate, export), one "
             f"run, then eval.py from model/ and from the tested checkpoint: test acc {test['acc']:.3f}, "
             f"MAE {test['mae']:.3f} (n = {test['n']}).",
        config={"root": str(args.root), "overrides": args.overrides},
        extra={"train_command": shlex_join(train_cmd), "eval_commands": eval_cmds,
               "precision": {"chosen": chosen.group(1), "reason": chosen.group(2)} if chosen else "set by an override",
               "cpu_bf16_instructions": cpu_has_bf16(), "train_wall_min": wall / 60,
               "tested_checkpoint": card.checkpoint,
               "calibration": card.calibration and card.calibration.model_dump(), "eval": evals})


if __name__ == "__main__":
    main()
