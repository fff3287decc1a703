"""The SageMaker Model Registry side of ``register`` and ``deploy``/``transform package_group=``: model package
groups, model packages (versions) with their held-out metrics, approval, and the latest approved one.

A package holds one inference specification per serving image (CPU, GPU), each listing its instance types
for endpoints and for transform jobs; a model made from it names the one for its instance type
(:func:`sagemaker_launch.serving_models.package_source`). See docs/sagemaker.md, "Model registry".
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("sagemaker_launch")

PENDING, APPROVED = "PendingManualApproval", "Approved"
# the held-out metrics a package records (metrics.json's keys), as CustomerMetadataProperties
METRIC_KEYS = ("acc", "obo_acc", "mae", "rmse", "n", "temperature", "ece_before", "ece_after")
EVAL_SET = "eval_set"
# an inference specification's instance types: for endpoints, for transform jobs (the lists' names)
REALTIME, TRANSFORM = "SupportedRealtimeInferenceInstanceTypes", "SupportedTransformInstanceTypes"


def image_device(image: str) -> str | None:
    """``"cpu"`` or ``"gpu"`` as an image's tag says (the AWS framework images' ``2.6.0-gpu-py312``),
    else ``None`` (a tag that doesn't say)."""
    tag = image.rpartition("/")[2].partition(":")[2]
    match = re.search(r"(?:^|[-.])(cpu|gpu)(?:[-.]|$)", tag)
    return match.group(1) if match else None


def ensure_group(sm, group: str, description: str) -> None:
    """Create model package group ``group`` (with ``description``) unless it exists.

    Raises:
        botocore.exceptions.ClientError: Any error but "does not exist".
    """
    from botocore.exceptions import ClientError

    try:
        sm.describe_model_package_group(ModelPackageGroupName=group)
        return
    except ClientError as err:
        error = err.response.get("Error", {})
        if error.get("Code") != "ValidationException" or "does not exist" not in error.get("Message", ""):
            raise
    sm.create_model_package_group(ModelPackageGroupName=group, ModelPackageGroupDescription=description)
    log.info("created model package group %s", group)


def latest_approved(sm, group: str) -> dict[str, Any] | None:
    """DescribeModelPackage of the newest approved package of ``group`` (by creation time), or ``None``."""
    page = sm.list_model_packages(ModelPackageGroupName=group, ModelApprovalStatus=APPROVED, SortBy="CreationTime",
                                  SortOrder="Descending", MaxResults=1)
    summaries = page.get("ModelPackageSummaryList", [])
    if not summaries:
        return None
    return sm.describe_model_package(ModelPackageName=summaries[0]["ModelPackageArn"])


def inference_specifications(sm, served: list[tuple[dict[str, Any], list[str]]]) -> dict[str, Any]:
    """``InferenceSpecification`` and ``AdditionalInferenceSpecifications`` (named by their image's device)
    of a package serving ``served``, each listing its instance types SageMaker offers for endpoints and
    for transform jobs (the service model's ``ProductionVariantInstanceType``, ``TransformInstanceType``).

    Returns:
        ``CreateModelPackage`` fields.

    Raises:
        ValueError: An instance type SageMaker offers for neither.
    """
    from bincount.serve.request import CONTENT_TYPES, JSON

    offered = {use: set(sm.meta.service_model.shape_for(shape).enum)
               for use, shape in ((REALTIME, "ProductionVariantInstanceType"), (TRANSFORM, "TransformInstanceType"))}
    specs, names = [], set()
    for i, (container, types) in enumerate(served):
        if unknown := [t for t in types if not any(t in o for o in offered.values())]:
            raise ValueError(f"{', '.join(unknown)}: not an instance type SageMaker offers for endpoints or "
                             "transform jobs")
        name = image_device(container["Image"]) or "image"
        if name in names:
            name = f"{name}{i + 1}"
        names.add(name)
        spec = {"Name": name, "Containers": [container], "SupportedContentTypes": list(CONTENT_TYPES),
                "SupportedResponseMIMETypes": [JSON]}
        spec.update({use: [t for t in types if t in offered[use]] for use in (REALTIME, TRANSFORM)
                     if any(t in offered[use] for t in types)})
        specs.append(spec)
    primary = {k: v for k, v in specs[0].items() if k != "Name"}
    additional = {"AdditionalInferenceSpecifications": specs[1:]} if specs[1:] else {}
    return {"InferenceSpecification": primary, **additional}


def create_package(sm, group: str, served: list[tuple[dict[str, Any], list[str]]], *, properties: dict[str, str],
                   card_content: str, description: str, generated_by: str) -> str:
    """Create a model package (a new version of ``group``), pending manual approval.

    Args:
        sm: A boto3 SageMaker client.
        group: The model package group (must exist: :func:`ensure_group`).
        served: ``(container, instance types)`` pairs, the package's own first (:func:`inference_specifications`).
        properties: ``CustomerMetadataProperties`` (at most 50; keys and values of letters,
            digits and ``_.:/=+-@``).
        card_content: The model card's ``ModelCardContent`` JSON.
        description: ``ModelPackageDescription`` (cut to 1024 characters).
        generated_by: ``MetadataProperties.GeneratedBy`` (where the model came from).

    Returns:
        The new package's ARN.

    Raises:
        ValueError: See :func:`inference_specifications`.
    """
    response = sm.create_model_package(
        ModelPackageGroupName=group,
        ModelPackageDescription=description[:1024],
        **inference_specifications(sm, served),
        ModelApprovalStatus=PENDING,
        MetadataProperties={"GeneratedBy": generated_by},
        CustomerMetadataProperties=properties,
        ModelCard={"ModelCardContent": card_content, "ModelCardStatus": "PendingReview"},
    )
    return response["ModelPackageArn"]


@dataclass(frozen=True)
class Decision:
    """What the approve-if-better rule decided: ``approve`` the new package or not, and one ``line``
    saying so, with both MAEs (or why they don't compare)."""

    approve: bool
    line: str


def decide(new: dict[str, str], current: dict[str, Any] | None, group: str) -> Decision:
    """Approve a new package only if its MAE beats the latest approved one's on the same evaluation set.

    Args:
        new: The new package's ``CustomerMetadataProperties`` (``mae``, ``eval_set``).
        current: DescribeModelPackage of the group's latest approved package, or ``None``.
        group: The group's name (for the line).

    Returns:
        Approve when there is no approved package, or the new MAE is strictly lower on the same
        ``eval_set``; not on an equal or worse MAE, another evaluation set, or no recorded MAE.
    """
    mae = float(new["mae"])
    if current is None:
        return Decision(True, f"approved: MAE {mae:.6g}, and {group} has no approved package yet (MAE none)")
    name = f"{group}/{current.get('ModelPackageVersion', current['ModelPackageArn'])}"
    recorded = current.get("CustomerMetadataProperties") or {}
    if "mae" not in recorded:
        return Decision(False, f"not approved: MAE {mae:.6g}, but approved {name} records no MAE to compare with")
    old = float(recorded["mae"])
    if recorded.get(EVAL_SET) != new[EVAL_SET]:
        return Decision(False, f"not approved: MAE {mae:.6g} vs {old:.6g} of approved {name}, but on another "
                               f"evaluation set ({new[EVAL_SET][:19]} vs {recorded.get(EVAL_SET, 'none')[:19]})")
    if mae < old:
        return Decision(True, f"approved: MAE {mae:.6g} < {old:.6g} of approved {name} (same evaluation set)")
    return Decision(False, f"not approved: MAE {mae:.6g} >= {old:.6g} of approved {name} (same evaluation set)")


def approve(sm, arn: str, properties: dict[str, str], description: str) -> None:
    """Set package ``arn`` to Approved with ``description`` (the decision's line); its ``properties`` are
    sent again unchanged, so a server that replaces rather than merges them (moto 5.2) keeps them."""
    sm.update_model_package(ModelPackageArn=arn, ModelApprovalStatus=APPROVED, ApprovalDescription=description[:1024],
                            CustomerMetadataProperties=properties)
