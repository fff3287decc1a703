"""Deploying: the model.tar.gz a training job's entry writes serves with its own code, and the
deploy/update/invoke/delete requests the real SDK sends (to a local moto server)."""

import base64
import json
import random
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from bincount.config import compose
from bincount.models.backbones import build_backbone
from bincount.models.card import EvalPreset, ModelCard
from bincount.models.export import save_model_dir
from sagemaker_launch import deploy, invoke, serving_models
from sagemaker_launch.model_archive import export_model
from tests.fakes import write_bin_photo
from tests.moto_server import BUCKET, ROLE, aws, moto_server, with_moto_fixes  # noqa: F401  (fixtures)

ABID_IMAGES = Path("/work/shared/abid/bin-images")
RESOURCE = re.compile(r"bincount-test-\d{4}-\d{2}-\d{2}-\d{2}-\d{2}-\d{2}-\d{3}")  # <endpoint>-<timestamp>

SERVE = """
import json, sys
from pathlib import Path
code = Path(sys.argv[1]) / "code"
sys.path.insert(0, str(code))  # as the serving image does: code/ first
import inference, bincount
assert Path(bincount.__file__).is_relative_to(code), bincount.__file__
model = inference.model_fn(sys.argv[1])
body, content_type = inference.transform_fn(model, sys.argv[2], "application/json", "application/json")
print(json.dumps({"content_type": content_type, "answer": json.loads(body)}))
"""


@pytest.fixture(scope="module")
def model_tar_gz(tmp_path_factory) -> Path:
    """model.tar.gz as SageMaker packs $SM_MODEL_DIR after the entry's export (untrained weights)."""
    tmp = tmp_path_factory.mktemp("model")
    run_model = save_model_dir(build_backbone("resnet18", 5), tmp / "run" / "model",
                               ModelCard(arch="resnet18", min_count=1, max_count=5, preset=EvalPreset(image_size=32)))
    sm_model_dir = export_model(run_model, tmp / "opt_ml_model")
    with tarfile.open(tmp / "model.tar.gz", "w:gz") as tar:
        for path in sm_model_dir.iterdir():
            tar.add(path, arcname=path.name)
    return tmp / "model.tar.gz"


def test_model_tar_gz_serves_with_its_own_code(model_tar_gz, tmp_path):
    with tarfile.open(model_tar_gz) as tar:
        names = tar.getnames()
        tar.extractall(tmp_path / "model", filter="data")
    assert {"model.onnx", "model.pt", "model_config.json", "code/inference.py", "code/requirements.txt",
            "code/bincount/serve/inference.py"} <= set(names)
    photo = tmp_path / "bin.jpg"
    write_bin_photo(photo, 3)
    body = invoke.request_body([str(photo)], expected_quantity=3)  # what `deploy invoke` sends
    run = subprocess.run([sys.executable, "-c", SERVE, str(tmp_path / "model"), body], capture_output=True,
                         text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.splitlines()[-1])
    [prediction] = out["answer"]["predictions"]
    assert out["content_type"] == "application/json" and 1 <= prediction["count"] <= 5
    assert len(prediction["probabilities"]) == 5 and prediction["expected_quantity"] == 3


def prediction(count: int) -> dict:
    return {"count": count, "probabilities": [0.1, 0.2, 0.5, 0.1, 0.1], "confidence": 0.5}


def queue_answers(aws, *answers: dict) -> None:
    """The endpoint's answers, one per request in turn (moto's canned InvokeEndpoint results)."""
    aws.post("/moto-api/static/sagemaker/endpoint-results", json.dumps({"results": [
        {"Body": json.dumps(a), "ContentType": "application/json", "InvokedProductionVariant": "AllTraffic",
         "CustomAttributes": ""} for a in answers]}).encode())


def invocations(aws, endpoint: str = "bincount-test") -> list[bytes]:
    return [r["body"] for r in aws.requests() if r["path"] == f"/endpoints/{endpoint}/invocations"]


@pytest.fixture
def deployable(aws, model_tar_gz, monkeypatch) -> str:
    """model.tar.gz in moto's S3, as a training job left it; the SDK tolerating moto's answers."""
    import boto3

    monkeypatch.setattr(serving_models, "boto_session", with_moto_fixes(serving_models.boto_session))  # moto's VpcConfig: {}, ...
    boto3.client("s3").put_object(Bucket=BUCKET, Key="bincount/job-1/output/model.tar.gz", Body=model_tar_gz.read_bytes())
    aws.post("/moto-api/recorder/reset-recording")  # record from here
    return f"s3://{BUCKET}/bincount/job-1/output/model.tar.gz"


def test_deploy_invoke_delete(aws, deployable, tmp_path, capsys):
    model_data = deployable
    made = deploy.main([f"model_data={model_data}", "endpoint=bincount-test", "+environment.BINCOUNT_REVIEW_THRESHOLD=0.9"])
    assert made.name == "bincount-test" and made.status == "InService" and made.previous_config is None
    [model] = aws.calls("CreateModel")
    assert RESOURCE.fullmatch(model["ModelName"]) and made.model == model["ModelName"]
    assert model["ExecutionRoleArn"] == ROLE
    container = model["PrimaryContainer"]
    assert container["Image"] == "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-inference:2.6.0-cpu-py312"
    assert container["ModelDataUrl"] == model_data
    assert container["Environment"]["SAGEMAKER_PROGRAM"] == "inference.py"
    assert container["Environment"]["BINCOUNT_REVIEW_THRESHOLD"] == "0.9"
    [config] = aws.calls("CreateEndpointConfig")
    assert config["EndpointConfigName"] == made.model
    assert config["ProductionVariants"] == [{"VariantName": "AllTraffic", "ModelName": made.model,
                                             "InstanceType": "ml.m5.large", "InitialInstanceCount": 1}]
    assert aws.calls("CreateEndpoint") == [{"EndpointName": "bincount-test", "EndpointConfigName": made.model}]
    assert aws.calls("UpdateEndpoint") == []
    assert "0.115 USD per hour" in capsys.readouterr().out

    # the endpoint's answer is moto's canned one; what matters is the request the SDK sent
    answer = {"predictions": [{**prediction(3), "expected_quantity": 3, "verdict": "match"},
                              {**prediction(2), "expected_quantity": 3, "verdict": "mismatch"}]}
    queue_answers(aws, answer)
    photo = tmp_path / "bin.jpg"
    write_bin_photo(photo, 3)
    s3_photo = f"s3://{BUCKET}/abid/bin-images/00001.jpg"
    assert deploy.main(["invoke", "endpoint=bincount-test", str(photo), s3_photo, "expected_quantity=3"]) == answer
    assert "bin.jpg: count 3 (match)" in capsys.readouterr().out
    [invocation] = [r for r in aws.requests() if r["path"] == "/endpoints/bincount-test/invocations"]
    assert invocation["headers"]["content-type"] == "application/json"
    assert json.loads(invocation["body"]) == {
        "instances": [{"image_b64": base64.b64encode(photo.read_bytes()).decode()}, {"s3_uri": s3_photo}],
        "expected_quantity": [3, 3]}

    assert deploy.main(["delete", "endpoint=bincount-test"]) == [
        "endpoint bincount-test", f"endpoint config {made.model}", f"model {made.model}"]
    assert [len(aws.calls(op)) for op in ("DeleteEndpoint", "DeleteEndpointConfig", "DeleteModel")] == [1, 1, 1]


def test_deploy_to_an_existing_endpoint_updates_it_and_delete_removes_every_version(aws, deployable, capsys):
    import boto3

    sagemaker = boto3.client("sagemaker")
    first = deploy.main([f"model_data={deployable}", "endpoint=bincount-test"])
    time.sleep(0.002)  # the names' timestamps have millisecond resolution
    second = deploy.main([f"model_data={deployable}", "endpoint=bincount-test", "instance_type=ml.c5.xlarge"])
    assert "updating endpoint (was config" in capsys.readouterr().out
    assert second.previous_config == first.model and second.status == "InService"
    assert [m["ModelName"] for m in aws.calls("CreateModel")] == [first.model, second.model]
    assert first.model != second.model and all(RESOURCE.fullmatch(m) for m in (first.model, second.model))
    assert [c["ProductionVariants"][0]["InstanceType"] for c in aws.calls("CreateEndpointConfig")] == [
        "ml.m5.large", "ml.c5.xlarge"]
    assert len(aws.calls("CreateEndpoint")) == 1
    assert aws.calls("UpdateEndpoint") == [{"EndpointName": "bincount-test", "EndpointConfigName": second.model}]
    assert sagemaker.describe_endpoint(EndpointName="bincount-test")["EndpointConfigName"] == second.model

    # another endpoint whose name starts alike, and a model of an old deploy that failed before its endpoint
    deploy.main([f"model_data={deployable}", "endpoint=bincount-test-canary"])
    sagemaker.create_model(ModelName="bincount-test", ExecutionRoleArn=ROLE,
                           PrimaryContainer={"Image": first.image_uri, "ModelDataUrl": deployable})
    deleted = deploy.main(["delete", "endpoint=bincount-test"])
    assert deleted == ["endpoint bincount-test", f"endpoint config {first.model}", f"endpoint config {second.model}",
                       "model bincount-test", f"model {first.model}", f"model {second.model}"]
    assert [e["EndpointName"] for e in sagemaker.list_endpoints()["Endpoints"]] == ["bincount-test-canary"]
    left = {c["EndpointConfigName"] for c in sagemaker.list_endpoint_configs()["EndpointConfigs"]}
    assert left == {m["ModelName"] for m in sagemaker.list_models()["Models"]} and len(left) == 1
    assert left.pop().startswith("bincount-test-canary-")
    with pytest.raises(ValueError, match="nothing to delete: no endpoint, endpoint config or model named bincount-t"):
        deploy.main(["delete", "endpoint=bincount-test"])


def test_invoke_splits_photos_into_requests_under_invoke_endpoints_limit(aws, deployable, tmp_path, capsys):
    deploy.main([f"model_data={deployable}", "endpoint=bincount-test"])
    rng = random.Random(0)
    photos = []  # 64 photos the size of ABID's largest (200-263 KB): 14.6 MB, 19.5 MB as base64
    for i in range(64):
        photos.append(tmp_path / f"{i:02d}.jpg")
        photos[-1].write_bytes(rng.randbytes(200_000 + 1000 * i))
    # by hand: a photo of n bytes is 4*ceil(n/3) + 21 bytes ({"image_b64": "..."} and null), the
    # request 42 bytes ({"instances": [], "expected_quantity": []}) and 4 per further photo (", " twice)
    split = [22, 20, 18, 4]
    starts = [sum(split[:i]) for i in range(len(split))]
    answers = [{"predictions": [prediction(i % 5 + 1) for i in range(start, start + n)]}
               for start, n in zip(starts, split)]
    queue_answers(aws, *answers)
    got = deploy.main(["invoke", "endpoint=bincount-test", *map(str, photos)])
    bodies = invocations(aws)
    assert [len(json.loads(b)["instances"]) for b in bodies] == split
    assert max(len(b) for b in bodies) <= invoke.max_request_bytes() == 6 * 2**20
    assert all(len(b) + 4 + 21 + 4 * -(-(200_000 + 1000 * (start + n)) // 3) > 6 * 2**20  # the next photo didn't fit
               for b, start, n in zip(bodies[:-1], starts, split))
    sent = [i["image_b64"] for b in bodies for i in json.loads(b)["instances"]]
    assert sent == [base64.b64encode(p.read_bytes()).decode() for p in photos]  # every photo once, in order
    assert got == {"predictions": [p for a in answers for p in a["predictions"]]}
    assert f"{photos[63]}: count 4 " in capsys.readouterr().out


def test_split_requests_fills_each_request_to_exactly_the_limit(tmp_path):
    def photo(name: str, size: int) -> str:
        (tmp_path / name).write_bytes(b"x" * size)
        return str(tmp_path / name)

    photos = [photo(f"{i}.jpg", 300) for i in range(5)]
    two = len(invoke.request_body(photos[:2], 3))
    assert two == len(json.dumps({"instances": [{"image_b64": "x" * 400}] * 2, "expected_quantity": [3, 3]}))
    for limit, sizes in ((two, [2, 2, 1]), (two - 1, [1, 1, 1, 1, 1]), (10**6, [5])):
        groups = invoke.split_requests(photos, 3, max_bytes=limit, max_photos=64)
        assert [len(g) for g in groups] == sizes and sum(groups, []) == photos
        assert all(len(invoke.request_body(g, 3)) <= limit for g in groups)
    assert [len(g) for g in invoke.split_requests(photos, None, max_bytes=10**6, max_photos=2)] == [2, 2, 1]
    s3 = ["s3://b/1.jpg", "s3://b/2.jpg"]
    assert invoke.split_requests(s3 + photos[:1], None, max_bytes=10**6, max_photos=64) == [s3 + photos[:1]]

    alone = len(invoke.request_body(photos[:1]))
    assert invoke.split_requests(photos[:1], None, max_bytes=alone, max_photos=1) == [photos[:1]]
    with pytest.raises(ValueError, match=rf"0.jpg: its request alone is {alone} bytes .* over the limit of "
                                         rf"{alone - 1} bytes; upload it to S3"):
        invoke.split_requests(photos, None, max_bytes=alone - 1, max_photos=64)
    with pytest.raises(ValueError, match="max_photos=0"):
        invoke.split_requests(photos, None, max_bytes=10**6, max_photos=0)


def test_request_limits_agree_with_the_handler_and_the_server():
    import inspect

    from bincount.serve.app import create_app
    from bincount.serve.images import Limits

    assert compose("deploy", []).max_photos_per_request == Limits().max_instances
    assert invoke.max_request_bytes() <= inspect.signature(create_app).parameters["max_body_bytes"].default


def test_model_and_config_names_keep_the_whole_endpoint_name():
    from sagemaker.core.common_utils import name_from_base

    longest = "b" * deploy.MAX_ENDPOINT_NAME
    assert len(name_from_base(longest)) == 63 and name_from_base(longest).startswith(longest + "-")
    assert deploy.deployed_under(longest).fullmatch(name_from_base(longest))
    assert deploy.deployed_under("bincount").fullmatch("bincount")
    assert not deploy.deployed_under("bincount").fullmatch(name_from_base("bincount-canary"))


@pytest.mark.integration
@pytest.mark.skipif(not ABID_IMAGES.is_dir(), reason="no shared ABID sample")
def test_split_requests_of_the_largest_abid_photos():
    largest = sorted(ABID_IMAGES.glob("*.jpg"), key=lambda p: p.stat().st_size)[-64:]
    photos = [str(p) for p in largest]
    groups = invoke.split_requests(photos, 3, max_bytes=invoke.max_request_bytes(), max_photos=64)
    assert len(groups) >= 3 and sum(groups, []) == photos
    assert all(len(invoke.request_body(g, 3)) <= invoke.max_request_bytes() for g in groups)
    # no two consecutive requests could have been one
    assert all(len(invoke.request_body(a + b[:1], 3)) > invoke.max_request_bytes() for a, b in zip(groups, groups[1:]))


def test_deploy_arguments_fail_early(aws, tmp_path):
    with pytest.raises(ConfigCompositionException):
        deploy.main(["model_dta=s3://x/model.tar.gz"])
    with pytest.raises(ValueError, match="exactly one"):
        deploy.main(["endpoint=x"])
    with pytest.raises(ValueError, match="exactly one"):
        deploy.main(["model_data=s3://x/model.tar.gz", "job=j"])
    with pytest.raises(ValueError, match="no such photo"):
        deploy.main(["invoke", "endpoint=x", str(tmp_path / "missing.jpg")])
    with pytest.raises(ValueError, match="key=value"):
        deploy.main(["delete", "endpoint=x", "s3://b/photo.jpg"])
    with pytest.raises(ValueError, match="endpoint=b{40} is 40 characters; at most 39"):
        deploy.main(["model_data=s3://x/model.tar.gz", f"endpoint={'b' * 40}"])
    small, big = tmp_path / "small.jpg", tmp_path / "big.jpg"
    write_bin_photo(small, 1)
    big.write_bytes(bytes(6 * 2**20 // 4 * 3))  # 4.5 MiB: 6 MiB as base64, and the JSON around it
    with pytest.raises(ValueError, match=r"big.jpg: its request alone is 6291519 bytes .* over the limit of 6291456"):
        deploy.main(["invoke", "endpoint=x", str(small), str(big)])  # before the small photo is sent
    assert aws.requests() == []


def test_the_dry_run_checks_and_prints_the_three_requests_and_sends_nothing(aws, monkeypatch, capsys):
    monkeypatch.delenv("SAGEMAKER_ROLE")  # a newcomer's first try: no role, no training job looked up
    made = deploy.main(["job=bincount-20261203024536", "endpoint=bincount-test", "instance_type=ml.g4dn.xlarge",
                        "--dry-run"])
    assert aws.requests() == []
    assert list(made.requests) == ["CreateModel", "CreateEndpointConfig", "CreateEndpoint"]
    model, config, endpoint = made.requests.values()
    assert "-gpu-" in model["PrimaryContainer"]["Image"] and model["ModelName"] == made.model
    assert config["ProductionVariants"][0]["InstanceType"] == "ml.g4dn.xlarge"
    assert endpoint == {"EndpointName": "bincount-test", "EndpointConfigName": made.model}
    out = capsys.readouterr().out
    assert "DRY RUN: CreateEndpointConfig (not sent)" in out and '"InitialInstanceCount": 1' in out
    assert "0.736 USD per hour" in out
    with pytest.raises(ValueError, match="(?s)SageMaker would refuse this CreateEndpointConfig.*ml.m5.huge"):
        deploy.main(["model_data=s3://b/model.tar.gz", "endpoint=bincount-test", "instance_type=ml.m5.huge",
                     "--dry-run"])
    with pytest.raises(ValueError, match="--dry-run is for deploying"):
        deploy.main(["delete", "endpoint=bincount-test", "--dry-run"])
    assert aws.requests() == []
