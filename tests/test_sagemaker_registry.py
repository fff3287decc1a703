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

from sagemaker_launch import deploy, register, run_report, serving_models, transform
from tests.fakes import model_archive, write_run_report
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

    monkeypatch.setattr(serving_models, "boto_session", with_moto_fixes(serving_models.boto_session))
    return boto3.client("sagemaker")


def put_object(key: str, body: bytes) -> str:
    import boto3

    boto3.client("s3").put_object(Bucket=BUCKET, Key=key, Body=body)
    return f"s3://{BUCKET}/{key}"


def register_run(runs, name: str, *extra: str):
    run_dir, _ = runs[name]
    model_data = put_object(f"runs/{name}/model.tar.gz", model_archive())  # the same model, uploaded
    return register.main([f"model_dir={run_dir / 'model'}", f"model_data={model_data}", f"group={GROUP}", *extra])


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


def create_training_job(sm, name: str, model: bytes | None = None) -> None:
    """A (completed) job in moto, with the layout SageMaker's has: ``<output path>/<job>/output/model.tar.gz``,
    holding ``model`` (default: a complete export's files)."""
    put_object(f"bincount/{name}/output/model.tar.gz", model_archive() if model is None else model)
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
    # one package serves on CPU and GPU instances, each type on its image (conf/register.yaml's types)
    cpu_types, gpu_types = ["ml.m5.large", "ml.m5.xlarge", "ml.c5.xlarge"], ["ml.g4dn.xlarge", "ml.g5.xlarge"]
    assert {k: v for k, v in first["InferenceSpecification"].items() if k.startswith("Supported") and "Types" in k
            and "Instance" in k} == {"SupportedRealtimeInferenceInstanceTypes": cpu_types,
                                     "SupportedTransformInstanceTypes": cpu_types}
    [gpu] = first["AdditionalInferenceSpecifications"]
    assert gpu["Name"] == "gpu" and gpu["SupportedRealtimeInferenceInstanceTypes"] == gpu_types
    assert gpu["Containers"] == [{**container, "Image": container["Image"].replace("-cpu-", "-gpu-")}]
    second = describe(sm, 2)  # registered for a GPU instance: the GPU image is the package's own
    assert "-gpu-" in second["InferenceSpecification"]["Containers"][0]["Image"] and "-cpu-" in container["Image"]
    assert second["InferenceSpecification"]["SupportedRealtimeInferenceInstanceTypes"] == ["ml.g4dn.xlarge",
                                                                                           "ml.g5.xlarge"]
    assert [(s["Name"], s["SupportedTransformInstanceTypes"]) for s in second["AdditionalInferenceSpecifications"]
            ] == [("cpu", ["ml.m5.large", "ml.m5.xlarge", "ml.c5.xlarge"])]

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
    model_data = f"model_data={put_object('m.tar.gz', model_archive())}"
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
    a, shuffled, relabelled = (run_report.eval_set_id(tmp_path / f"{n}.csv") for n in ("a", "shuffled", "relabelled"))
    assert a == shuffled != relabelled
    assert a == "sha256:" + hashlib.sha256(b"00001,3\n00002,2\n00003,1").hexdigest()


def test_a_job_that_did_not_complete_or_a_model_without_its_card_is_refused_by_every_command(sm, aws, runs):
    io_ = [f"input=s3://{BUCKET}/in/", f"output=s3://{BUCKET}/out/"]
    commands = {"deploy": lambda source: deploy.main([source, "endpoint=bincount-test"]),
                "register": lambda source: register.main([source, f"group={GROUP}"]),
                "transform": lambda source: transform.main([source.replace("job=", "model="), *io_])}
    create_training_job(sm, "stopped")  # its model.tar.gz is whole: the status alone refuses it
    sm.stop_training_job(TrainingJobName="stopped")
    create_training_job(sm, "no-card", model_archive("model.onnx", "model.pt", "code/inference.py"))
    no_weights = put_object("runs/no-weights/model.tar.gz",
                            model_archive("model.onnx", "model_config.json", "code/inference.py"))
    no_onnx = put_object("runs/no-onnx/model.tar.gz", model_archive("model.pt", "model_config.json", "code/inference.py"))
    for name, command in commands.items():
        with pytest.raises(ValueError, match="^training job stopped is Stopped: only a Completed job's model is "
                                             "served or registered; its model may be partial: train it again$"):
            command("job=stopped")
        with pytest.raises(ValueError, match=rf"^s3://{BUCKET}/bincount/no-card/output/model.tar.gz lacks the model "
                                             r"card model_config.json: not a complete model"):
            command("job=no-card")
        if name != "register":  # register reads model_data with a local model_dir (below)
            with pytest.raises(ValueError, match=rf"^{no_weights} lacks model.pt: not a complete model"):
                command(f"model_data={no_weights}")
            with pytest.raises(ValueError, match=rf"^{no_onnx} lacks model.onnx: not a complete model"):
                command(f"model_data={no_onnx}")
    run_dir, _ = runs["base"]
    with pytest.raises(ValueError, match=rf"^{no_weights} lacks model.pt"):
        register.main([f"model_dir={run_dir / 'model'}", f"model_data={no_weights}", f"group={GROUP}"])
    made = [r["target"] for r in aws.requests() if r["target"].startswith("SageMaker.Create")]
    assert made == ["SageMaker.CreateTrainingJob"] * 2  # the test's own: nothing else was created


def create_package(sm, image: str, **lists) -> str:
    """A package registered by other means: one inference specification, on ``image``."""
    from sagemaker_launch import model_packages

    model_packages.ensure_group(sm, GROUP, "test")
    return sm.create_model_package(ModelPackageGroupName=GROUP, ModelApprovalStatus=APPROVED, InferenceSpecification={
        "Containers": [{"Image": image, "ModelDataUrl": f"s3://{BUCKET}/m.tar.gz"}],
        "SupportedContentTypes": ["image/jpeg"], "SupportedResponseMIMETypes": ["application/json"], **lists,
    })["ModelPackageArn"]


def test_a_package_serves_on_the_image_of_the_instance_type_or_is_refused(sm, aws, runs):
    register_run(runs, "base", "approve_if_better=true")
    [arn] = [p["ModelPackageArn"] for p in summaries(sm).values()]
    gpu = deploy.main([f"package_group={GROUP}", "endpoint=bincount-test", "instance_type=ml.g4dn.xlarge"])
    job = transform.main([f"package_group={GROUP}", f"input=s3://{BUCKET}/in/", f"output=s3://{BUCKET}/out/",
                          "instance_type=ml.g5.xlarge"])
    cpu = transform.main([f"model={arn}", f"input=s3://{BUCKET}/in/", f"output=s3://{BUCKET}/out/",
                          "instance_type=ml.c5.xlarge"])
    models_made = {m["ModelName"]: m["PrimaryContainer"] for m in aws.calls("CreateModel")}
    assert models_made[gpu.model] == models_made[job.job_name] == {"ModelPackageName": arn,
                                                                   "InferenceSpecificationName": "gpu"}
    assert models_made[cpu.job_name] == {"ModelPackageName": arn}  # the package's own specification: CPU
    assert "-gpu-" in gpu.image_uri and gpu.model_data == f"s3://{BUCKET}/runs/base/model.tar.gz"
    assert sm.describe_model(ModelName=gpu.model)["PrimaryContainer"]["InferenceSpecificationName"] == "gpu"

    aws.post("/moto-api/recorder/reset-recording")
    with pytest.raises(ValueError, match=rf"^model package {arn} does not serve on ml.c5.2xlarge: it lists "
                                         r"ml.m5.large, ml.m5.xlarge, ml.c5.xlarge, ml.g4dn.xlarge, ml.g5.xlarge for "
                                         r"endpoints; give instance_type=ml.m5.large .* register the model again with "
                                         r"instance_type=ml.c5.2xlarge"):
        deploy.main([f"package_group={GROUP}", "endpoint=bincount-test", "instance_type=ml.c5.2xlarge"])
    # a package that lists no instance types: its image's device must be the instance's
    other = create_package(sm, "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-inference:2.6.0-cpu-py312")
    with pytest.raises(ValueError, match=rf"^model package {other} runs the CPU image .*, and ml.g4dn.xlarge is a GPU "
                                         "instance: give a CPU instance_type, or register the model again"):
        transform.main([f"model={other}", f"input=s3://{BUCKET}/in/", f"output=s3://{BUCKET}/out/",
                        "instance_type=ml.g4dn.xlarge"])
    assert [r for r in aws.requests() if r["target"] in ("SageMaker.CreateModel", "SageMaker.CreateTransformJob",
                                                         "SageMaker.CreateEndpointConfig")] == []


def test_the_register_dry_run_checks_and_prints_the_package_and_sends_nothing(aws, runs, capsys):
    model_data = put_object("runs/base/model.tar.gz", model_archive())
    aws.post("/moto-api/recorder/reset-recording")
    run_dir, metrics = runs["base"]
    local = register.main([f"model_dir={run_dir / 'model'}", f"model_data={model_data}", f"group={GROUP}",
                           "--approve-if-better", "--dry-run"])
    job = register.main(["job=bincount-20261203024536", f"group={GROUP}", "--dry-run"])  # nothing looked up
    assert aws.requests() == []
    assert local.arn == "" and local.request["CustomerMetadataProperties"]["mae"] == repr(metrics["mae"])
    assert [s["Name"] for s in local.request["AdditionalInferenceSpecifications"]] == ["gpu"]
    assert job.request["InferenceSpecification"]["Containers"][0]["ModelDataUrl"].endswith(
        "/bincount-20261203024536/output/model.tar.gz")
    out = capsys.readouterr().out
    assert out.count(f"DRY RUN: CreateModelPackage in group {GROUP} (not sent") == 2
    assert "approve_if_better: not decided in a dry run" in out
