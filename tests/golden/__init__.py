"""The golden training run (``tests/golden/training.py``): what it must compute, and how close.

Nothing here imports torch: a test reads these values without its process taking on the golden
run's environment, which only ``python -m tests.golden.training`` applies to itself.
"""

from pathlib import Path

GOLDEN = Path(__file__).with_name("training.json")
# one thread; ATen's kernels without AVX; MKL's matrix products in the code path whose results are
# the same on Intel and AMD CPUs (MKL's conditional numerical reproducibility)
REPRODUCIBLE = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "default",
                "MKL_CBWR": "COMPATIBLE"}
# what tests/test_golden_training.py allows: the run is meant to be bit for bit the same on every
# x86-64 CPU; what training changes (augmentation, loss, schedule, optimizer, data order) moves the
# losses by 1e-3 to 1e-1 from the first or second step on
RTOL, ATOL = 1e-5, 1e-6
