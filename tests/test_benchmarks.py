"""The benchmarks' shared result writer, on fake rounds, and every benchmark script's ``--help``."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py") if p.name != "results_io.py")
sys.path.insert(0, str(BENCHMARKS))

import results_io  # noqa: E402


def test_alternate_runs_the_sides_abba_and_keeps_every_round():
    calls = []

    def side(name, values):
        return lambda r: calls.append((name, r)) or values[r]

    rounds, order = results_io.alternate({"a": side("a", [1, 2, 3, 4]), "b": side("b", [10, 20, 30, 40])}, 4)
    assert order == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert calls == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2), ("b", 3), ("a", 3)]
    assert rounds == {"a": [1, 2, 3, 4], "b": [10, 20, 30, 40]}
    _, order = results_io.alternate({"a": lambda r: 0, "b": lambda r: 0}, 2, order="ABAB")
    assert order == ["a", "b", "a", "b"]


def test_write_results_fields_medians_and_paired_ratio(tmp_path):
    # Hand-computed: plain rounds 10, 12, 8, 11 -> median 10.5, min 8, max 12, q1 9.5, q3 11.25.
    # Per-round ratios fast/plain: 20/10=2, 18/12=1.5, 20/8=2.5, 22/11=2 -> median 2.0, min 1.5, max 2.5.
    # The ratio of medians (20/10.5 = 1.905) would differ: the writer must not use it.
    rounds = {"plain": [10.0, 12.0, 8.0, 11.0], "fast": [20.0, 18.0, 20.0, 22.0]}
    argv = [str(BENCHMARKS / "decode.py"), "--n", "5"]
    result = results_io.write_results(tmp_path / "out", name="fake", what="Fake rounds.", unit="images/s",
                                      rounds=rounds, order=["plain", "fast"] * 4,
                                      ratios={"fast / plain": ("fast", "plain")},
                                      setting=results_io.LOOPBACK_S3, config={"n": 5}, argv=argv)
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert on_disk["schema"] == results_io.SCHEMA and on_disk["benchmark"] == "fake"
    assert on_disk["rounds"] == rounds
    assert on_disk["stats"]["plain"] == {"n": 4, "median": 10.5, "min": 8.0, "max": 12.0, "q1": 9.5, "q3": 11.25}
    assert on_disk["stats"]["fast"]["median"] == 20.0
    ratio = on_disk["ratios"]["fast / plain"]
    assert ratio["numerator"] == "fast" and ratio["denominator"] == "plain"
    assert ratio["per_round"] == [2.0, 1.5, 2.5, 2.0]
    assert (ratio["median"], ratio["min"], ratio["max"]) == (2.0, 1.5, 2.5)
    assert on_disk["command"] == "python benchmarks/decode.py --n 5"
    assert on_disk["setting"] == "loopback S3 (SeaweedFS on 127.0.0.1)"
    assert on_disk["date_utc"].endswith("+00:00") and on_disk["started_utc"] <= on_disk["date_utc"]
    assert set(on_disk["machine"]) >= {"cpu_model", "os_cpu_count", "torch_num_threads"}
    assert set(on_disk["versions"]) == {"python", "torch", "torchvision", "lightning"}
    assert set(on_disk["git"]) == {"commit", "dirty"}
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "fast / plain: 2.000x" in summary and "min 1.500, max 2.500" in summary
    assert "loopback S3 (SeaweedFS on 127.0.0.1)" in summary
    assert "python benchmarks/decode.py --n 5" in summary
    assert not list((tmp_path / "out").glob("*.part"))


def test_a_report_rewritten_from_kept_rounds_says_its_machine_was_not_recorded(tmp_path):
    """Rounds measured by an earlier process must not be credited to this machine and commit."""
    results_io.write_results(tmp_path, name="fake", what="Kept rounds.", unit="s", rounds={"a": [1.0]},
                             provenance={}, argv=["fake.py"])
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["machine"] is None and on_disk["versions"] is None and on_disk["git"] is None
    assert "Machine, versions and commit: not recorded" in (tmp_path / "summary.md").read_text()


def test_paired_ratio_needs_one_value_per_round_on_each_side():
    with pytest.raises(ValueError, match="3 vs 2 rounds"):
        results_io.paired_ratio([1, 2, 3], [1, 2])
    with pytest.raises(KeyError, match="no side 'c'"):
        results_io.build_result(name="x", what="x", unit="s", rounds={"a": [1]}, ratios={"a / c": ("a", "c")})


def test_write_results_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    (tmp_path / "results.json").write_text("old\n")
    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(results_io.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        results_io.write_results(tmp_path, name="x", what="x", unit="s", rounds={"a": [1.0]})
    assert (tmp_path / "results.json").read_text() == "old\n"
    assert not list(tmp_path.glob("*.part"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_docstring_starts_with_usage(script):
    doc = ast.get_docstring(ast.parse(script.read_text()))
    assert doc is not None
    paragraphs = doc.split("\n\n")
    assert paragraphs[1].startswith("Usage"), f"{script.name}: the paragraph after the summary line is not Usage:"
    assert f"benchmarks/{script.name}" in paragraphs[1]


# every script run as a script (``__main__``) with --help, all in one fresh interpreter (one torch import)
HELP_ALL = """
import contextlib, io, json, os, runpy, sys
results = {}
for script in sys.argv[1:]:
    sys.argv = [script, "--help"]
    sys.path.insert(0, os.path.dirname(script))  # as `python script.py` does
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(script, run_name="__main__")
        code = "no exit"
    except SystemExit as stop:
        code = stop.code
    results[script] = {"code": code, "has_out": "--out" in out.getvalue()}
print(json.dumps(results))
"""


@pytest.mark.slow
def test_every_benchmark_help_exits_0():
    proc = subprocess.run([sys.executable, "-c", HELP_ALL, *map(str, SCRIPTS)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.splitlines()[-1])
    assert sorted(results) == sorted(map(str, SCRIPTS))
    for script, result in results.items():
        assert result["code"] in (0, None), (script, result)
        assert result["has_out"] or script.endswith("serve_floor.py"), script
