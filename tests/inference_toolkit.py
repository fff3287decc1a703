"""SageMaker's own inference toolkit (``sagemaker_inference``) answering requests to a ``model.tar.gz``,
wired as the AWS PyTorch inference image wires it, so the status codes and bodies are the ones an
endpoint (or a Batch Transform job) gets.

The image (aws/sagemaker-pytorch-inference-toolkit) starts TorchServe with ``/opt/ml/model/code``
on ``PYTHONPATH`` and ``decode_input_request=false`` (bodies arrive as bytes); its handler service
is ``sagemaker_inference``'s ``DefaultHandlerService`` around a ``Transformer`` whose default
handler only fills in functions the user module lacks (ours has all four). TorchServe's worker
calls ``initialize(context)`` once, then ``handle(data, context)`` per request with the same
context, its ``request_processor`` replaced by the request's headers. The toolkit's code runs
as installed; only TorchServe's ``Context`` is stood in for, by the part of ``ts/context.py`` the
toolkit and the handler use.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from sagemaker_launch.model_archive import export_model

WORKER = '''
import base64, json, sys, time
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
    data = [{"body": base64.b64decode(request["body"])}]
    started = time.perf_counter()
    [body] = service.handle(data, context)
    ms = 1000 * (time.perf_counter() - started)
    processor = context.request_processor[0]
    answers.append({"status": processor._status_code, "phrase": processor._reason_phrase,
                    "content_type": processor._response_header.get("content-type"),
                    "body": body if isinstance(body, str) else body.decode(), "ms": ms})
print(json.dumps(answers))
'''


def unpacked_model_tar_gz(run_model: Path, tmp: Path) -> Path:
    """/opt/ml/model as the serving image unpacks the ``model.tar.gz`` a training job's entry writes
    for the exported ``run_model`` folder (:func:`sagemaker_launch.model_archive.export_model`)."""
    export_model(run_model, tmp / "sm_model_dir")
    with tarfile.open(tmp / "model.tar.gz", "w:gz") as tar:
        for path in (tmp / "sm_model_dir").iterdir():
            tar.add(path, arcname=path.name)
    with tarfile.open(tmp / "model.tar.gz") as tar:
        tar.extractall(tmp / "opt_ml_model", filter="data")
    return tmp / "opt_ml_model"


def serve(model_dir: Path, tmp: Path, requests: list[tuple[dict, bytes]],
          environment: dict[str, str] | None = None) -> list[dict]:
    """Answer ``(headers, body)`` requests in one worker process.

    Args:
        model_dir: From :func:`unpacked_model_tar_gz`.
        tmp: A folder for the requests file.
        requests: ``(headers, body)`` per request, in order.
        environment: The container's own variables (a model's or transform job's ``Environment``).

    Returns:
        Per request: ``status``, ``phrase``, ``content_type`` and ``body`` as the toolkit set them,
        and ``ms``, the time ``handle`` took.
    """
    (tmp / "requests.json").write_text(json.dumps([{"headers": h, "body": base64.b64encode(b).decode()}
                                                   for h, b in requests]))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAGEMAKER_", "BINCOUNT_"))}
    env.update(PYTHONPATH=str(model_dir / "code"),  # as sagemaker_pytorch_serving_container.torchserve sets it
               SAGEMAKER_PROGRAM="inference.py", SAGEMAKER_SUBMIT_DIRECTORY=str(model_dir / "code"),  # as deploy sets
               **(environment or {}))
    run = subprocess.run([sys.executable, "-c", WORKER, str(model_dir), str(tmp / "requests.json")], env=env,
                         cwd=tmp, capture_output=True, text=True, timeout=300)
    if run.returncode != 0:
        raise RuntimeError(f"the toolkit's worker failed: {run.stderr[-3000:]}")
    return json.loads(run.stdout.splitlines()[-1])
