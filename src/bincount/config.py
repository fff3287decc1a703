"""Where the Hydra config tree lives (a source checkout or an installed wheel), and composing it."""

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


def compose(config_name: str, overrides: list[str] | None = None, *, return_hydra_config: bool = False):
    """``conf/<config_name>.yaml`` composed with ``overrides`` (Hydra's compose API, no run directory),
    for everything outside ``@hydra.main``.

    Args:
        config_name: ``train``, ``eval``, ``launch`` or ``deploy``.
        overrides: Hydra overrides as typed on a command line.
        return_hydra_config: Keep the ``hydra`` node (e.g. ``hydra.sweeper`` of an ``hparams_search``).

    Raises:
        hydra.errors.ConfigCompositionException: On an unknown key, group or option.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides or []),
                             return_hydra_config=return_hydra_config)
