"""Result files of the benchmarks: every round, medians, paired ratios, machine, versions, commit.

Usage (from a benchmark script; ``benchmarks/`` is on ``sys.path`` when one runs):
    from results_io import add_out_argument, alternate, write_results

    parser = argparse.ArgumentParser(...)
    add_out_argument(parser, "decode")                  # --out, default benchmarks/results/decode
    rounds, order = alternate({"pil": run_pil, "torchvision": run_tv}, rounds=3)
    write_results(args.out, name="decode", what="...", unit="photos/s", rounds=rounds, order=order,
                  ratios={"torchvision / pil": ("torchvision", "pil")})

Writes ``<out>/results.json`` (through a temporary file and a rename, so it is complete or
absent) and ``<out>/summary.md`` (what was measured, the headline ratio with its spread, the
command). A ratio is the median of per-round ratios: round ``k`` of one side divided by round
``k`` of the other, the sides having run back to back in that round (see :func:`alternate`), so
machine load that drifts between rounds cancels out of each ratio. Plain Python and the standard
library only (``torch`` and friends are imported only to report their versions).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SCHEMA = "bincount-benchmark/1"
LOOPBACK_S3 = "loopback S3 (SeaweedFS on 127.0.0.1)"


def _now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def add_out_argument(parser: argparse.ArgumentParser, name: str) -> None:
    """``--out DIR``, default ``benchmarks/results/<name>``."""
    parser.add_argument("--out", type=Path, default=RESULTS / name,
                        help=f"folder of results.json and summary.md (default: benchmarks/results/{name})")


def alternate(sides: Mapping[str, Callable[[int], float]], rounds: int,
              order: str = "ABBA") -> tuple[dict[str, list[float]], list[str]]:
    """Run every side once per round, the sides back to back, so all see the same machine load.

    Args:
        sides: ``{name: fn(round_index) -> value}``.
        rounds: How many rounds.
        order: ``"ABBA"`` (the order reversed every other round, so neither side always runs
            first) or ``"ABAB"`` (the same order every round).

    Returns:
        ``({name: [value per round]}, [name, ...] in the order they ran)``.
    """
    if order not in ("ABBA", "ABAB"):
        raise ValueError(f"order={order!r}: must be 'ABBA' or 'ABAB'")
    names = list(sides)
    values: dict[str, list[float]] = {name: [] for name in names}
    ran: list[str] = []
    for r in range(rounds):
        for name in (names[::-1] if order == "ABBA" and r % 2 else names):
            values[name].append(float(sides[name](r)))
            ran.append(name)
    return values, ran


def spread(values: Sequence[float]) -> dict[str, float | int]:
    """Median, min, max and quartiles (``statistics.quantiles``, inclusive) of ``values``."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("no values")
    q1, q3 = (statistics.quantiles(values, n=4, method="inclusive")[i] for i in (0, 2)) if len(values) > 1 \
        else (values[0], values[0])
    return {"n": len(values), "median": statistics.median(values), "min": min(values), "max": max(values),
            "q1": q1, "q3": q3}


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> dict:
    """Per-round ratios ``numerator[k] / denominator[k]`` and their :func:`spread`.

    Raises:
        ValueError: If the two sides have different numbers of rounds.
    """
    if len(numerator) != len(denominator):
        raise ValueError(f"{len(numerator)} vs {len(denominator)} rounds: a paired ratio needs one of each per round")
    per_round = [n / d for n, d in zip(numerator, denominator)]
    return {"per_round": per_round, **spread(per_round)}


def git_state(repo: Path = REPO) -> dict[str, str | bool | None]:
    """``{"commit": full sha or None, "dirty": bool or None}`` of ``repo`` (untracked files ignored)."""
    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def cpu_model() -> str | None:
    """``model name`` of ``/proc/cpuinfo`` (None where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine() -> dict:
    """CPU model, core count and torch's intra-op threads of this process."""
    import torch

    return {"cpu_model": cpu_model(), "os_cpu_count": os.cpu_count(), "torch_num_threads": torch.get_num_threads(),
            "platform": platform.platform(), "machine": platform.machine()}


def versions() -> dict[str, str | None]:
    """python, torch, torchvision and lightning versions (None when one is not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for package in ("torch", "torchvision", "lightning"):
        try:  # __version__ carries the build (2.14.1+cu130), which the distribution's metadata may not
            out[package] = importlib.import_module(package).__version__
        except ImportError:
            out[package] = None
    return out


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command as typed from the repository root: ``python benchmarks/<script> args...``."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve() if argv else Path("?")
    try:
        script_name = str(script.relative_to(REPO))
    except ValueError:
        script_name = argv[0] if argv else "?"
    return shlex.join(["python", script_name, *argv[1:]])


def build_result(*, name: str, what: str, unit: str | Mapping[str, str], rounds: Mapping[str, Sequence[float]],
                 order: Sequence[str] | None = None, ratios: Mapping[str, tuple[str, str]] | None = None,
                 setting: str | None = None, config: Mapping | None = None, extra: Mapping | None = None,
                 argv: Sequence[str] | None = None, provenance: Mapping | None = None) -> dict:
    """The ``results.json`` document (see :func:`write_results` for the arguments)."""
    ratios = dict(ratios or {})
    for label, (num, den) in ratios.items():
        for side in (num, den):
            if side not in rounds:
                raise KeyError(f"ratio {label!r}: no side {side!r} in rounds {sorted(rounds)}")
    return {
        "schema": SCHEMA,
        "benchmark": name,
        "what": what,
        "setting": setting,
        "unit": unit if isinstance(unit, str) else dict(unit),
        "command": command_line(argv),
        "date_utc": _now_utc(),
        "started_utc": STARTED_UTC,
        "rounds": {side: [float(v) for v in values] for side, values in rounds.items()},
        "order": list(order) if order is not None else None,
        "stats": {side: spread(values) for side, values in rounds.items() if len(values)},
        "ratios": {label: {"numerator": num, "denominator": den, **paired_ratio(rounds[num], rounds[den])}
                   for label, (num, den) in ratios.items()},
        "config": dict(config or {}),
        "extra": dict(extra or {}),
        **({"machine": machine(), "versions": versions(), "git": GIT_AT_START} if provenance is None
           else {key: provenance.get(key) for key in ("machine", "versions", "git")}),
    }


def _g(x: float) -> str:
    return f"{x:.4g}"


def summary_markdown(result: Mapping) -> str:
    """A few lines: what was measured, where, the headline ratios and medians with their spread, the command."""
    unit = result["unit"]
    lines = [f"# {result['benchmark']}", "", result["what"]]
    if result.get("setting"):
        lines.append(f"Setting: {result['setting']}.")
    lines.append("")
    for label, r in result["ratios"].items():
        lines.append(f"- **{label}: {r['median']:.3f}x** (median of {r['n']} per-round ratios; "
                     f"min {r['min']:.3f}, max {r['max']:.3f})")
    for side, s in result["stats"].items():
        side_unit = unit if isinstance(unit, str) else unit.get(side, "")
        lines.append(f"- {side}: median {_g(s['median'])} {side_unit} over {s['n']} rounds "
                     f"(min {_g(s['min'])}, max {_g(s['max'])})")
    m, v, g = result["machine"], result["versions"], result["git"]
    if len(result["stats"]) > 1 and result.get("order"):
        how = "Every round runs the sides back to back (the order they ran: `order` in results.json)"
    elif len(result["stats"]) > 1:
        how = "Order of the rounds not recorded"
    else:
        how = "One side, no ratio"
    if m and v and g:
        commit = (g["commit"] or "unknown")[:12] + (" (dirty tree)" if g["dirty"] else "")
        where = (f"Machine: {m['cpu_model']}, {m['os_cpu_count']} CPUs, torch threads {m['torch_num_threads']}; "
                 f"python {v['python']}, torch {v['torch']}, torchvision {v['torchvision']}, "
                 f"lightning {v['lightning']}; commit {commit}; {result['date_utc']}.")
    else:
        where = f"Machine, versions and commit: not recorded with the rounds; written {result['date_utc']}."
    lines += ["", f"{how}; all values are in results.json.", where, "", "```", result["command"], "```", ""]
    return "\n".join(lines)


def write_results(out: Path | str, **kwargs) -> dict:
    """Write ``<out>/results.json`` and ``<out>/summary.md``, each atomically; print the summary.

    The document carries the commit and dirty flag as they were when this module was imported
    (the benchmark's start) and both the start and the end time (``started_utc``, ``date_utc``).

    Args:
        out: Folder (created if missing).
        name: The benchmark (``decode``, ``train_loop``, ...).
        what: One or two sentences: what was measured, on what.
        unit: Unit of the round values (``"images/s"``), or ``{side: unit}``.
        rounds: ``{side: [value of round k, ...]}``, raw, in round order.
        order: The sides in the order they ran (from :func:`alternate`).
        ratios: ``{label: (numerator side, denominator side)}``; each is the median of per-round ratios.
        setting: Where it ran when tables must say so (``LOOPBACK_S3``).
        config: The settings of the run (sizes, rounds, workers, ...).
        extra: Anything else worth keeping (per-request latencies, a run's metrics, ...).
        argv: The command line (default ``sys.argv``).
        provenance: ``{"machine", "versions", "git"}`` of the rounds when they were measured by an
            earlier process (a report rewritten from kept rounds); a value ``None`` is written as
            not recorded. Default: this process's.

    Returns:
        The ``results.json`` document.
    """
    result = build_result(**kwargs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = summary_markdown(result)
    _atomic_write_text(out / "results.json", json.dumps(result, indent=2) + "\n")
    _atomic_write_text(out / "summary.md", text)
    print(text)
    print(f"wrote {out / 'results.json'} and {out / 'summary.md'}")
    return result


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.part")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# When the benchmark started (this module is imported at its start): the commit it ran, not one
# made while it ran.
STARTED_UTC = _now_utc()
GIT_AT_START = git_state()
