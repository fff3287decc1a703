"""The model registry: ``register`` creates model packages carrying a run's held-out metrics,
``approve_if_better`` approves only a better MAE on the same test photos, and ``deploy
package_group=`` serves the latest approved package. Every request goes through boto3 / the SDK to
the local moto server and is checked against the service model; what the tests assert is read
back from the server (or its request recording), not from the functions' return values."""

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from sagemaker_launch import deploy, models, register, transform
from tests.fakes import write_run_report
from tests.moto_server import BUCKET, ROLE, aws, moto_server, with_moto_fixes  # noqa: F401  (fixtures)

GROUP = "bincount-counting"
PENDING, APPROVED = "PendingManualApproval", "Approved"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """Run folders with their metrics: MAE 0.25 (``base``, and ``equal``: the same), 0.4 (``worse``),
    0.15 (``middle``), 0.1 (``better``) on photos 1-20; 0.05 on photos 101-120 (``other_set``)."""
    tmp = tmp_path_factory.mktemp("runs")
    made = {"base": {"wrong": 5}, "equal": {"wrong": 5}, "worse": {"wrong": 8}, "middle": {"wrong": 3},
            "better": {"wrong": 2}, "other_set": {"wrong": 1, "first_id": 101}}
    return {name: (tmp / name, write_run_report(tmp / name, **kwargs)) for name, kwargs in made.items()}


@pytest.fixture
def sm(aws, monkeypatch):
    """The SDK sessions of deploy and register on moto (requests checked); a boto3 client to read back with."""
    import boto3

    monkeypatch.setattr(models, "boto_session", with_moto_fixes(models.boto_session))
    return boto3.client("sagemaker")


def register_run(runs, name: str, *extra: str):
    run_dir, _ = runs[name]
    return register.main([f"model_dir={run_dir / 'model'}", f"model_data=s3://{BUCKET}/runs/{name}/model.tar.gz",
                          f"group={GROUP}", *extra])


def summaries(sm) -> dict[int, dict]:
    """The group's packages on the server, by version (ListModelPackages)."""
    packages = sm.list_model_packages(ModelPackageGroupName=GROUP, MaxResults=100)["ModelPackageSummaryList"]
    return {p["ModelPackageVersion"]: p for p in packages}


def approval_statuses(sm) -> dict[int, str]:
    return {version: p["ModelApprovalStatus"] for version, p in summaries(sm).items()}


def describe(sm, version: int) -> dict:
    return sm.describe_model_package(ModelPackageName=summaries(sm)[version]["ModelPackageArn"])


def expected_eval_set(first_id: int, n: int = 20) -> str:
    """The photos and true counts write_run_report's predictions.csv holds, hashed as the docs say."""
    lines = sorted(f"{first_id + i:05d},{1 + i % 5}" for i in range(n))
    return "sha256:" + hashlib.sha256("\n".join(lines).encode()).hexdigest()


def create_training_job(sm, name: str) -> None:
    """A (completed) job in moto, with the layout SageMaker's has: ``<output path>/<job>/output/model.tar.gz``."""
    sm.create_training_job(
        TrainingJobName=name, RoleArn=ROLE, OutputDataConfig={"S3OutputPath": f"s3://{BUCKET}/bincount"},
        AlgorithmSpecification={"TrainingImage": "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-training:2.6.0-"
                                                 "cpu-py312", "TrainingInputMode": "File"},
        ResourceConfig={"InstanceType": "ml.m5.large", "InstanceCount": 1, "VolumeSizeInGB": 10},
        StoppingCondition={"MaxRuntimeInSeconds": 3600})


def test_register_a_training_job_with_its_held_out_metrics(sm, aws, runs, capsys):
    import boto3
    from sagemaker.core.shapes.model_card_shapes import ModelCardContent

    job = "bincount-20261203024536"
    create_training_job(sm, job)
    run_dir, metrics = runs["base"]
    archive = io.BytesIO()  # output.tar.gz: SageMaker packs the run folder ($SM_OUTPUT_DATA_DIR) as it is
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        tar.add(run_dir, arcname=".")
    boto3.client("s3").put_object(Bucket=BUCKET, Key=f"bincount/{job}/output/output.tar.gz", Body=archive.getvalue())

    register.main([f"job={job}", f"group={GROUP}"])
    register.main([f"job={job}", f"group={GROUP}", "instance_type=ml.g4dn.xlarge"])
    assert [g["ModelPackageGroupName"] for g in aws.calls("CreateModelPackageGroup")] == [GROUP]  # once
    assert sm.describe_model_package_group(ModelPackageGroupName=GROUP)["ModelPackageGroupStatus"] == "Completed"
    assert approval_statuses(sm) == {1: PENDING, 2: PENDING}
    first = describe(sm, 1)
    assert first["ModelPackageArn"] in capsys.readouterr().out
    assert first["CustomerMetadataProperties"] == {
        **{k: repr(metrics[k]) for k in ("acc", "obo_acc", "mae", "rmse", "n", "temperature", "ece_before",
                                         "ece_after")},
        "eval_set": expected_eval_set(1), "bincount_version": first["CustomerMetadataProperties"]["bincount_version"]}
    assert float(first["CustomerMetadataProperties"]["mae"]) == 0.25 and metrics["n"] == 20

    # the package's container is the one deploying the job creates: same image, model.tar.gz, handler
    deploy.main([f"job={job}", "endpoint=bincount-test"])
    [model] = aws.calls("CreateModel")
    [container] = first["InferenceSpecification"]["Containers"]
    assert container == {k: model["PrimaryContainer"][k] for k in ("Image", "ModelDataUrl", "Environment")}
    assert container["ModelDataUrl"] == f"s3://{BUCKET}/bincount/{job}/output/model.tar.gz"
    assert container["Environment"]["SAGEMAKER_PROGRAM"] == "inference.py"
    assert first["InferenceSpecification"]["SupportedRealtimeInferenceInstanceTypes"] == ["ml.m5.large"]
    second = describe(sm, 2)["InferenceSpecification"]
    assert "-gpu-" in second["Containers"][0]["Image"] and "-cpu-" in container["Image"]

    # moto keeps no ModelCard: what SageMaker received is in the request
    [request, _] = aws.calls("CreateModelPackage")
    assert request["ModelCard"]["ModelCardStatus"] == "PendingReview"
    card = ModelCardContent.model_validate_json(request["ModelCard"]["ModelCardContent"])
    [evaluation] = card.evaluation_details
    assert evaluation.metadata == {"eval_set": expected_eval_set(1)}
    assert "test split of s3://bincount-test/abid/subset (split=block" in evaluation.evaluation_observation
    values = {m.name: m.value for group in evaluation.metric_groups for m in group.metric_data}
    for key in ("acc", "obo_acc", "mae", "rmse", "n", "temperature", "ece_before", "ece_after", "review_threshold"):
        assert values[key] == pytest.approx(metrics[key]), key
    assert card.model_overview.model_artifact == [container["ModelDataUrl"]]


def test_approve_if_better_compares_with_the_latest_approved_package_on_the_same_photos(sm, aws, runs, capsys):
    def decision(name: str) -> str:
        register_run(runs, name, "--approve-if-better")  # the flag; deploy's test uses approve_if_better=true
        return capsys.readouterr().out.strip().splitlines()[-1]

    assert decision("base") == f"approved: MAE 0.25, and {GROUP} has no approved package yet (MAE none)"
    assert decision("worse") == f"not approved: MAE 0.4 >= 0.25 of approved {GROUP}/1 (same evaluation set)"
    assert decision("equal") == f"not approved: MAE 0.25 >= 0.25 of approved {GROUP}/1 (same evaluation set)"
    assert decision("better") == f"approved: MAE 0.1 < 0.25 of approved {GROUP}/1 (same evaluation set)"
    # beats version 1, but not the latest approved, version 4
    assert decision("middle") == f"not approved: MAE 0.15 >= 0.1 of approved {GROUP}/4 (same evaluation set)"
    assert decision("other_set").startswith(f"not approved: MAE 0.05 vs 0.1 of approved {GROUP}/4, but on another "
                                            f"evaluation set ({expected_eval_set(101)[:19]} vs ")
    register_run(runs, "better")  # without approve_if_better: left for a person
    assert approval_statuses(sm) == {1: APPROVED, 2: PENDING, 3: PENDING, 4: APPROVED, 5: PENDING, 6: PENDING,
                                     7: PENDING}
    assert len(aws.calls("UpdateModelPackage")) == 2
    approved = describe(sm, 4)
    assert approved["ApprovalDescription"] == f"approved: MAE 0.1 < 0.25 of approved {GROUP}/1 (same evaluation set)"
    assert approved["CustomerMetadataProperties"]["mae"] == repr(runs["better"][1]["mae"])  # kept by the update


def test_deploy_from_a_group_serves_its_latest_approved_package(sm, aws, runs):
    register_run(runs, "base", "approve_if_better=true")
    register_run(runs, "better", "approve_if_better=true")
    register_run(runs, "other_set")  # newer and pending
    arns = {version: p["ModelPackageArn"] for version, p in summaries(sm).items()}
    made = deploy.main([f"package_group={GROUP}", "endpoint=bincount-test"])
    [model] = aws.calls("CreateModel")
    assert model["PrimaryContainer"] == {"ModelPackageName": arns[2]}
    assert made.model_data == f"s3://{BUCKET}/runs/better/model.tar.gz" and "pytorch-inference" in made.image_uri
    assert sm.describe_model(ModelName=made.model)["PrimaryContainer"] == {"ModelPackageName": arns[2]}

    # a person approves the newer package: deploying the group again updates the endpoint to it
    sm.update_model_package(ModelPackageArn=arns[3], ModelApprovalStatus=APPROVED)
    again = deploy.main([f"package_group={GROUP}", "endpoint=bincount-test",
                         "+environment.BINCOUNT_REVIEW_THRESHOLD=0.9"])
    assert again.previous_config == made.model
    assert aws.calls("CreateModel")[1]["PrimaryContainer"] == {"ModelPackageName": arns[3],
                                                               "Environment": {"BINCOUNT_REVIEW_THRESHOLD": "0.9"}}
    assert aws.calls("UpdateEndpoint") == [{"EndpointName": "bincount-test", "EndpointConfigName": again.model}]
    # a Batch Transform job from the group runs the same package
    job = transform.main([f"package_group={GROUP}", f"input=s3://{BUCKET}/in/", f"output=s3://{BUCKET}/out/"])
    assert sm.describe_model(ModelName=job.job_name)["PrimaryContainer"] == {"ModelPackageName": arns[3]}

    with pytest.raises(ValueError, match="model package group empty-group has no approved package"):
        deploy.main(["package_group=empty-group", "endpoint=bincount-test"])
    with pytest.raises(ValueError, match="exactly one of model_data"):
        deploy.main([f"package_group={GROUP}", "model_data=s3://x/model.tar.gz", "endpoint=bincount-test"])


def test_register_arguments_and_missing_reports_fail_with_one_clear_error(sm, aws, runs, tmp_path, capsys):
    run_dir, _ = runs["base"]
    model_data = f"model_data=s3://{BUCKET}/m.tar.gz"
    with pytest.raises(ValueError, match="register needs group="):
        register.main([f"model_dir={run_dir / 'model'}", model_data])
    for args in ([f"model_dir={run_dir / 'model'}"], ["job=j", f"model_dir={run_dir / 'model'}", model_data],
                 ["job=j", model_data], []):
        with pytest.raises(ValueError, match="give job=<training job name>, or model_dir="):
            register.main([f"group={GROUP}", *args])
    with pytest.raises(SystemExit) as exit_info:
        register.main([f"group={GROUP}", "approve"])
    assert exit_info.value.code == 2
    assert "error: unrecognized arguments: approve (arguments are key=value overrides)" in capsys.readouterr().err
    (tmp_path / "model").mkdir()
    with pytest.raises(FileNotFoundError, match="metrics.json not found: a training run's folder holds"):
        register.main([f"group={GROUP}", f"model_dir={tmp_path / 'model'}", model_data])
    (tmp_path / "metrics.json").write_text(json.dumps({"acc": 0.5}))
    (tmp_path / "predictions.csv").write_text("image_id,expected_quantity\n")
    with pytest.raises(ValueError, match="has no mae: not a test report"):
        register.main([f"group={GROUP}", f"model_dir={tmp_path / 'model'}", model_data])
    create_training_job(sm, "unfinished")
    with pytest.raises(ValueError, match=f"s3://{BUCKET}/bincount/unfinished/output/output.tar.gz not found"):
        register.main([f"group={GROUP}", "job=unfinished"])
    assert aws.calls("CreateModelPackageGroup") == [] and aws.calls("CreateModelPackage") == []


def test_the_evaluation_set_is_the_photos_and_their_counts_in_any_order(tmp_path):
    import torch

    from bincount.report import write_predictions_csv

    ids, target = ["00003", "00001", "00002"], torch.tensor([0, 2, 1])
    probs = torch.full((3, 5), 0.2)
    order = torch.tensor([2, 0, 1])
    for name, (i, t) in {"a": (ids, target), "shuffled": ([ids[k] for k in order], target[order]),
                         "relabelled": (ids, torch.tensor([0, 2, 2]))}.items():
        write_predictions_csv(tmp_path / f"{name}.csv", i, t, probs, min_count=1)
    a, shuffled, relabelled = (register.eval_set_id(tmp_path / f"{n}.csv") for n in ("a", "shuffled", "relabelled"))
    assert a == shuffled != relabelled
    assert a == "sha256:" + hashlib.sha256(b"00001,3\n00002,2\n00003,1").hexdigest()
