"""model.tar.gz answered by SageMaker's own inference toolkit (``sagemaker_inference``), wired as
the AWS PyTorch inference image wires it (``tests/inference_toolkit.py``), so the status codes and
bodies are the ones an endpoint sends.
"""

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from bincount.models.backbones import build_backbone
from bincount.models.card import EvalPreset, ModelCard
from bincount.models.export import save_model_dir
from sagemaker_launch import invoke
from tests.fakes import reference_probs, write_bin_photo
from tests.inference_toolkit import serve, unpacked_model_tar_gz


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """/opt/ml/model as the serving image unpacks model.tar.gz (entry's export; untrained weights)."""
    tmp = tmp_path_factory.mktemp("model")
    run_model = save_model_dir(build_backbone("resnet18", 5), tmp / "run" / "model",
                               ModelCard(arch="resnet18", min_count=1, max_count=5, preset=EvalPreset(image_size=32)))
    return unpacked_model_tar_gz(run_model, tmp)


def test_the_toolkit_answers_counts_and_the_handlers_status_codes(model_dir, tmp_path):
    photo, other = tmp_path / "bin.jpg", tmp_path / "other.jpg"
    write_bin_photo(photo, 3)
    write_bin_photo(other, 1, seed=1)
    jpeg = photo.read_bytes()
    ok, batch, csv, corrupt, not_acceptable = serve(model_dir, tmp_path, [
        ({"Content-Type": "image/jpeg", "Accept": "application/json",
          "X-Amzn-SageMaker-Custom-Attributes": "expected_quantity=3"}, jpeg),
        ({"Content-Type": "application/json"},  # no Accept: the toolkit's default, JSON
         invoke.request_body([str(photo), str(other)], 2).encode()),
        ({"Content-Type": "text/csv", "Accept": "application/json"}, b"1,2,3\n"),
        ({"Content-Type": "image/jpeg", "Accept": "application/json"}, jpeg[:-100]),
        ({"Content-Type": "image/jpeg", "Accept": "text/csv"}, jpeg),
    ])

    # the answers the exported weights give when evaluated without any serving code
    reference = reference_probs(model_dir, [photo, other])
    assert (ok["status"], ok["content_type"]) == (200, "application/json")
    [prediction] = json.loads(ok["body"])["predictions"]
    assert prediction["count"] == 1 + int(reference[0].argmax())
    assert prediction["probabilities"] == pytest.approx(reference[0].tolist(), abs=1e-5)
    # the header reached input_fn through the toolkit's context; no calibrated threshold: review
    assert (prediction["expected_quantity"], prediction["verdict"]) == (3, "review")

    assert (batch["status"], batch["content_type"]) == (200, "application/json")
    predictions = json.loads(batch["body"])["predictions"]
    assert [p["expected_quantity"] for p in predictions] == [2, 2]
    assert [p["count"] for p in predictions] == [1 + int(r.argmax()) for r in reference]

    # errors: the status and phrase of the handler's error, and bincount serve's body: the one-line
    # message as JSON, not the toolkit's message and traceback
    expected = {
        "csv": (415, "unsupported Content-Type 'text/csv': send one of image/jpeg, image/png, "
                     "application/x-image, application/json"),
        "corrupt": (400, "corrupt or truncated JPEG image (Image is incomplete or truncated)"),
        "not_acceptable": (406, "cannot answer with Accept 'text/csv': this endpoint answers application/json"),
    }
    for name, answer in {"csv": csv, "corrupt": corrupt, "not_acceptable": not_acceptable}.items():
        status, message = expected[name]
        assert (answer["status"], answer["phrase"]) == (status, message), name
        assert answer["content_type"] == "application/json" and json.loads(answer["body"]) == {"error": message}, name


def test_the_endpoint_installs_what_the_handler_imports_beyond_the_image(model_dir):
    """``code/requirements.txt`` lists exactly bincount's own requirements that importing the
    handler loads (ONNX Runtime, pydantic, Pillow), at bincount's version ranges; torch and
    torchvision stay the serving image's."""
    listed = {canonicalize_name(Requirement(line).name): Requirement(line).specifier
              for line in (model_dir / "code" / "requirements.txt").read_text().splitlines()
              if line and not line.startswith("#")}
    declared = {canonicalize_name(r.name): r.specifier
                for r in map(Requirement, importlib.metadata.requires("bincount")) if r.marker is None}
    loads = ("import sys, importlib.metadata as md; import bincount.serve.inference; names = md.packages_distributions(); "
             "print(*{d for m in list(sys.modules) for d in names.get(m.partition('.')[0], [])})")
    imported = {canonicalize_name(name) for name in
                subprocess.run([sys.executable, "-c", loads], capture_output=True, text=True, check=True).stdout.split()}
    assert listed.keys() == (imported & declared.keys()) - {"torch", "torchvision"}
    assert {"onnxruntime", "pydantic", "pillow"} <= listed.keys()
    assert all(listed[name] == declared[name] for name in listed)
