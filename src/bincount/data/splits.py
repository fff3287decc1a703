"""Train/val/test splits of ABID photos that keep near-duplicate photos of one bin on one side.

ABID ids are assigned in photo order, and neighbouring ids are often the same bin photographed
again with a slightly different count; a split at random per photo puts near-copies of a test
photo in training. :func:`block_split` keeps blocks of consecutive ids together;
:func:`per_image_split` is the common per-photo split, kept for comparison with other projects.
"""

from __future__ import annotations

from collections.abc import Sequence

from bincount.data.abid import BinRecord


def split_groups(image_ids: Sequence[str], block_size: int) -> list[str]:
    """Group key of each id: ids whose numbers fall in the same block of ``block_size``; non-numeric
    ids form their own group."""
    return [f"b{int(i) // block_size}" if i.isdigit() else f"s{i}" for i in image_ids]


def block_split(
    records: Sequence[BinRecord],
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    block_size: int = 20,
) -> dict[str, list[BinRecord]]:
    """Split records into train/val/test, stratified by count and keeping id blocks together.

    Uses scikit-learn's ``StratifiedGroupKFold`` with ``round(1 / min(fraction))`` folds: one fold
    becomes the test set, the next the validation set (so the fractions are approximate).
    The split depends only on the records and ``seed``.

    Raises:
        ValueError: If a fraction is not in (0, 0.5], or the ids make fewer blocks than the split has folds.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 < frac <= 0.5:
            raise ValueError(f"{name}={frac} must be in (0, 0.5]")
    records = sorted(records, key=lambda r: r.image_id)
    groups = split_groups([r.image_id for r in records], block_size)
    y = [r.expected_quantity for r in records]
    n_folds = max(3, round(1 / min(val_fraction, test_fraction)))
    if len(set(groups)) < n_folds:
        raise ValueError(f"{len(records)} photos in blocks of {block_size} ids make {len(set(groups))} id blocks, too few "
                         f"for a {n_folds}-fold split: use smaller blocks (data.block_size=, or --block-size for "
                         "bincount data prepare)")
    folds = list(StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed).split(y, y, groups))
    test_idx = set(folds[0][1].tolist())
    val_idx = set(folds[1][1].tolist())
    out: dict[str, list[BinRecord]] = {"train": [], "val": [], "test": []}
    for i, rec in enumerate(records):
        out["test" if i in test_idx else "val" if i in val_idx else "train"].append(rec)
    return out


def per_image_split(
    records: Sequence[BinRecord],
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    block_size: int = 20,
) -> dict[str, list[BinRecord]]:
    """The test set of :func:`block_split`, with train/val split per photo at random (stratified).

    This reproduces the per-image split common in ABID projects for comparison only: near-duplicate
    photos of one bin land on both sides of train/val, so validation scores are optimistic and
    model selection on them is biased. The test photos are the block split's, so test figures stay
    comparable with :func:`block_split` runs.

    Raises:
        ValueError: As :func:`block_split`.
    """
    from sklearn.model_selection import train_test_split

    blocks = block_split(records, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                         block_size=block_size)
    pool = sorted(blocks["train"] + blocks["val"], key=lambda r: r.image_id)
    train, val = train_test_split(pool, test_size=len(blocks["val"]), random_state=seed,
                                  stratify=[r.expected_quantity for r in pool])
    return {"train": train, "val": val, "test": blocks["test"]}
