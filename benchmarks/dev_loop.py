"""Wall time of the developer's loop, side by side: the install, the README's test command, the
whole of ``.ci/run``, and the smoke run, each side in a fresh clone of its own.

Usage:
    python benchmarks/dev_loop.py --baseline c81e444 --rounds 1

Each side (the ``--baseline`` commit, then this checkout's ``HEAD``) is cloned beside the repository
(so that ``../shared/abid`` resolves as in CI) and runs ``CI=true bash .ci/run``, which installs the
project into a fresh venv as the README says and runs the tests. The install's time is the run's
wall time less its pytest runs (each pytest prints its own); the README's test command is the first
pytest run (a side whose README runs the whole suite has one). Then, where the side has it, the
smoke run: ``python train.py +experiment=smoke data.root=../shared/abid``. Nothing else may run on
the machine meanwhile: every figure is a wall time.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import REPO, add_out_argument, write_results  # noqa: E402

PYTEST_WALL = re.compile(r"^=*\s*\d+ passed.* in ([\d.]+)s", re.M)


def clone(ref: str, where: Path) -> Path:
    """A fresh clone of this repository at ``ref`` in ``where`` (replaced if it exists)."""
    shutil.rmtree(where, ignore_errors=True)
    subprocess.run(["git", "clone", "-q", str(REPO), str(where)], check=True)
    subprocess.run(["git", "-C", str(where), "checkout", "-q", ref], check=True)
    return where


def timed(command: str, cwd: Path, log: Path, timeout: float) -> tuple[float, str]:
    """Run ``command`` in bash; its wall time in seconds and its output (also written to ``log``)."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    start = time.monotonic()
    proc = subprocess.run(["bash", "-c", command], cwd=cwd, env={**env, "CI": "true"}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
    took = time.monotonic() - start
    log.write_text(proc.stdout)
    if proc.returncode != 0:
        raise RuntimeError(f"{command!r} in {cwd} exited {proc.returncode}:\n{proc.stdout[-3000:]}")
    return took, proc.stdout


def measure(name: str, ref: str, out: Path) -> dict[str, float]:
    """One side's wall times in seconds: ``install``, ``test_command``, ``ci`` and, if it has one, ``smoke``."""
    repo = clone(ref, REPO.parent / f".dev_loop-{name}")
    try:
        ci, output = timed("bash .ci/run", repo, out / f"{name}-ci.log", timeout=3600)
        pytest_walls = [float(s) for s in PYTEST_WALL.findall(output)]
        times = {"ci": ci, "test_command": pytest_walls[0], "install": ci - sum(pytest_walls)}
        if (repo / "conf" / "experiment" / "smoke.yaml").is_file():
            times["smoke"], _ = timed(". .venv-ci/bin/activate && python train.py +experiment=smoke "
                                      "data.root=../shared/abid hydra.run.dir=outputs/smoke", repo,
                                      out / f"{name}-smoke.log", timeout=1800)
        print(name, {k: round(v, 1) for k, v in times.items()}, flush=True)
        return times
    finally:
        shutil.rmtree(repo, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="the commit to compare HEAD with")
    parser.add_argument("--rounds", type=int, default=1, help="rounds; sides alternate A B B A")
    add_out_argument(parser, "dev_loop")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    sides, order = {"baseline": args.baseline, "head": head}, []
    rounds: dict[str, list[float]] = {}
    for k in range(args.rounds):
        for side in (("baseline", "head") if k % 2 == 0 else ("head", "baseline")):
            order.append(side)
            for key, value in measure(side, sides[side], args.out).items():
                rounds.setdefault(f"{side}_{key}", []).append(value)
    write_results(
        args.out, name="dev_loop", unit="s", rounds=rounds, order=order,
        what=(f"Wall time of a fresh clone's `bash .ci/run` (install + tests), of its install, of the README's test "
              f"command (the first pytest run) and of the smoke run: baseline {args.baseline[:12]} vs HEAD "
              f"{head[:12]}."),
        ratios={f"{k}: HEAD / baseline": (f"head_{k}", f"baseline_{k}")
                for k in ("ci", "install", "test_command") if f"baseline_{k}" in rounds},
        config={"baseline": args.baseline, "head": head, "rounds": args.rounds})


if __name__ == "__main__":
    main()
