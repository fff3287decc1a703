"""A training job's ``model.tar.gz``: the exported model plus ``code/`` for SageMaker's PyTorch serving image
(written by :mod:`sagemaker_launch.entry` on global rank 0 after training)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

# bincount's dependencies that `import bincount.serve.inference` loads (the test proves the list):
# ONNX Runtime (the forward), Pillow (decoding), pydantic (the JSON request schema); the image lacks
# ONNX Runtime and pydantic, so endpoints pip-install them
SERVING_PACKAGES = {"onnxruntime", "pillow", "pydantic"}
INFERENCE_SHIM = '''"""SageMaker PyTorch serving entry (written by sagemaker_launch.model_archive): bincount's handler."""

import torch

from bincount.serve.inference import model_fn, transform_fn  # noqa: F401

# preprocessing, a photo at a time, in one thread: torch's waiting threads would slow ONNX Runtime's
# forward (as `bincount serve` does)
torch.set_num_threads(1)
'''


def serving_requirements() -> str:
    """``code/requirements.txt`` for the serving image: :data:`SERVING_PACKAGES` with the version ranges
    of bincount's own metadata (not torch or torchvision: a pin would replace the image's CUDA build)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    try:
        requires = [Requirement(r) for r in importlib.metadata.requires("bincount") or []]
    except importlib.metadata.PackageNotFoundError:
        log.warning("bincount is not installed: code/requirements.txt lists its serving packages without versions")
        requires = []
    pins = {canonicalize_name(r.name): f"{r.name}{r.specifier}" for r in requires if r.marker is None}
    lines = [pins.get(name, name) for name in sorted(SERVING_PACKAGES)]
    return ("# installed by SageMaker's PyTorch serving image at start-up: what bincount.serve.inference imports "
            "(torch and torchvision come with the image)\n" + "\n".join(lines) + "\n")


def export_model(run_model_dir: Path, model_dir: Path) -> Path:
    """Copy the exported ``model/`` into ``model_dir`` with the serving code: ``code/`` holds
    ``inference.py`` (:data:`INFERENCE_SHIM`), ``bincount/`` (without conf/) and ``requirements.txt``.

    Args:
        run_model_dir: The run's ``model/`` folder written by ``bincount.train.train``.
        model_dir: ``$SM_MODEL_DIR``.

    Returns:
        ``model_dir``.

    Raises:
        FileNotFoundError: If ``run_model_dir`` lacks ``model.pt`` or ``model.onnx``.
    """
    import bincount
    from bincount.models.export import MODEL_FILE, ONNX_FILE

    for name in (MODEL_FILE, ONNX_FILE):
        if not (run_model_dir / name).is_file():
            raise FileNotFoundError(f"{run_model_dir / name} not found: did training export the model?")
    model_dir.mkdir(parents=True, exist_ok=True)
    for path in run_model_dir.iterdir():
        if path.is_file():
            shutil.copy2(path, model_dir / path.name)
    code = model_dir / "code"
    shutil.copytree(Path(bincount.__file__).parent, code / "bincount", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "conf"))
    if importlib.util.find_spec("bincount.serve.inference") is None:
        log.warning("bincount.serve.inference not found: model.tar.gz gets no code/inference.py")
    else:
        (code / "inference.py").write_text(INFERENCE_SHIM)
    (code / "requirements.txt").write_text(serving_requirements())
    return model_dir
