"""Evaluate an exported model or a checkpoint on a folder of ABID photos (see ``bincount.evaluate``).

Usage:
    python eval.py model_dir=outputs/RUN/model data.root=../shared/abid data.split=all
"""

from bincount.evaluate import main

if __name__ == "__main__":
    main()
