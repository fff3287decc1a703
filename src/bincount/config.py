"""Where the Hydra config tree lives, for a source checkout and for an installed wheel."""

from __future__ import annotations

from pathlib import Path

import bincount


def config_dir() -> str:
    """Absolute path of ``conf/``: the repository's in a checkout, the packaged copy in a wheel.

    Raises:
        FileNotFoundError: If neither exists.
    """
    package = Path(bincount.__file__).resolve().parent
    for candidate in (package / "conf", package.parents[1] / "conf"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"bincount's conf/ not found next to {package}")
