"""Train a bin-count model (see ``bincount.train``).

Usage:
    python train.py +experiment=quickstart data.root=../shared/abid
"""

from bincount.train import main

if __name__ == "__main__":
    main()
