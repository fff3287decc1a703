"""model.tar.gz answered by SageMaker's own inference toolkit (``sagemaker_inference``), wired as
the AWS PyTorch inference image wires it, so the status codes and bodies are the ones an endpoint sends.

The image (aws/sagemaker-pytorch-inference-toolkit) starts TorchServe with ``/opt/ml/model/code``
on ``PYTHONPATH`` and ``decode_input_request=false`` (bodies arrive as bytes); its handler service
is ``sagemaker_inference``'s ``DefaultHandlerService`` around a ``Transformer`` whose default
handler only fills in functions the user module lacks (ours has all four). TorchServe's worker
calls ``initialize(context)`` once, then ``handle(data, context)`` per request with the same
context, its ``request_processor`` replaced by the request's headers. The toolkit's code runs
as installed; only TorchServe's ``Context`` is stood in for, by the part of ``ts/context.py`` the
toolkit and the handler use.
"""

import importlib.metadata
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from bincount.models.backbones import build_backbone
from bincount.models.card import EvalPreset, ModelCard
from bincount.models.export import save_model_dir
from sagemaker_launch import payload
from sagemaker_launch.export import export_model
from tests.fakes import reference_probs, write_bin_photo

WORKER = '''
import base64, json, sys
from pathlib import Path

from sagemaker_inference.default_handler_service import DefaultHandlerService
from sagemaker_inference.default_inference_handler import DefaultInferenceHandler
from sagemaker_inference.transformer import Transformer


class RequestProcessor:  # ts.context.RequestProcessor
    def __init__(self, request_header):
        self._status_code, self._reason_phrase, self._response_header = 200, None, {}
        self._request_header = request_header

    def get_request_properties(self):
        return self._request_header

    def get_request_property(self, key):
        return self._request_header.get(key)

    def report_status(self, code, reason_phrase=None):
        self._status_code, self._reason_phrase = code, reason_phrase

    def add_response_property(self, key, value):
        self._response_header[key] = value


class Context:  # ts.context.Context: what the toolkit and the handler touch
    def __init__(self, model_dir):
        self.system_properties = {"model_dir": model_dir, "gpu_id": None, "batch_size": 1}
        self.request_processor = None

    def set_response_status(self, code=200, phrase="", idx=0):
        self.request_processor[idx].report_status(code, reason_phrase=phrase)

    def set_response_content_type(self, idx, value):
        self.request_processor[idx].add_response_property("content-type", value)


model_dir, requests = sys.argv[1], json.loads(Path(sys.argv[2]).read_text())
service = DefaultHandlerService(Transformer(default_inference_handler=DefaultInferenceHandler()))
context = Context(model_dir)
service.initialize(context)
import bincount, inference  # what the toolkit imported: model.tar.gz's code/, not the installed package
assert Path(inference.__file__).parent == Path(model_dir) / "code", inference.__file__
assert Path(bincount.__file__).is_relative_to(Path(model_dir) / "code"), bincount.__file__
answers = []
for request in requests:
    headers = request["headers"]
    # TorchServe: the body's parameter headers, then the request's own
    context.request_processor = [RequestProcessor({"body": {"content-type": headers.get("Content-Type")}, **headers})]
    [body] = service.handle([{"body": base64.b64decode(request["body"])}], context)
    processor = context.request_processor[0]
    answers.append({"status": processor._status_code, "phrase": processor._reason_phrase,
                    "content_type": processor._response_header.get("content-type"),
                    "body": body if isinstance(body, str) else body.decode()})
print(json.dumps(answers))
'''


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """/opt/ml/model as the serving image unpacks model.tar.gz (entry's export; untrained weights)."""
    tmp = tmp_path_factory.mktemp("model")
    run_model = save_model_dir(build_backbone("resnet18", 5), tmp / "run" / "model",
                               ModelCard(arch="resnet18", min_count=1, max_count=5, preset=EvalPreset(image_size=32)))
    export_model(run_model, tmp / "sm_model_dir")
    with tarfile.open(tmp / "model.tar.gz", "w:gz") as tar:
        for path in (tmp / "sm_model_dir").iterdir():
            tar.add(path, arcname=path.name)
    with tarfile.open(tmp / "model.tar.gz") as tar:
        tar.extractall(tmp / "opt_ml_model", filter="data")
    return tmp / "opt_ml_model"


def serve(model_dir: Path, tmp: Path, requests: list[tuple[dict, bytes]]) -> list[dict]:
    """Answer ``(headers, body)`` requests in one worker process.

    Returns:
        Per request: ``status``, ``phrase``, ``content_type`` and ``body`` as the toolkit set them.
    """
    import base64

    (tmp / "requests.json").write_text(json.dumps([{"headers": h, "body": base64.b64encode(b).decode()}
                                                   for h, b in requests]))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAGEMAKER_", "BINCOUNT_"))}
    env.update(PYTHONPATH=str(model_dir / "code"),  # as sagemaker_pytorch_serving_container.torchserve sets it
               SAGEMAKER_PROGRAM="inference.py", SAGEMAKER_SUBMIT_DIRECTORY=str(model_dir / "code"))  # as deploy sets
    run = subprocess.run([sys.executable, "-c", WORKER, str(model_dir), str(tmp / "requests.json")], env=env,
                         cwd=tmp, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])


def test_the_toolkit_answers_counts_and_the_handlers_status_codes(model_dir, tmp_path):
    photo, other = tmp_path / "bin.jpg", tmp_path / "other.jpg"
    write_bin_photo(photo, 3)
    write_bin_photo(other, 1, seed=1)
    jpeg = photo.read_bytes()
    ok, batch, csv, corrupt, not_acceptable = serve(model_dir, tmp_path, [
        ({"Content-Type": "image/jpeg", "Accept": "application/json",
          "X-Amzn-SageMaker-Custom-Attributes": "expected_quantity=3"}, jpeg),
        ({"Content-Type": "application/json"},  # no Accept: the toolkit's default, JSON
         payload.request_body([str(photo), str(other)], 2).encode()),
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

    # errors: the toolkit sets the status and phrase from the handler's exception; the body is
    # the message, then the traceback
    expected = {
        "csv": (415, "unsupported Content-Type 'text/csv': send one of image/jpeg, image/png, "
                     "application/x-image, application/json"),
        "corrupt": (400, "corrupt or truncated JPEG image (Image is incomplete or truncated)"),
        "not_acceptable": (406, "cannot answer with Accept 'text/csv': this endpoint answers application/json"),
    }
    for name, answer in {"csv": csv, "corrupt": corrupt, "not_acceptable": not_acceptable}.items():
        status, message = expected[name]
        assert (answer["status"], answer["phrase"]) == (status, message), name
        assert answer["body"].split("\n", 1)[0] == message, name


def test_the_endpoint_installs_what_the_handler_imports_beyond_the_image(model_dir):
    """The serving image has torch and torchvision but not pydantic (the JSON request schema):
    ``code/requirements.txt`` must make the endpoint install it, at bincount's own version range."""
    listed = {Requirement(line).name: Requirement(line).specifier
              for line in (model_dir / "code" / "requirements.txt").read_text().splitlines()
              if line and not line.startswith("#")}
    declared = {Requirement(r).name: Requirement(r).specifier for r in importlib.metadata.requires("bincount")}
    assert listed["pydantic"] == declared["pydantic"] and listed["pillow"] == declared["pillow"]
    assert not {"torch", "torchvision"} & listed.keys()  # the image's CUDA builds stay
