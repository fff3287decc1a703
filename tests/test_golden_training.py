"""What training computes, pinned: the golden run's per-step losses and final ``val/mae`` against
the committed values (``tests/golden/training.py`` says how they are made and regenerated)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.golden import ATOL, GOLDEN, RTOL

REPO = Path(__file__).resolve().parents[1]


def test_training_computes_the_committed_losses():
    expected = json.loads(GOLDEN.read_text())
    if torch.__version__ != expected["torch"]:  # another release's kernels round differently
        pytest.skip(f"{GOLDEN.name} was written with torch {expected['torch']}, this is {torch.__version__}: "
                    "python -m tests.golden.training --write writes this release's values")
    proc = subprocess.run([sys.executable, "-m", "tests.golden.training"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.splitlines()[-1])
    assert len(got["train_loss"]) == len(expected["train_loss"]) == 20
    torch.testing.assert_close(torch.tensor(got["train_loss"]), torch.tensor(expected["train_loss"]),
                               rtol=RTOL, atol=ATOL)
    assert got["val_mae"] == expected["val_mae"]
