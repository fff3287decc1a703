"""``bincount runs compare``: tracked runs side by side, from an MLflow tracking store.

Usage:
    bincount runs compare --out comparison/
    bincount runs compare --experiment bincount --filter "params.seed = '42'" --out comparison/

Writes into ``--out`` ``runs.csv`` and ``runs.md`` (one row per run of one experiment, best
``test/mae`` first: name, id, the params that differ between the runs, the test metrics) and
``val_mae.png`` (each run's validation MAE per epoch). MLflow is imported when a function runs.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from bincount.atomic import atomic_write
from bincount.tracking import SWEEP_DIR_TAG

DEFAULT_EXPERIMENT = "bincount"  # conf/logger/mlflow.yaml's experiment_name
TEST_METRICS = ("test/acc", "test/obo_acc", "test/mae", "test/rmse")
CURVE_METRIC = "val/mae"
RUN_DIR_PARAM = "paths/output_dir"  # params under this folder name the run, they do not describe it
MAX_RUNS = 1000  # MLflow's page size for a run search
OUTPUT_FILES = ("runs.csv", "runs.md", "val_mae.png")


@dataclass(frozen=True)
class Comparison:
    """The runs of a comparison, as written.

    Attributes:
        header: Column names: ``run``, ``run_id``, the differing params, :data:`TEST_METRICS`.
        rows: One list per run, in ``header``'s order; a metric the run lacks is ``None``.
        curves: Run name -> ``(epochs, values)`` of :data:`CURVE_METRIC`.
    """

    header: list[str]
    rows: list[list]
    curves: dict[str, tuple[list[float], list[float]]]


def find_runs(client, experiment: str, filter_string: str = "", max_runs: int = MAX_RUNS) -> list:
    """The newest ``max_runs`` ``mlflow.entities.Run`` of ``experiment`` that match ``filter_string``
    (an MLflow search filter), sweep parents (:data:`bincount.tracking.SWEEP_DIR_TAG`) left out.

    Raises:
        ValueError: If there is no such experiment, or no run in it matches.
        mlflow.exceptions.MlflowException: If the store refuses the search (a malformed filter).
    """
    found = client.get_experiment_by_name(experiment)
    where = f"at {client.tracking_uri}"
    if found is None:
        names = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise ValueError(f"no experiment {experiment!r} {where} (experiments there: {names})")
    runs = [run for run in client.search_runs([found.experiment_id], filter_string=filter_string,
                                              max_results=max_runs, order_by=["attributes.start_time DESC"])
            if SWEEP_DIR_TAG not in run.data.tags]
    if not runs:
        raise ValueError(f"no runs in experiment {experiment!r} {where}"
                         + (f" match {filter_string!r}" if filter_string else ""))
    return runs


def differing_params(runs: list) -> list[str]:
    """Names of the params whose values differ between ``runs`` (missing counts as a value), sorted;
    params that name the run's own folder (under its ``paths/output_dir``) left out."""
    keys = sorted({k for run in runs for k in run.data.params})

    def names_run_folder(run, key: str) -> bool:
        folder = run.data.params.get(RUN_DIR_PARAM)
        return bool(folder) and run.data.params.get(key, "").startswith(folder)

    return [k for k in keys if len({run.data.params.get(k) for run in runs}) > 1
            and not any(names_run_folder(run, k) for run in runs)]


def curve(client, run_id: str) -> tuple[list[float], list[float]]:
    """``(epochs, values)`` of :data:`CURVE_METRIC`: its history, each step placed at the ``epoch`` Lightning
    logged with it (the step itself where there is none)."""
    epoch_at = {m.step: m.value for m in client.get_metric_history(run_id, "epoch")}
    history = sorted(client.get_metric_history(run_id, CURVE_METRIC), key=lambda m: m.step)
    return [epoch_at.get(m.step, m.step) for m in history], [m.value for m in history]


def compare(client, experiment: str = DEFAULT_EXPERIMENT, filter_string: str = "",
            max_runs: int = MAX_RUNS) -> Comparison:
    """The :class:`Comparison` of the runs :func:`find_runs` returns, best ``test/mae`` first
    (runs without one last).

    Raises:
        ValueError, mlflow.exceptions.MlflowException: See :func:`find_runs`.
    """
    runs = find_runs(client, experiment, filter_string, max_runs)
    params = differing_params(runs)
    runs.sort(key=lambda run: run.data.metrics.get("test/mae", math.inf))
    rows = [[run.info.run_name, run.info.run_id, *(run.data.params.get(k) for k in params),
             *(run.data.metrics.get(k) for k in TEST_METRICS)] for run in runs]
    curves = {f"{run.info.run_name} ({run.info.run_id[:8]})": curve(client, run.info.run_id) for run in runs}
    return Comparison(["run", "run_id", *params, *TEST_METRICS], rows, curves)


def write_comparison(comparison: Comparison, out: Path) -> None:
    """Write :data:`OUTPUT_FILES` into ``out``, each atomically.

    Raises:
        OSError: If a file cannot be written.
    """
    from matplotlib.figure import Figure
    from tabulate import tabulate

    out.mkdir(parents=True, exist_ok=True)
    table_csv, table_md, curves_png = (out / name for name in OUTPUT_FILES)
    with atomic_write(table_csv, newline="") as f:
        writer = csv.writer(f)
        writer.writerow(comparison.header)
        writer.writerows(["" if v is None else v for v in row] for row in comparison.rows)
    with atomic_write(table_md) as f:
        f.write(tabulate(comparison.rows, comparison.header, tablefmt="github", floatfmt=".4f", missingval="-") + "\n")
    fig = Figure(figsize=(7, 4.5), dpi=120)  # no pyplot state
    ax = fig.subplots()
    for name, (epochs, values) in comparison.curves.items():
        if values:
            ax.plot(epochs, values, marker="o", markersize=3, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{CURVE_METRIC} (objects per photo)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    with atomic_write(curves_png, "wb") as f:
        fig.savefig(f, format="png")


def existing_store(tracking_uri: str | None) -> str:
    """``tracking_uri`` (``None``: MLflow's own, ``$MLFLOW_TRACKING_URI`` or ``mlflow.db`` here), checked
    to exist when it is a SQLite file: MLflow would create an empty store to search in.

    Raises:
        ValueError: If it names a SQLite file that does not exist.
    """
    import mlflow
    from sqlalchemy.engine import make_url

    uri = tracking_uri or mlflow.get_tracking_uri()
    if uri.startswith("sqlite:"):
        database = make_url(uri).database
        if database and database != ":memory:" and not Path(database).is_file():
            raise ValueError(f"no MLflow store at {uri}: {database} does not exist (run train.py with logger=mlflow "
                             "in this folder first, or pass --tracking-uri)")
    return uri


def compare_runs(out: str | Path, *, tracking_uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT,
                 filter_string: str = "", max_runs: int = MAX_RUNS) -> Comparison:
    """:func:`compare` the runs at ``tracking_uri`` and :func:`write_comparison` them into ``out``.

    Args:
        out: Folder for :data:`OUTPUT_FILES`.
        tracking_uri: An MLflow tracking URI; ``None``: ``$MLFLOW_TRACKING_URI``, else MLflow's default.

    Raises:
        ValueError: See :func:`existing_store` and :func:`find_runs`.
        mlflow.exceptions.MlflowException: If the store cannot be reached or refuses the search.
        OSError: If a file cannot be written.
    """
    from mlflow import MlflowClient

    comparison = compare(MlflowClient(existing_store(tracking_uri)), experiment, filter_string, max_runs)
    write_comparison(comparison, Path(out))
    return comparison
