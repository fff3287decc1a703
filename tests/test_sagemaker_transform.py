"""``python -m sagemaker_launch.transform``: the CreateModel and CreateTransformJob requests the real SDK
sends (to a local moto server), each checked against SageMaker's service model."""

import re
from pathlib import Path

import botocore.session
import pytest
from hydra.errors import ConfigCompositionException

from bincount.config import compose
from bincount.serve.images import Limits
from sagemaker_launch import serving_models, session, transform
from tests.fakes import model_archive
from tests.moto_server import BUCKET, REGION, ROLE, aws, moto_server, with_moto_fixes  # noqa: F401  (fixtures)

PACKAGE = "arn:aws:sagemaker:us-east-1:123456789012:model-package/bincount/1"
ABID_IMAGES = Path("/work/shared/abid/bin-images")
SERVICE = botocore.session.get_session().get_service_model("sagemaker")


def refused(operation: str, request: dict) -> list[str]:
    """What SageMaker's service model says is wrong with ``request`` (botocore's ParamValidator, and more)."""
    return session.request_errors(request, SERVICE.operation_model(operation))


@pytest.fixture
def sagemaker(aws, monkeypatch):
    """The transform command's SDK calls tolerating moto's answers; a boto3 SageMaker client."""
    import boto3

    monkeypatch.setattr(serving_models, "boto_session", with_moto_fixes(serving_models.boto_session))  # moto's VpcConfig: {}
    return boto3.client("sagemaker", region_name=REGION)


def test_a_training_jobs_model_counts_a_prefix_on_several_instances(aws, sagemaker, capsys):
    import boto3

    boto3.client("s3").put_object(Bucket=BUCKET, Key="bincount/bincount-20261203024536/output/model.tar.gz",
                                  Body=model_archive())
    sagemaker.create_training_job(  # what a `launch` left: its model.tar.gz is output/<job>/output/model.tar.gz
        TrainingJobName="bincount-20261203024536", RoleArn=ROLE,
        AlgorithmSpecification={"TrainingImage": "pytorch-training:2.6.0", "TrainingInputMode": "File"},
        OutputDataConfig={"S3OutputPath": f"s3://{BUCKET}/bincount"},
        ResourceConfig={"InstanceType": "ml.m5.large", "InstanceCount": 1, "VolumeSizeInGB": 10},
        StoppingCondition={"MaxRuntimeInSeconds": 3600})
    aws.post("/moto-api/recorder/reset-recording")
    made = transform.main(["model=bincount-20261203024536", f"input=s3://{BUCKET}/bin-images",
                           f"output=s3://{BUCKET}/counts/", "instance_count=3", "max_concurrent_transforms=5",
                           "+environment.BINCOUNT_MAX_PIXELS=60000000", "--wait"])
    assert made.status == "Completed" and not made.dry_run
    [model] = aws.calls("CreateModel")
    [job] = aws.calls("CreateTransformJob")
    assert refused("CreateModel", model) == [] and refused("CreateTransformJob", job) == []
    assert model["ModelName"] == job["ModelName"] == job["TransformJobName"] == made.job_name
    assert made.job_name.startswith("bincount-transform-")
    container = model["PrimaryContainer"]  # as deploy makes it
    assert container["ModelDataUrl"] == f"s3://{BUCKET}/bincount/bincount-20261203024536/output/model.tar.gz"
    assert container["Image"] == "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-inference:2.6.0-cpu-py312"
    assert container["Environment"]["SAGEMAKER_PROGRAM"] == "inference.py" and model["ExecutionRoleArn"] == ROLE

    # one photo per request: each S3 object whole (no splitting), one record per request, sent as a JPEG
    assert job["TransformInput"] == {
        "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": f"s3://{BUCKET}/bin-images/"}},
        "ContentType": "image/jpeg", "SplitType": "None", "CompressionType": "None"}
    assert job["BatchStrategy"] == "SingleRecord"
    assert job["TransformOutput"] == {"S3OutputPath": f"s3://{BUCKET}/counts/", "Accept": "application/json",
                                      "AssembleWith": "None"}
    assert job["TransformResources"] == {"InstanceType": "ml.m5.large", "InstanceCount": 3}
    assert job["MaxConcurrentTransforms"] == 5 and job["MaxPayloadInMB"] == 10
    assert job["MaxPayloadInMB"] * job["MaxConcurrentTransforms"] <= transform.MAX_PAYLOAD_MB  # SageMaker's limit
    # the handler takes every photo Batch Transform lets through, and no larger one
    # and answers a photo it cannot count with 200 and the reason (test_transform_collect.py), not a 4xx that fails the job
    assert job["Environment"] == {"BINCOUNT_MAX_IMAGE_BYTES": str(10 * 2**20), "BINCOUNT_BATCH_TRANSFORM": "true",
                                  "BINCOUNT_MAX_PIXELS": "60000000"}
    out = capsys.readouterr().out
    assert f"bincount transform collect s3://{BUCKET}/counts/ --input-prefix s3://{BUCKET}/bin-images/" in out
    assert sagemaker.describe_transform_job(TransformJobName=made.job_name)["TransformJobStatus"] == "Completed"


def test_a_model_package_becomes_the_jobs_model(aws, sagemaker):
    sagemaker.create_model_package_group(ModelPackageGroupName="bincount")
    assert sagemaker.create_model_package(ModelPackageGroupName="bincount", InferenceSpecification={
        "Containers": [{"Image": "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-inference:2.6.0-cpu-py312",
                        "ModelDataUrl": f"s3://{BUCKET}/m.tar.gz"}], "SupportedContentTypes": ["image/jpeg"],
        "SupportedResponseMIMETypes": ["application/json"], "SupportedTransformInstanceTypes": ["ml.m5.large"],
    })["ModelPackageArn"] == PACKAGE
    aws.post("/moto-api/recorder/reset-recording")
    made = transform.main([f"model={PACKAGE}", f"input=s3://{BUCKET}/bin-images/",
                           f"output=s3://{BUCKET}/counts", "max_payload_mb=20"])
    [model] = aws.calls("CreateModel")
    assert model == {"ModelName": made.job_name, "ExecutionRoleArn": ROLE, "PrimaryContainer": {"ModelPackageName": PACKAGE}}
    [job] = aws.calls("CreateTransformJob")
    assert refused("CreateModel", model) == [] and refused("CreateTransformJob", job) == []
    assert job["ModelName"] == made.job_name and job["MaxPayloadInMB"] == 20
    assert job["Environment"]["BINCOUNT_MAX_IMAGE_BYTES"] == str(20 * 2**20)
    assert job["TransformOutput"]["S3OutputPath"] == f"s3://{BUCKET}/counts/"
    assert sagemaker.describe_model(ModelName=made.job_name)["PrimaryContainer"] == {"ModelPackageName": PACKAGE}


def test_the_dry_run_checks_and_prints_both_requests_and_sends_nothing(aws, capsys):
    made = transform.main(["job=bincount-20261203024536", f"input=s3://{BUCKET}/bin-images/",
                           f"output=s3://{BUCKET}/counts/", "--dry-run"])
    assert made.dry_run and aws.requests() == []
    assert list(made.requests) == ["CreateModel", "CreateTransformJob"]
    assert made.requests["CreateTransformJob"]["ModelName"] == made.requests["CreateModel"]["ModelName"]
    out = capsys.readouterr().out
    assert f"DRY RUN: CreateTransformJob {made.job_name} (not sent)" in out and '"SplitType": "None"' in out
    # a group's latest approved package is not looked up either: the request names a placeholder package
    made = transform.main(["package_group=bincount-counting", "input=s3://b/in/", "output=s3://b/out/", "--dry-run"])
    assert made.dry_run and aws.requests() == []
    package = made.requests["CreateModel"]["PrimaryContainer"]["ModelPackageName"]
    assert package.endswith(":model-package/bincount-counting/LATEST")

    # a request the service model refuses stops the dry run with what is wrong
    with pytest.raises(ValueError, match="(?s)SageMaker would refuse this CreateTransformJob.*InstanceType=.ml.m5.huge"):
        transform.main(["job=j", "input=s3://b/in/", "output=s3://b/out/", "instance_type=ml.m5.huge", "--dry-run"])


def test_limits_and_arguments_fail_before_anything_is_sent(aws):
    # model= names a job, a package (its ARN) or a model.tar.gz; the two others are tested above
    assert transform.parse_argv(["model=s3://b/run/model.tar.gz", "--dry-run"])[1] == ["model_data=s3://b/run/model.tar.gz"]
    base = ["job=j", f"input=s3://{BUCKET}/bin-images/", f"output=s3://{BUCKET}/counts/"]
    cases = {
        "max_concurrent_transforms=11 x max_payload_mb=10 = 110 MB": ["max_concurrent_transforms=11"],
        "max_payload_mb=101: SageMaker takes 1 to 100 MB": ["max_payload_mb=101", "max_concurrent_transforms=1"],
        "max_payload_mb=0": ["max_payload_mb=0"],
        "at least 1": ["instance_count=0"],
        "exactly one of job=": [f"model_package={PACKAGE}"],
        "'bin-images/' is not an S3 prefix": ["input=bin-images/"],
    }
    for message, overrides in cases.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            transform.main([*base, *overrides])
    with pytest.raises(ValueError, match="transform needs output="):
        transform.main(["job=j", "input=s3://b/in/"])
    with pytest.raises(ConfigCompositionException):
        transform.main([*base, "instance_cont=2"])
    assert aws.requests() == []


def test_the_default_payload_is_the_handlers_photo_limit_and_fits_abids_photos():
    cfg = compose("transform", [])
    assert transform.job_environment(cfg)["BINCOUNT_MAX_IMAGE_BYTES"] == str(Limits().max_image_bytes)
    assert cfg.max_payload_mb * cfg.max_concurrent_transforms <= transform.MAX_PAYLOAD_MB
    if ABID_IMAGES.is_dir():  # MB counted as SageMaker may count them, 10**6 bytes: the smaller reading
        assert max(p.stat().st_size for p in ABID_IMAGES.glob("*.jpg")) < cfg.max_payload_mb * 10**6
