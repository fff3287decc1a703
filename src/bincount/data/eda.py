"""The EDA report of ``bincount data prepare`` in ``OUT/eda/``: ``class_histogram.png``,
``image_sizes.png``, ``sample_grid.png`` (labelled sample photos) and ``summary.json``."""

from __future__ import annotations

import json
import random
import statistics
from collections import Counter
from pathlib import Path

from bincount.data.abid import IMAGE_DIR, BinRecord

GRID_COLUMNS = 4  # photos per count in the sample grid
GRID_ROWS = 8  # counts in the grid at most (the most frequent ones)


def write_eda(
    eda_dir: Path,
    root: Path,
    splits: dict[str, list[BinRecord]],
    *,
    summary: dict,
    seed: int = 0,
) -> dict:
    """Write the EDA report: class histogram, image sizes, a labelled sample grid and ``summary.json``.

    Args:
        eda_dir: Output folder (created).
        root: The ABID folder the photos are read from (original sizes, not resized ones).
        splits: The photos kept in each split.
        summary: Extra fields for ``summary.json`` (rejects, index report, shard stats).
        seed: Seed of the sample choice.

    Returns:
        The summary written to ``summary.json``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    eda_dir.mkdir(parents=True, exist_ok=True)
    every = [r for recs in splits.values() for r in recs]
    sizes = []
    for rec in every:
        with Image.open(root / IMAGE_DIR / f"{rec.image_id}.jpg") as img:
            sizes.append(img.size)
    all_counts = sorted({r.expected_quantity for r in every})

    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(all_counts) + 3), 4))
    bottom = [0] * len(all_counts)
    for name, recs in splits.items():
        by_count = Counter(r.expected_quantity for r in recs)
        heights = [by_count.get(c, 0) for c in all_counts]
        ax.bar(range(len(all_counts)), heights, bottom=bottom, label=f"{name} ({len(recs)})")
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xticks(range(len(all_counts)), [str(c) for c in all_counts])
    ax.set(xlabel="objects in the bin (expected_quantity)", ylabel="photos", title="Photos per count and split")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(eda_dir / "class_histogram.png", dpi=100)
    plt.close(fig)

    widths, heights = [w for w, _ in sizes], [h for _, h in sizes]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.scatter(widths, heights, s=4, alpha=0.4)
    left.set(xlabel="width (px)", ylabel="height (px)", title=f"Photo sizes ({len(sizes)} photos)")
    right.hist([min(s) for s in sizes], bins=40)
    right.set(xlabel="shorter side (px)", ylabel="photos", title="Shorter side")
    fig.tight_layout()
    fig.savefig(eda_dir / "image_sizes.png", dpi=100)
    plt.close(fig)

    rng = random.Random(seed)
    frequent = Counter(r.expected_quantity for r in every).most_common(GRID_ROWS)
    rows = sorted(c for c, _ in frequent)
    fig, axes = plt.subplots(len(rows), GRID_COLUMNS, figsize=(2.2 * GRID_COLUMNS, 2.2 * len(rows)), squeeze=False)
    for row, count in zip(axes, rows):
        ids = sorted(r.image_id for r in every if r.expected_quantity == count)
        for ax, image_id in zip(row, rng.sample(ids, min(GRID_COLUMNS, len(ids))) + [None] * GRID_COLUMNS):
            ax.axis("off")
            if image_id is None:
                continue
            with Image.open(root / IMAGE_DIR / f"{image_id}.jpg") as img:
                img = img.convert("RGB")
                img.thumbnail((256, 256))
                ax.imshow(img)
            ax.set_title(f"{image_id}: {count}", fontsize=8)
    fig.suptitle("Sample photos (id: expected_quantity)")
    fig.tight_layout()
    fig.savefig(eda_dir / "sample_grid.png", dpi=80)
    plt.close(fig)

    def stats(values: list[int]) -> dict:
        return {"min": min(values), "median": statistics.median(values), "max": max(values)} if values else {}

    result = {
        "photos": len(every),
        "by_split": {name: {"photos": len(recs), "by_count": dict(sorted(Counter(
            r.expected_quantity for r in recs).items()))} for name, recs in splits.items()},
        "by_count": dict(sorted(Counter(r.expected_quantity for r in every).items())),
        "width_px": stats(widths),
        "height_px": stats(heights),
        "source_bytes": sum((root / IMAGE_DIR / f"{r.image_id}.jpg").stat().st_size for r in every),
        **summary,
    }
    (eda_dir / "summary.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result
