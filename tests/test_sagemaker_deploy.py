"""Deploying: the model.tar.gz a training job's entry writes serves with its own code, and the
deploy/invoke/delete requests the real SDK sends (to a local moto server)."""

import base64
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from bincount.data.transforms import CountingPresetEval
from bincount.models.backbones import build_backbone
from bincount.models.export import save_model_dir
from sagemaker_launch import deploy
from sagemaker_launch.entry import export_model
from tests.fakes import write_bin_photo
from tests.moto_server import BUCKET, ROLE, aws, moto_server, with_moto_fixes  # noqa: F401  (fixtures)

SERVE = """
import json, sys
from pathlib import Path
code = Path(sys.argv[1]) / "code"
sys.path.insert(0, str(code))  # as the serving image does: code/ first
import inference, bincount
assert Path(bincount.__file__).is_relative_to(code), bincount.__file__
model = inference.model_fn(sys.argv[1])
request = inference.input_fn(sys.argv[2], "application/json")
body, content_type = inference.output_fn(inference.predict_fn(request, model), "application/json")
print(json.dumps({"content_type": content_type, "answer": json.loads(body)}))
"""


@pytest.fixture(scope="module")
def model_tar_gz(tmp_path_factory) -> Path:
    """model.tar.gz as SageMaker packs $SM_MODEL_DIR after the entry's export (untrained weights)."""
    tmp = tmp_path_factory.mktemp("model")
    run_model = save_model_dir(build_backbone("resnet18", 5), tmp / "run" / "model", arch="resnet18", min_count=1,
                               max_count=5, preset=CountingPresetEval(image_size=32).to_config())
    sm_model_dir = export_model(run_model, tmp / "opt_ml_model")
    with tarfile.open(tmp / "model.tar.gz", "w:gz") as tar:
        for path in sm_model_dir.iterdir():
            tar.add(path, arcname=path.name)
    return tmp / "model.tar.gz"


def test_model_tar_gz_serves_with_its_own_code(model_tar_gz, tmp_path):
    with tarfile.open(model_tar_gz) as tar:
        names = tar.getnames()
        tar.extractall(tmp_path / "model", filter="data")
    assert {"model.pt", "model_config.json", "code/inference.py", "code/requirements.txt",
            "code/bincount/serve/inference.py"} <= set(names)
    photo = tmp_path / "bin.jpg"
    write_bin_photo(photo, 3)
    body = deploy.request_body([str(photo)], expected_quantity=3)  # what `deploy invoke` sends
    run = subprocess.run([sys.executable, "-c", SERVE, str(tmp_path / "model"), body], capture_output=True,
                         text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.splitlines()[-1])
    [prediction] = out["answer"]["predictions"]
    assert out["content_type"] == "application/json" and 1 <= prediction["count"] <= 5
    assert len(prediction["probabilities"]) == 5 and prediction["expected_quantity"] == 3


def test_deploy_invoke_delete(aws, model_tar_gz, tmp_path, capsys, monkeypatch):
    import boto3

    monkeypatch.setattr(deploy, "boto_session", with_moto_fixes(deploy.boto_session))  # moto's VpcConfig: {}, ...

    boto3.client("s3").put_object(Bucket=BUCKET, Key="bincount/job-1/output/model.tar.gz", Body=model_tar_gz.read_bytes())
    aws.post("/moto-api/recorder/reset-recording")  # what the training job left; record from here
    model_data = f"s3://{BUCKET}/bincount/job-1/output/model.tar.gz"
    made = deploy.main([f"model_data={model_data}", "endpoint=bincount-test", "+environment.BINCOUNT_REVIEW_THRESHOLD=0.9"])
    assert made.name == "bincount-test" and made.status == "InService"
    [model] = aws.calls("CreateModel")
    assert model["ModelName"] == "bincount-test" and model["ExecutionRoleArn"] == ROLE
    container = model["PrimaryContainer"]
    assert container["Image"] == "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-inference:2.6.0-cpu-py312"
    assert container["ModelDataUrl"] == model_data
    assert container["Environment"]["SAGEMAKER_PROGRAM"] == "inference.py"
    assert container["Environment"]["BINCOUNT_REVIEW_THRESHOLD"] == "0.9"
    [config] = aws.calls("CreateEndpointConfig")
    assert config["ProductionVariants"] == [{"VariantName": "AllTraffic", "ModelName": "bincount-test",
                                             "InstanceType": "ml.m5.large", "InitialInstanceCount": 1}]
    assert aws.calls("CreateEndpoint") == [{"EndpointName": "bincount-test", "EndpointConfigName": "bincount-test"}]
    assert "0.115 USD per hour" in capsys.readouterr().out

    # the endpoint's answer is moto's canned one; what matters is the request the SDK sent
    answer = {"predictions": [{"count": 3, "probabilities": [0.1, 0.2, 0.5, 0.1, 0.1], "confidence": 0.5,
                               "expected_quantity": 3, "verdict": "match"}]}
    aws.post("/moto-api/static/sagemaker/endpoint-results", json.dumps({"results": [
        {"Body": json.dumps(answer), "ContentType": "application/json", "InvokedProductionVariant": "AllTraffic",
         "CustomAttributes": ""}]}).encode())
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
        "endpoint bincount-test", "endpoint config bincount-test", "model bincount-test"]
    assert [len(aws.calls(op)) for op in ("DeleteEndpoint", "DeleteEndpointConfig", "DeleteModel")] == [1, 1, 1]


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
    assert aws.requests() == []
