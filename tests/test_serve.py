"""The inference handler on a tiny model, and a real uvicorn server hit over HTTP."""

import asyncio
import base64
import functools
import io
import json
import os
import queue
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import zlib
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image

from bincount import cli
from bincount.data.decode import decoder_reason
from bincount.models.decoding import NEVER
from bincount.models.export import ONNX_FILE
from bincount.serve import app as serve_app
from bincount.serve import images as serve_images
from bincount.serve.app import create_app
from bincount.serve.batching import Batcher
from bincount.serve.errors import RequestError
from bincount.serve.images import Limits, decode_image_bytes
from bincount.serve.inference import input_fn, model_fn, output_fn, predict_fn
from bincount.serve.model import CountingModel
from bincount.serve.request import CUSTOM_ATTRIBUTES, check_accept, decode_request, parse_json_body
from tests.fakes import (
    MAX_COUNT,
    MIN_COUNT,
    THRESHOLD,
    corrupt_middle,
    free_port,
    make_model_dir,
    reference_probs,
    write_bin_photo,
)


@dataclass
class Bundle:
    model_dir: Path
    photos: list[Path]
    probs: list[torch.Tensor]  # reference answer of each photo

    def count(self, i: int) -> int:
        return MIN_COUNT + int(self.probs[i].argmax())

    def confidence(self, i: int) -> float:
        return float(self.probs[i].max())

    def pick(self, sure: bool) -> int:
        """A photo well above (``sure``) or well below the review threshold."""
        for i in range(len(self.photos)):
            if (self.confidence(i) > THRESHOLD + 0.05) if sure else (self.confidence(i) < THRESHOLD - 0.05):
                return i
        raise AssertionError("the tiny model has no photo on that side of the threshold")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Bundle:
    root = tmp_path_factory.mktemp("serve")
    photos = []
    for i in range(16):
        photos.append(root / "photos" / f"{i:05d}.jpg")
        write_bin_photo(photos[-1], MIN_COUNT + i % 5, seed=i)
    model_dir = make_model_dir(root / "model", photos)
    return Bundle(model_dir, photos, reference_probs(model_dir, photos))


@pytest.fixture(scope="module")
def model(bundle) -> CountingModel:
    return model_fn(str(bundle.model_dir))


def png_bytes(size=(48, 36), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, format="PNG")
    return buf.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width x height`` pixels (a decompression bomb's header)."""
    data = bytearray(png_bytes((1, 1), "L"))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    return bytes(data)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ---------------------------------------------------------------- the handler functions


def test_handler_chain_matches_the_training_preprocessing(bundle, model):
    for i in range(4):
        request = input_fn(bundle.photos[i].read_bytes(), "image/jpeg")
        body, content_type = output_fn(predict_fn(request, model), "application/json")
        [pred] = json.loads(body)["predictions"]
        assert content_type == "application/json"
        assert pred["count"] == bundle.count(i)
        assert pred["probabilities"] == pytest.approx(bundle.probs[i].tolist(), abs=1e-5)
        assert pred["confidence"] == pytest.approx(bundle.confidence(i), abs=1e-5)
        assert "verdict" not in pred and "expected_quantity" not in pred


def recalibrated(model_dir: Path, out: Path, calibration: dict | None) -> Path:
    """A copy of ``model_dir`` whose card holds ``calibration`` (none: uncalibrated); the same network."""
    shutil.copytree(model_dir, out)
    card = {k: v for k, v in json.loads((out / "model_config.json").read_text()).items() if k != "calibration"}
    if calibration is not None:
        card["calibration"] = calibration
    (out / "model_config.json").write_text(json.dumps(card))
    return out


def test_temperature_and_threshold_come_from_model_config(bundle, tmp_path, monkeypatch):
    hot = recalibrated(bundle.model_dir, tmp_path / "hot", {"temperature": 4.0, "review_threshold": THRESHOLD})
    model = CountingModel.load(hot)
    assert (model.temperature, model.review_threshold) == (4.0, THRESHOLD)
    [pred] = predict_fn(input_fn(bundle.photos[0].read_bytes(), "image/jpeg"), model)
    assert pred["probabilities"] == pytest.approx(reference_probs(hot, bundle.photos[:1])[0].tolist(), abs=1e-5)
    assert pred["confidence"] < bundle.confidence(0)  # a higher temperature is less sure

    monkeypatch.setenv("BINCOUNT_REVIEW_THRESHOLD", "0.3")
    monkeypatch.setenv("BINCOUNT_MAX_PIXELS", "1234")
    monkeypatch.setenv("SM_MODEL_DIR", str(hot))
    model = model_fn("")  # read at call time, not import time
    assert model.review_threshold == 0.3 and model.limits.max_pixels == 1234 and model.temperature == 4.0

    uncalibrated = CountingModel.load(recalibrated(bundle.model_dir, tmp_path / "raw", None))
    assert uncalibrated.review_threshold == NEVER  # no threshold, no automatic verdict


def test_json_batch_with_verdicts(bundle, model):
    sure, unsure = bundle.pick(sure=True), bundle.pick(sure=False)
    other = MIN_COUNT + (bundle.count(sure) - MIN_COUNT + 1) % 5
    instances = [bundle.photos[i].read_bytes() for i in (sure, sure, unsure, sure, sure)]
    body = json.dumps({"instances": [{"image_b64": b64(x)} for x in instances],
                       "expected_quantity": [bundle.count(sure), other, bundle.count(unsure), None, 40]})
    preds = predict_fn(input_fn(body, "application/json; charset=utf-8"), model)  # the toolkit hands JSON as str
    assert [p.get("verdict") for p in preds] == ["match", "mismatch", "review", None, "review"]
    assert [p.get("expected_quantity") for p in preds] == [bundle.count(sure), other, bundle.count(unsure), None, 40]
    assert preds[0]["count"] == bundle.count(sure) and preds[2]["count"] == bundle.count(unsure)


def test_png_and_x_image(bundle, model, tmp_path):
    grey = tmp_path / "grey.png"
    grey.write_bytes(png_bytes())
    [reference] = reference_probs(bundle.model_dir, [grey], decoder="pil")
    for content_type in ("image/png", "application/x-image"):
        [pred] = predict_fn(input_fn(grey.read_bytes(), content_type), model)
        assert pred["count"] == MIN_COUNT + int(reference.argmax())
        assert pred["probabilities"] == pytest.approx(reference.tolist(), abs=1e-5)
    other_modes = [png_bytes(mode="L"), png_bytes(mode="RGBA"), png_bytes(mode="P"), png_bytes(mode="I;16")]
    request = input_fn(json.dumps({"instances": [{"image_b64": b64(x)} for x in other_modes]}), "application/json")
    assert [(tuple(x.shape), x.dtype) for x in request.images] == [((3, 36, 48), torch.uint8)] * 4
    for data, image in zip(other_modes[:3], request.images):  # 16-bit is scaled, not clipped as Pillow does
        with Image.open(io.BytesIO(data)) as pil:
            assert torch.equal(image, torch.from_numpy(np.asarray(pil.convert("RGB")).copy()).permute(2, 0, 1))


class ToolkitContext:
    """What the SageMaker toolkit passes as ``context``: TorchServe's, with the request's headers."""

    def __init__(self, headers: dict[str, str]) -> None:
        self.request_processor = [type("P", (), {"get_request_properties": lambda _: headers})()]


def test_expected_quantity_of_a_single_photo_from_custom_attributes(bundle, model):
    sure = bundle.pick(sure=True)
    context = ToolkitContext({"Content-Type": "image/jpeg",
                              CUSTOM_ATTRIBUTES: f"trace=1; expected_quantity={bundle.count(sure)}"})
    [pred] = predict_fn(input_fn(bundle.photos[sure].read_bytes(), "image/jpeg", context), model)
    assert pred["verdict"] == "match"


def test_the_sagemaker_toolkit_calls_the_handler_functions_with_its_context(bundle):
    """The toolkit passes ``context`` to a function that takes one parameter more than it hands
    over: if any of ours did not, the header below would not reach ``input_fn``."""
    from sagemaker_inference.transformer import Transformer

    sure = bundle.pick(sure=True)
    other = MIN_COUNT + (bundle.count(sure) - MIN_COUNT + 1) % 5
    toolkit = Transformer()
    toolkit._context = ToolkitContext({CUSTOM_ATTRIBUTES: f"expected_quantity={other}"})
    model = toolkit._run_handler_function(model_fn, str(bundle.model_dir))
    request = toolkit._run_handler_function(input_fn, bundle.photos[sure].read_bytes(), "image/jpeg")
    answers = toolkit._run_handler_function(predict_fn, request, model)
    body, content_type = toolkit._run_handler_function(output_fn, answers, "application/json")
    [pred] = json.loads(body)["predictions"]
    assert content_type == "application/json"
    assert (pred["count"], pred["expected_quantity"], pred["verdict"]) == (bundle.count(sure), other, "mismatch")
    assert pred["probabilities"] == pytest.approx(bundle.probs[sure].tolist(), abs=1e-5)


def test_a_request_error_is_a_toolkit_error_with_its_status():
    from sagemaker_inference.errors import BaseInferenceToolkitError

    err = RequestError("bad photo")
    assert isinstance(err, BaseInferenceToolkitError)
    assert (err.status_code, err.message, err.phrase, str(err)) == (400, "bad photo", "bad photo", "bad photo")


def truncated(path: Path, drop: int | None = None) -> bytes:
    """The JPEG without its second half (header cut), or without its last ``drop`` bytes (pixels cut)."""
    data = path.read_bytes()
    return data[: len(data) // 2 if drop is None else len(data) - drop]


def corrupted(path: Path, tmp: Path) -> bytes:
    copy = tmp / "corrupt.jpg"
    copy.write_bytes(path.read_bytes())
    corrupt_middle(copy)
    return copy.read_bytes()


def gif_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="GIF")
    return buf.getvalue()


def two_photos(expected) -> Callable[[Path, Path], bytes]:
    """A JSON body of two photos with ``expected_quantity`` set to ``expected``."""
    def make(photo: Path, tmp: Path) -> bytes:
        one = {"image_b64": b64(photo.read_bytes())}
        return json.dumps({"instances": [one, one], "expected_quantity": expected}).encode()
    return make


@pytest.mark.parametrize(
    ("body", "content_type", "status", "message"),
    [
        pytest.param(b"", "image/jpeg", 400, "empty image", id="empty"),
        pytest.param(b"this is not a photo", "image/jpeg", 400, "not an image", id="text"),
        pytest.param(lambda photo, tmp: truncated(photo), "image/jpeg", 400, "corrupt or truncated image header",
                     id="truncated-header"),
        pytest.param(lambda photo, tmp: truncated(photo, drop=100), "image/jpeg", 400,
                     "corrupt or truncated JPEG image (Image is incomplete or truncated)", id="truncated-pixels"),
        pytest.param(corrupted, "image/jpeg", 400, "not an image", id="corrupt"),
        pytest.param(png_bytes(), "image/jpeg", 400, "PNG image but Content-Type says JPEG", id="png-as-jpeg"),
        pytest.param(gif_bytes(), "application/x-image", 400, "unsupported image format GIF", id="gif"),
        pytest.param(png_declaring(7000, 6000), "image/png", 400, "42000000 pixels; the limit is 40000000",
                     id="over-pixel-limit"),
        pytest.param(png_declaring(50000, 50000), "image/png", 400, "decompression bomb", id="bomb"),
        pytest.param(png_bytes(size=(1, 1)), "image/png", 400, "photo is 1x1 pixels; a bin photo is at least 32",
                     id="a-pixel"),
        pytest.param(b"3", "text/plain", 415, "unsupported Content-Type 'text/plain'", id="text-plain"),
        pytest.param(b"3", None, 415, "unsupported Content-Type None", id="no-content-type"),
        pytest.param(b"{not json", "application/json", 400, "malformed JSON", id="malformed-json"),
        pytest.param(b"[]", "application/json", 400, '"instances" list', id="json-list"),
        pytest.param(b"[" * 100_000, "application/json", 400, "malformed JSON", id="json-nested-too-deep"),
        pytest.param(b"\xff\xd8 a jpeg?", "application/json", 400, "malformed JSON", id="json-not-utf8"),
        pytest.param(b'{"instances": []}', "application/json", 400, "1 to 64 photos, got 0", id="no-instances"),
        pytest.param(b'{"instances": [{"url": "x"}]}', "application/json", 400, "instances[0]: must be",
                     id="bad-instance"),
        pytest.param(b'{"instances": [{"image_b64": "", "s3_uri": "s3://b/k"}]}', "application/json", 400,
                     "not both", id="both-keys"),
        pytest.param(b'{"instances": [{"image_b64": "***"}]}', "application/json", 400, "not valid base64",
                     id="bad-base64"),
        pytest.param(json.dumps({"instances": [{"image_b64": b64(b"junk")}]}).encode(), "application/json", 400,
                     "instances[0]: not an image", id="bad-photo-in-batch"),
        pytest.param(two_photos(["3", 1]), "application/json", 400,
                     'expected_quantity[0] must be a non-negative integer or null, got "3"', id="expected-string"),
        pytest.param(two_photos([1, 3.5]), "application/json", 400, "expected_quantity[1]", id="expected-float"),
        pytest.param(two_photos([True, 1]), "application/json", 400, "got true", id="expected-bool"),
        pytest.param(two_photos([-1, 1]), "application/json", 400, "got -1", id="expected-negative"),
        pytest.param(two_photos(3), "application/json", 400, "one entry (integer or null) per instance",
                     id="expected-scalar"),
        pytest.param(two_photos([3]), "application/json", 400, "one entry (integer or null) per instance",
                     id="expected-short"),
        pytest.param(b'{"instances": [{"s3_uri": "http://x/y.jpg"}]}', "application/json", 400, "is not an S3 URI",
                     id="bad-s3-uri"),
    ],
)
def test_bad_input_raises_a_request_error(body, content_type, status, message, bundle, tmp_path):
    if callable(body):
        body = body(bundle.photos[0], tmp_path)
    with pytest.raises(RequestError) as caught:
        input_fn(body, content_type)
    assert caught.value.status_code == status
    assert message in caught.value.message


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("decode_jpeg, /__w/vision/torchvision/csrc/io/image/cpu/decode_jpeg.cpp:171, Image is incomplete or truncated",
         "Image is incomplete or truncated"),
        ("Invalid PNG header\nException raised from decode_png at /src/decode_png.cpp:40", "Invalid PNG header"),
        ("", "RuntimeError"),
        ("decode_png, /src/decode_png.cpp:40", "RuntimeError"),  # nothing but the path: no path either
    ],
)
def test_a_decoder_error_reaches_the_client_without_the_decoder_source_path(message, reason):
    assert decoder_reason(RuntimeError(message)) == reason


def test_limits(bundle):
    data = bundle.photos[0].read_bytes()
    with pytest.raises(RequestError, match=f"image is {len(data)} bytes; the limit is 100 bytes"):
        decode_image_bytes(data, limits=Limits(max_image_bytes=100))
    with pytest.raises(RequestError, match="64 = 4096 pixels; the limit is 4000"):
        decode_image_bytes(data, limits=Limits(max_pixels=4000))
    assert decode_image_bytes(data, limits=Limits(max_pixels=4096)).shape == (3, 64, 64)
    too_many = json.dumps({"instances": [{"image_b64": b64(data)}] * 3})
    with pytest.raises(RequestError, match="1 to 2 photos, got 3"):
        decode_request(too_many, "application/json", limits=Limits(max_instances=2))


def test_the_json_body_schema():
    body = {"instances": [{"image_b64": "AAAA", "note": "ignored"}, {"s3_uri": "s3://b/k.jpg"}],
            "expected_quantity": [0, None]}
    parsed = parse_json_body(json.dumps(body), max_instances=2)
    assert [(i.image_b64, i.s3_uri) for i in parsed.instances] == [("AAAA", None), (None, "s3://b/k.jpg")]
    assert parsed.expected() == [0, None]
    assert parse_json_body(json.dumps({"instances": body["instances"]}), max_instances=2).expected() == [None, None]
    # the number of photos is checked before any of them: a request over the limit is refused as a whole
    with pytest.raises(RequestError, match=r'^"instances" must hold 1 to 2 photos, got 3$'):
        parse_json_body(json.dumps({"instances": [{"url": "x"}] * 3}), max_instances=2)


@pytest.mark.parametrize(
    ("accept", "ok"),
    [(None, True), ("", True), ("*/*", True), ("application/json", True), ("text/html, application/*;q=0.5", True),
     ("text/csv", False), ("application/json;q=0, text/csv", False), ("image/png", False)],
)
def test_accept(accept, ok):
    if ok:
        assert check_accept(accept) == "application/json"
    else:
        with pytest.raises(RequestError) as caught:
            check_accept(accept)
        assert caught.value.status_code == 406


def test_unreachable_s3_is_a_502_that_says_so(bundle, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setattr("bincount.serve.images._s3_clients", {})  # a client made with these settings
    with pytest.raises(RequestError) as caught:
        input_fn(json.dumps({"instances": [{"s3_uri": "s3://bucket/bin-images/00001.jpg"}]}), "application/json")
    assert caught.value.status_code == 502
    assert "cannot reach the S3 endpoint" in caught.value.message


# ---------------------------------------------------------------- dynamic batching


def run_batcher(coro_fn, **kwargs):
    calls: list[int] = []

    def fn(items: list[torch.Tensor]) -> torch.Tensor:
        x = torch.stack(items)
        if (x < 0).any():
            raise ValueError("negative rows")
        calls.append(len(x))
        return x * 2

    async def main():
        batcher = Batcher(fn, **kwargs)
        worker = asyncio.create_task(batcher.run())
        try:
            return await coro_fn(batcher)
        finally:
            worker.cancel()
            batcher.close()

    return asyncio.run(main()), calls


def test_batcher_runs_queued_requests_together_and_answers_each():
    sizes = [1, 2, 1, 1, 3]

    async def go(batcher):
        return await asyncio.gather(*(batcher.submit(list(torch.full((n, 2), float(i)))) for i, n in enumerate(sizes)))

    results, calls = run_batcher(go)
    assert calls == [8]
    for i, (n, out) in enumerate(zip(sizes, results)):
        assert torch.equal(out.rows, torch.full((n, 2), 2.0 * i))
        assert out.batch_size == 8 and out.batch_ms > 0


def test_batcher_respects_max_batch_size():
    async def go(batcher):
        return await asyncio.gather(*(batcher.submit([torch.ones(2)]) for _ in range(6)))

    _, calls = run_batcher(go, max_batch_size=4)
    assert calls == [4, 2]
    _, calls = run_batcher(go, max_batch_size=1)
    assert calls == [1] * 6


def test_batcher_waits_for_stragglers_only_when_asked():
    async def go(batcher):
        first = asyncio.create_task(batcher.submit([torch.ones(2)]))
        # yield to the other tasks until the first request is queued, then until the worker has taken it
        while batcher.queue.empty():
            await asyncio.sleep(0)
        while not batcher.queue.empty():
            await asyncio.sleep(0)
        return await asyncio.gather(first, batcher.submit([torch.ones(2)]))

    assert run_batcher(go, max_wait_ms=2000)[1] == [2]
    assert run_batcher(go, max_wait_ms=0)[1] == [1, 1]


def test_batcher_error_fails_its_batch_only():
    async def go(batcher):
        bad = await asyncio.gather(batcher.submit([torch.ones(2)]), batcher.submit([-torch.ones(2)]),
                                   return_exceptions=True)
        return bad, await batcher.submit([torch.ones(2)])

    (bad, after), calls = run_batcher(go)
    assert all(isinstance(e, ValueError) for e in bad)
    assert torch.equal(after.rows, torch.full((1, 2), 2.0)) and calls == [1]


def test_batcher_prepares_items_in_its_thread_and_a_bad_item_fails_only_its_request():
    threads: list[str] = []

    def prepare(value: float) -> torch.Tensor:
        threads.append(threading.current_thread().name)
        if value < 0:
            raise ValueError(f"cannot prepare {value}")
        return torch.full((2,), value)

    async def go(batcher):
        return await asyncio.gather(batcher.submit([1.0], prepare), batcher.submit([2.0, -1.0], prepare),
                                    batcher.submit([torch.full((2,), 3.0)]), batcher.submit([4.0], prepare),
                                    return_exceptions=True)

    (one, bad, ready, four), calls = run_batcher(go)
    assert torch.equal(one.rows, torch.full((1, 2), 2.0)) and torch.equal(four.rows, torch.full((1, 2), 8.0))
    assert torch.equal(ready.rows, torch.full((1, 2), 6.0))  # items without prepare go in as they are
    assert isinstance(bad, ValueError) and "cannot prepare -1.0" in str(bad)
    assert calls == [3]  # the three good requests still shared one call
    assert threads and all(name.startswith("bincount-forward") for name in threads)


# ---------------------------------------------------------------- a real server over HTTP

SERVER_LIMITS = Limits(max_image_bytes=100_000, max_pixels=200 * 200, max_instances=8)
MAX_BODY = 300_000


@contextmanager
def running(app):
    """Serve ``app`` with uvicorn on a free loopback port in a thread; once its model has loaded
    (or failed to), yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # so asyncio sets TCP_NODELAY
    sock.bind(("127.0.0.1", 0))
    sock.listen()  # a client that connects before uvicorn accepts waits in the backlog
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        assert app.state.load_finished.wait(timeout=60), "the model neither loaded nor failed in 60 s"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def server(bundle):
    app = create_app(bundle.model_dir, limits=SERVER_LIMITS, max_body_bytes=MAX_BODY, max_batch_size=8, device="cpu")
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client, app


def assert_answer(pred: dict, bundle: Bundle, i: int) -> None:
    assert pred["count"] == bundle.count(i)
    assert pred["probabilities"] == pytest.approx(bundle.probs[i].tolist(), abs=1e-4)


def test_ping_and_one_photo_per_content_type(server, bundle):
    client, _ = server
    assert client.get("/ping").json() == {"status": "ok"}
    for i, content_type in enumerate(("image/jpeg", "application/x-image", "image/jpeg; charset=binary")):
        r = client.post("/invocations", content=bundle.photos[i].read_bytes(), headers={"Content-Type": content_type})
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        [pred] = r.json()["predictions"]
        assert_answer(pred, bundle, i)
    r = client.post("/invocations", content=png_bytes(), headers={"Content-Type": "image/png", "Accept": "*/*"})
    assert r.status_code == 200 and len(r.json()["predictions"][0]["probabilities"]) == MAX_COUNT - MIN_COUNT + 1


def server_timing(header: str) -> dict[str, tuple[float, str | None]]:
    """``Server-Timing`` (W3C) -> ``{name: (dur, desc)}``."""
    metrics = {}
    for metric in header.split(","):
        name, *params = (p.strip() for p in metric.split(";"))
        fields = dict(p.split("=", 1) for p in params)
        metrics[name] = (float(fields["dur"]), fields.get("desc", "").strip('"') or None)
    return metrics


def test_every_answer_says_where_its_time_went(server, bundle):
    client, _ = server
    r = client.post("/invocations", content=bundle.photos[0].read_bytes(), headers={"Content-Type": "image/jpeg"})
    timing = server_timing(r.headers["server-timing"])
    assert set(timing) == {"decode", "batch", "total"} and timing["batch"][1] == "size 1"
    (decode, _), (batch, _), (total, _) = timing["decode"], timing["batch"], timing["total"]
    assert 0 < decode < total and 0 < batch < total and decode + batch <= total
    r = client.post("/invocations", json={"instances": [{"image_b64": b64(bundle.photos[i].read_bytes())}
                                                        for i in range(3)]})
    assert server_timing(r.headers["server-timing"])["batch"][1] == "size 3"


def test_json_batch_and_verdicts_over_http(server, bundle):
    client, _ = server
    sure, unsure = bundle.pick(sure=True), bundle.pick(sure=False)
    other = MIN_COUNT + (bundle.count(sure) - MIN_COUNT + 1) % 5
    order = [sure, sure, unsure, 3]
    r = client.post("/invocations", json={
        "instances": [{"image_b64": b64(bundle.photos[i].read_bytes())} for i in order],
        "expected_quantity": [bundle.count(sure), other, bundle.count(unsure), None],
    })
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p.get("verdict") for p in preds] == ["match", "mismatch", "review", None]
    for pred, i in zip(preds, order):
        assert_answer(pred, bundle, i)
    r = client.post("/invocations", content=bundle.photos[sure].read_bytes(), headers={
        "Content-Type": "image/jpeg", CUSTOM_ATTRIBUTES: f"expected_quantity={other}"})
    assert r.json()["predictions"][0]["verdict"] == "mismatch"


def bad_requests(bundle: Bundle, tmp: Path):
    photo = bundle.photos[0].read_bytes()
    jpeg = {"Content-Type": "image/jpeg"}
    as_json = {"Content-Type": "application/json"}
    one = {"image_b64": b64(photo)}
    return [
        ("unsupported content type", {"Content-Type": "text/csv"}, b"1,2", 415, "unsupported Content-Type"),
        ("no content type", {}, photo, 415, "unsupported Content-Type"),
        ("unsupported accept", {**jpeg, "Accept": "text/csv"}, photo, 406, "answers application/json"),
        ("empty body", jpeg, b"", 400, "empty image"),
        ("not an image", jpeg, b"GIF89a nonsense", 400, "not an image"),
        ("truncated jpeg", jpeg, truncated(bundle.photos[0], drop=100), 400, "corrupt or truncated JPEG"),
        ("corrupt jpeg", jpeg, corrupted(bundle.photos[0], tmp), 400, "not an image"),
        ("too many bytes", jpeg, photo + bytes(SERVER_LIMITS.max_image_bytes), 400,
         f"the limit is {SERVER_LIMITS.max_image_bytes} bytes"),
        ("too many pixels", {"Content-Type": "image/png"}, png_bytes((201, 200)), 400, "the limit is 40000"),
        ("decompression bomb", {"Content-Type": "image/png"}, png_declaring(50000, 50000), 400, "decompression bomb"),
        ("json body too large", as_json, b" " * (MAX_BODY + 1), 413, f"the limit is {MAX_BODY} bytes"),
        ("malformed json", as_json, b'{"instances": [', 400, "malformed JSON"),
        ("too many instances", as_json, json.dumps({"instances": [one] * 9}).encode(), 400, "1 to 8 photos"),
        ("expected quantity string", as_json, json.dumps({"instances": [one], "expected_quantity": ["3"]}).encode(),
         400, "expected_quantity[0] must be a non-negative integer or null, got \"3\""),
        ("expected quantity float", as_json, json.dumps({"instances": [one], "expected_quantity": [2.5]}).encode(),
         400, "got 2.5"),
        ("bad custom attribute", {**jpeg, CUSTOM_ATTRIBUTES: "expected_quantity=three"}, photo, 400,
         "expected_quantity must be a non-negative integer"),
    ]


def test_every_bad_request_is_a_4xx_and_the_server_keeps_serving(server, bundle, tmp_path):
    client, _ = server
    for name, headers, body, status, message in bad_requests(bundle, tmp_path):
        r = client.post("/invocations", content=body, headers=headers)
        assert r.status_code == status, (name, r.status_code, r.text)
        assert r.headers["content-type"] == "application/json", name
        assert message in r.json()["error"], (name, r.json())
        # the next request is served normally
        ok = client.post("/invocations", content=bundle.photos[5].read_bytes(), headers={"Content-Type": "image/jpeg"})
        assert ok.status_code == 200, name
        assert_answer(ok.json()["predictions"][0], bundle, 5)
    assert client.get("/ping").status_code == 200


def test_concurrent_clients_get_every_answer_right_and_are_batched(server, bundle):
    client, app = server
    clients, per_client = 8, 10
    before = dict(app.state.batcher.stats)

    async def one_client(http: httpx.AsyncClient, c: int) -> list[tuple[int, dict]]:
        answers = []
        for k in range(per_client):
            i = (c * per_client + k) % len(bundle.photos)
            r = await http.post("/invocations", content=bundle.photos[i].read_bytes(),
                                headers={"Content-Type": "image/jpeg"})
            assert r.status_code == 200, r.text
            answers.append((i, r.json()["predictions"][0]))
        return answers

    async def main():
        async with httpx.AsyncClient(base_url=str(client.base_url), timeout=60) as http:
            return await asyncio.gather(*(one_client(http, c) for c in range(clients)))

    results = [a for answers in asyncio.run(main()) for a in answers]
    assert len(results) == clients * per_client
    for i, pred in results:
        assert_answer(pred, bundle, i)
    stats = app.state.batcher.stats
    assert stats["rows"] - before["rows"] == clients * per_client  # none lost, none run twice
    assert stats["batches"] - before["batches"] < clients * per_client  # some requests shared a forward pass
    assert stats["max_rows"] > 1


def test_a_corrupt_photo_among_concurrent_ones_fails_alone(server, bundle):
    client, _ = server
    bad = truncated(bundle.photos[0], drop=100)
    bodies = [bundle.photos[i].read_bytes() if i % 3 else bad for i in range(12)]

    async def main():
        async with httpx.AsyncClient(base_url=str(client.base_url), timeout=60) as http:
            return await asyncio.gather(*(http.post("/invocations", content=body,
                                                    headers={"Content-Type": "image/jpeg"}) for body in bodies))

    for i, r in enumerate(asyncio.run(main())):
        if i % 3:
            assert r.status_code == 200, r.text
            assert_answer(r.json()["predictions"][0], bundle, i)
        else:
            assert r.status_code == 400 and "corrupt or truncated JPEG" in r.json()["error"]


@pytest.fixture
def decoding_threads(monkeypatch):
    """The names of the threads the server decodes photos in, as it decodes them."""
    names: list[str] = []

    def recording(data: bytes, fmt: str) -> torch.Tensor:
        names.append(threading.current_thread().name)
        return decode_image_pixels(data, fmt)

    decode_image_pixels = serve_images.decode_image_pixels
    monkeypatch.setattr(serve_images, "decode_image_pixels", recording)
    return names


@pytest.mark.parametrize("inline_decode_pixels, in_forward_thread", [(4_000_000, True), (0, False)])
def test_small_photos_decode_in_the_forward_thread_and_big_ones_beside_it(bundle, decoding_threads,
                                                                          inline_decode_pixels, in_forward_thread):
    app = create_app(bundle.model_dir, limits=SERVER_LIMITS, inline_decode_pixels=inline_decode_pixels, device="cpu")
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        for i in range(3):
            r = client.post("/invocations", content=bundle.photos[i].read_bytes(), headers={"Content-Type": "image/jpeg"})
            assert r.status_code == 200, r.text
            assert_answer(r.json()["predictions"][0], bundle, i)
            assert server_timing(r.headers["server-timing"])["decode"][0] > 0
        r = client.post("/invocations", content=truncated(bundle.photos[0], drop=100),
                        headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 400 and "corrupt or truncated JPEG" in r.json()["error"]
    assert len(decoding_threads) == 4
    assert all(name.startswith("bincount-forward") == in_forward_thread for name in decoding_threads)


def test_the_app_answers_with_the_handler_functions_and_the_same_environment(bundle, monkeypatch):
    """``bincount serve`` runs ``model_fn``, ``input_fn``, ``predict_fn`` and ``output_fn``, which
    read the settings the SageMaker image gives them from the environment."""
    calls: list[str] = []

    def recording(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            calls.append(fn.__name__)
            return fn(*args, **kwargs)
        return call

    for fn in (model_fn, input_fn, predict_fn, output_fn):
        monkeypatch.setattr(serve_app, fn.__name__, recording(fn))
    monkeypatch.setenv("BINCOUNT_REVIEW_THRESHOLD", "0")  # every verdict confident
    monkeypatch.setenv("BINCOUNT_MAX_PIXELS", "5000")
    unsure = bundle.pick(sure=False)
    with running(create_app(bundle.model_dir, device="cpu")) as url, httpx.Client(base_url=url) as client:
        r = client.post("/invocations", content=bundle.photos[unsure].read_bytes(), headers={
            "Content-Type": "image/jpeg", CUSTOM_ATTRIBUTES: f"expected_quantity={bundle.count(unsure)}"})
        assert r.status_code == 200, r.text
        assert calls == ["model_fn", "input_fn", "predict_fn", "output_fn"]
        assert r.json()["predictions"][0]["verdict"] == "match"  # "review" under the calibrated 0.75
        r = client.post("/invocations", content=png_bytes((100, 100)), headers={"Content-Type": "image/png"})
        assert r.status_code == 400 and "the limit is 5000" in r.json()["error"]


def test_ping_is_503_while_the_model_cannot_load(tmp_path):
    (tmp_path / "model").mkdir()
    app = create_app(tmp_path / "model", device="cpu")
    with running(app) as url:
        r = httpx.get(f"{url}/ping")
        assert r.status_code == 503 and r.json()["status"] == "error" and "model_config.json" in r.json()["error"]
        r = httpx.post(f"{url}/invocations", content=b"x", headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 503 and "not loaded" in r.json()["error"]


def test_a_model_exported_without_model_onnx_fails_in_one_line_until_bincount_export(bundle, tmp_path, capsys):
    old = tmp_path / "model"
    shutil.copytree(bundle.model_dir, old)
    (old / ONNX_FILE).unlink()
    with pytest.raises(FileNotFoundError) as err:
        model_fn(str(old))
    assert str(err.value) == (f"{old / ONNX_FILE} not found: the model was exported without it; re-export it with "
                              f"`bincount export --model-dir {old}`")
    with pytest.raises(FileNotFoundError, match=re.escape(str(err.value))):  # bincount serve: at start, not 503
        serve_app.serve(old, port=free_port())
    assert cli.main(["export", "--model-dir", str(old)]) == 0
    assert capsys.readouterr().err == f"{old / ONNX_FILE} written\n"
    [pred] = predict_fn(input_fn(bundle.photos[0].read_bytes(), "image/jpeg"), model_fn(str(old)))
    assert pred["probabilities"] == pytest.approx(bundle.probs[0].tolist(), abs=1e-5)


def wait_for_lines(stream, *needles: str, timeout: float = 90) -> list[str]:
    """Read ``stream`` until a line has contained each of ``needles``; the lines read.

    Raises:
        AssertionError: If the stream ends (the process exited) or ``timeout`` seconds pass first.
    """
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:  # keeps draining the pipe after we return, so the process never blocks on it
        for line in iter(stream.readline, ""):
            lines.put(line)
        lines.put("")  # the end of the stream

    threading.Thread(target=pump, daemon=True).start()
    seen, missing = [], set(needles)
    while missing:
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line with {missing} in {timeout} s: {seen}") from None
        assert line, f"the stream ended before a line with {missing}: {seen}"
        seen.append(line)
        missing = {n for n in missing if n not in line}
    return seen


def test_bincount_serve_command(bundle):
    port = free_port()
    env = {**os.environ, "BINCOUNT_MAX_PIXELS": "5000"}
    proc = subprocess.Popen([sys.executable, "-m", "bincount.cli", "serve", "--model-dir", str(bundle.model_dir),
                             "--port", str(port), "--log-level", "info", "--review-threshold", "0",
                             "--inline-decode-pixels", "0"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for_lines(proc.stderr, "Uvicorn running on", f"loaded from {bundle.model_dir}")
        r = httpx.post(f"http://127.0.0.1:{port}/invocations", content=bundle.photos[2].read_bytes(),
                       headers={"Content-Type": "image/jpeg",
                                CUSTOM_ATTRIBUTES: f"expected_quantity={bundle.count(2)}"})
        assert r.status_code == 200
        assert_answer(r.json()["predictions"][0], bundle, 2)
        assert r.json()["predictions"][0]["verdict"] == "match"  # --review-threshold 0: always sure
        r = httpx.post(f"http://127.0.0.1:{port}/invocations", content=png_bytes((100, 100)),
                       headers={"Content-Type": "image/png"})
        assert r.status_code == 400 and "the limit is 5000" in r.json()["error"]  # env limit reached the server
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize(("uri", "reason"), [("s3://Bad_Bucket!/bin.jpg", 'Invalid bucket name "Bad_Bucket!"'),
                                             ("s3://bins/", "Invalid length for parameter Key")])
def test_an_s3_uri_that_botocore_refuses_is_a_400_in_one_line(uri, reason, monkeypatch):
    from bincount.serve.images import read_s3_object

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # refused before any request is sent
    with pytest.raises(RequestError) as raised:
        read_s3_object(uri, max_bytes=1 << 20)
    assert raised.value.status_code == 400 and "\n" not in str(raised.value.message)
    assert str(raised.value.message).startswith(f"s3_uri {uri!r}: {reason}")


def test_under_batch_transform_a_bad_photo_is_answered_200_with_its_reason(bundle, monkeypatch):
    """``bincount serve`` (the bring-your-own container) answers a Batch Transform job as the serving
    image's handler does (tests/test_transform_collect.py): a 4xx would mark the whole job Failed."""
    monkeypatch.setenv("BINCOUNT_BATCH_TRANSFORM", "true")
    with running(create_app(bundle.model_dir, device="cpu")) as url:
        r = httpx.post(f"{url}/invocations", content=truncated(bundle.photos[0], drop=100),
                       headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200, r.text
    assert r.json() == {"error": "corrupt or truncated JPEG image (Image is incomplete or truncated)"}


def test_s3_uris_outside_the_allowed_prefixes_are_refused_before_s3_is_asked(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens: S3 asked is a 502
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setattr("bincount.serve.images._s3_clients", {})

    def answer(uri: str) -> tuple[int, str]:
        with pytest.raises(RequestError) as caught:
            input_fn(json.dumps({"instances": [{"s3_uri": uri}]}), "application/json")
        return caught.value.status_code, caught.value.message

    assert answer("s3://any-bucket/x.jpg")[0] == 502  # unset: any object the server's identity can read
    monkeypatch.setenv("BINCOUNT_ALLOWED_S3_PREFIXES", "bins-a, s3://bins-b/bin-images/")
    for uri in ["s3://bins-c/x.jpg", "s3://bins-ab/x.jpg", "s3://bins-b/bin-images-old/x.jpg", "s3://bins-b/x.jpg",
                "s3://bins-b/bin-images/../secret/x.jpg"]:
        assert answer(uri) == (403, f"instances[0]: s3_uri {uri!r} is outside the S3 prefixes this server may read")
    for uri in ["s3://bins-a/any/x.jpg", "s3://bins-b/bin-images/sub/x.jpg"]:
        assert answer(uri)[0] == 502, uri  # allowed: asked of S3
    assert answer("s3://bins-a/")[0] == 400  # malformed (empty key): still the request's fault
    monkeypatch.setenv("BINCOUNT_ALLOWED_S3_PREFIXES", "https://bins-a/")
    with pytest.raises(ValueError, match="BINCOUNT_ALLOWED_S3_PREFIXES: 'https://bins-a/' is not a bucket"):
        input_fn(json.dumps({"instances": [{"s3_uri": "s3://bins-a/x.jpg"}]}), "application/json")
