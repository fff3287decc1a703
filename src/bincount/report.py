"""Evaluation reports: ``metrics.json``, ``predictions.csv`` and ``confusion_matrix.png``."""

from __future__ import annotations

import csv
import json
import textwrap
from collections.abc import Sequence
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_confusion_matrix

from bincount.models.decoding import decode_counts
from bincount.models.metrics import count_metrics

REPORT_FILES = ("metrics.json", "predictions.csv", "confusion_matrix.png")


def count_report(target: torch.Tensor, probs: torch.Tensor, *, min_count: int, decode: str = "argmax") -> dict:
    """Counting metrics of one evaluation, with the majority-class baseline on the same photos.

    Args:
        target: ``(N,)`` true class indices (count ``- min_count``).
        probs: ``(N, num_classes)`` predicted probabilities.
        min_count: Count of class 0.
        decode: The model's decoding rule (:func:`bincount.models.decoding.decode_counts`).

    Returns:
        ``acc, obo_acc, mae, rmse, n, per_class_acc, confusion_matrix, baseline_majority_count,
        baseline_majority_acc, baseline_majority_mae``. Errors are in objects; ``per_class_acc`` maps
        each count to its accuracy (``None`` where no photo has that count); the baseline always
        answers the most common true count of these photos.

    Raises:
        ValueError: If there are no predictions.
    """
    if len(target) == 0:
        raise ValueError("no predictions to report on")
    num_classes = probs.shape[1]
    _, preds = decode_counts(probs, decode)
    scalar = count_metrics(num_classes, sync_on_compute=False)  # already gathered
    for name, metric in scalar.items():
        metric.update(*((preds, target) if name == "acc" else (preds.float(), target.float())))
    out = {k: float(v) for k, v in scalar.compute().items()}
    support = torch.bincount(target, minlength=num_classes)
    acc_per_class = multiclass_accuracy(preds, target, num_classes, average=None)  # recall of each count
    majority = int(support.argmax())
    baseline = torch.full_like(target, majority)
    out.update(
        n=int(len(target)),
        per_class_acc={
            str(min_count + k): (float(acc_per_class[k]) if support[k] > 0 else None) for k in range(num_classes)
        },
        confusion_matrix=multiclass_confusion_matrix(preds, target, num_classes).tolist(),
        baseline_majority_count=min_count + majority,
        baseline_majority_acc=float((baseline == target).float().mean()),
        baseline_majority_mae=float((baseline - target).abs().float().mean()),
    )
    return out


def write_predictions_csv(path: Path, image_ids: Sequence[str], target: torch.Tensor, probs: torch.Tensor,
                          *, min_count: int, decode: str = "argmax") -> None:
    """One row per photo: ``image_id,expected_quantity,predicted,prob_<count>...``."""
    counts = range(min_count, min_count + probs.shape[1])
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "expected_quantity", "predicted", *(f"prob_{c}" for c in counts)])
        _, preds = decode_counts(probs, decode)
        for image_id, t, pred, p in zip(image_ids, target.tolist(), preds.tolist(), probs.tolist()):
            writer.writerow([image_id, t + min_count, pred + min_count, *(f"{x:.5f}" for x in p)])


TITLE_FONTSIZE = 9
TITLE_LINES = 3  # at most this many lines of title above the figures line; a longer title loses its middle


def fit_title(title: str, width: int, *, max_lines: int = TITLE_LINES) -> str:
    """``title`` in lines of at most ``width`` characters joined by newlines, breaking long words such as
    paths; a title of more than ``max_lines`` lines keeps its first line and its end, ``"…"`` between.

    Raises:
        ValueError: If ``width < 4`` or ``max_lines < 1``.
    """
    if width < 4 or max_lines < 1:
        raise ValueError(f"width={width} must be >= 4 and max_lines={max_lines} >= 1")
    lines = textwrap.wrap(title, width, break_long_words=True, break_on_hyphens=False) or [""]
    if len(lines) > max_lines:
        tail = "…" + " ".join(lines[1:])[-(width * (max_lines - 1) - 1):]
        lines = [lines[0], *(tail[i:i + width] for i in range(0, len(tail), width))]
    return "\n".join(lines)


def confusion_matrix_figure(confusion: Sequence[Sequence[int]], *, min_count: int, title: str,
                            figures: str = ""):
    """The row-normalised confusion matrix (colour) with the raw numbers in the cells.

    Args:
        confusion: ``(C, C)`` counts, rows true, columns predicted.
        min_count: Count of class 0.
        title: What was evaluated (e.g. the data path), wrapped to the picture's width (:func:`fit_title`).
        figures: A line kept whole under the title (e.g. ``"n=..., acc=..., mae=..."``).

    Returns:
        A :class:`matplotlib.figure.Figure` (no pyplot state).
    """
    from matplotlib.figure import Figure

    cm = torch.tensor(confusion, dtype=torch.float64)
    norm = cm / cm.sum(dim=1, keepdim=True).clamp(min=1)
    labels = [str(min_count + k) for k in range(len(cm))]
    width_in = max(4.0, 1.0 + 0.8 * len(cm))  # room for the figures line at any class count
    fig = Figure(figsize=(width_in, 1.2 + 0.8 * len(cm)), dpi=120)
    ax = fig.subplots()
    im = ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    for i in range(len(cm)):
        for j in range(len(cm)):
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center",
                    color="white" if norm[i, j] > 0.5 else "black", fontsize=9)
    ax.set_xticks(range(len(cm)), labels)
    ax.set_yticks(range(len(cm)), labels)
    ax.set_xlabel("predicted count")
    ax.set_ylabel("true count")
    chars = int(0.9 * width_in * 72 / (0.6 * TITLE_FONTSIZE))  # ~0.6 em per character, inside the margins
    fig.suptitle("\n".join(filter(None, [fit_title(title, chars) if title else "", figures])),
                 fontsize=TITLE_FONTSIZE)
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of true count")
    fig.tight_layout()
    return fig


def write_report(out_dir: Path, image_ids: Sequence[str], target: torch.Tensor, probs: torch.Tensor,
                 *, min_count: int, title: str, decode: str = "argmax", extra: dict | None = None) -> dict:
    """Write :data:`REPORT_FILES` into ``out_dir``: ``metrics.json`` (:func:`count_report` plus
    ``extra``), ``predictions.csv`` and ``confusion_matrix.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_json, predictions_csv, confusion_png = (out_dir / name for name in REPORT_FILES)
    metrics = {**count_report(target, probs, min_count=min_count, decode=decode), "decode": decode, **(extra or {})}
    metrics_json.write_text(json.dumps(metrics, indent=2) + "\n")
    write_predictions_csv(predictions_csv, image_ids, target, probs, min_count=min_count, decode=decode)
    figures = f"n={metrics['n']}, acc={metrics['acc']:.3f}, mae={metrics['mae']:.3f}"
    confusion_matrix_figure(metrics["confusion_matrix"], min_count=min_count, title=title,
                            figures=figures).savefig(confusion_png)
    return metrics


def print_report(metrics: dict, title: str) -> None:
    """Print the metrics beside the majority-class baseline as a rich table."""
    table = Table(title=title)
    table.add_column("")
    table.add_column("model", justify="right")
    table.add_column(f"always {metrics['baseline_majority_count']}", justify="right")
    table.add_row("acc", f"{metrics['acc']:.3f}", f"{metrics['baseline_majority_acc']:.3f}")
    table.add_row("obo_acc", f"{metrics['obo_acc']:.3f}", "")
    table.add_row("mae", f"{metrics['mae']:.3f}", f"{metrics['baseline_majority_mae']:.3f}")
    table.add_row("rmse", f"{metrics['rmse']:.3f}", "")
    table.add_row("n", str(metrics["n"]), str(metrics["n"]))
    for count, acc in metrics["per_class_acc"].items():
        table.add_row(f"acc[{count}]", "-" if acc is None else f"{acc:.3f}", "")
    Console().print(table)
