"""`bincount data fetch` against a fake public bucket in a real local S3 server (SeaweedFS)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from botocore.exceptions import InvalidRetryModeError

from bincount.data.fetch import fetch
from bincount.data.selection import choose_per_class, parse_id_ranges, select_and_fetch
from bincount.data.prepare import prepare
from bincount.data.s3 import S3Error, make_client, split_s3_uri
from bincount.data.stream import allow_http_in_litdata
from tests.conftest_s3 import PRIVATE_BUCKET, PUBLIC_BUCKET
from tests.fakes import make_fake_abid

REPO = Path(__file__).resolve().parents[1]
N_PHOTOS = 120  # enough that a one-thread fetch is still busy when the resume test kills it
MISSING_IMAGES = {"00007", "00019"}  # keys the bucket lacks (404)
MISSING_METADATA = {"00011"}
CORRUPT = "00023"  # uploaded with its middle zeroed: fetch copies it, prepare must reject it


@pytest.fixture(scope="module")
def public_bucket(s3_server, tmp_path_factory):
    """The fake ``aft-vbi-pds``: N_PHOTOS tiny photos + metadata, some keys missing, one corrupt JPEG."""
    src = tmp_path_factory.mktemp("public_src")
    made = make_fake_abid(src, n=N_PHOTOS, bad=False)
    data = bytearray((src / "bin-images" / f"{CORRUPT}.jpg").read_bytes())
    data[4:-2] = b"\x00" * (len(data) - 6)
    (src / "bin-images" / f"{CORRUPT}.jpg").write_bytes(bytes(data))
    client = s3_server.client()
    s3_server.empty_bucket(PUBLIC_BUCKET)
    for image_id in made["good"]:
        if image_id not in MISSING_IMAGES:
            client.upload_file(str(src / "bin-images" / f"{image_id}.jpg"), PUBLIC_BUCKET, f"bin-images/{image_id}.jpg")
        if image_id not in MISSING_METADATA:
            client.upload_file(str(src / "metadata" / f"{image_id}.json"), PUBLIC_BUCKET, f"metadata/{image_id}.json")
    return s3_server, src, made["good"]


def test_parse_id_ranges():
    assert parse_id_ranges("1-3,7,3") == ["00001", "00002", "00003", "00007"]
    assert parse_id_ranges("123456") == ["123456"]
    for bad in ("3-1", "0", "a-b", "1-", ""):
        with pytest.raises(ValueError, match="--ids"):
            parse_id_ranges(bad)


def test_choose_per_class_is_balanced_and_reproducible():
    counts = {f"{i:05d}": i % 4 for i in range(1, 41)} | {"x": -1}
    chosen = choose_per_class(counts, 3, max_count=2, seed=1)
    assert sorted(counts[i] for i in chosen) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert chosen == choose_per_class(counts, 3, max_count=2, seed=1)
    assert chosen != choose_per_class(counts, 3, max_count=2, seed=2)


def test_s3_uri_and_error_messages():
    assert split_s3_uri("s3://b/abid/v1/") == ("b", "abid/v1")
    with pytest.raises(ValueError, match="not an S3 URI"):
        split_s3_uri("/local/path")
    with pytest.raises(InvalidRetryModeError, match='"mode": "forever"'):
        make_client(retry_mode="forever")


@pytest.mark.integration
def test_fetch_reports_missing_keys_and_copies_bytes_exactly(public_bucket, tmp_path):
    server, src, good = public_bucket
    out = tmp_path / "abid"
    report = fetch(sorted(good), out, bucket=PUBLIC_BUCKET, endpoint_url=server.endpoint, workers=4, progress=False)
    assert set(report.missing["images"]) == MISSING_IMAGES
    assert set(report.missing["metadata"]) == MISSING_METADATA
    assert set(report.fetched["images"]) == set(good) - MISSING_IMAGES
    for image_id in report.fetched["images"]:
        name = f"bin-images/{image_id}.jpg"
        assert (out / name).read_bytes() == (src / name).read_bytes()
    on_disk = json.loads((out / "fetch_report.json").read_text())
    assert sorted(on_disk["missing"]["images"]) == sorted(MISSING_IMAGES)
    assert on_disk["error"] is None and on_disk["photos_per_second"] > 0
    assert not list(out.rglob("*.part"))

    manifest = prepare(out, str(tmp_path / "shards"), chunk_bytes="64KB", num_workers=2, start_method="fork",
                       eda=False, progress=False, block_size=4)
    assert manifest["rejected"].keys() == {CORRUPT}, "prepare must catch the corrupt photo fetch copied"
    kept = {i for entry in manifest["splits"].values() for i in entry["image_ids"]}
    assert kept == set(good) - MISSING_IMAGES - MISSING_METADATA - {CORRUPT}


@pytest.mark.integration
def test_fetch_resumes_after_being_killed_half_way(public_bucket, tmp_path):
    server, _, good = public_bucket
    out = tmp_path / "abid"
    ids = sorted(good)
    (out / "bin-images").mkdir(parents=True)
    (out / "bin-images" / "00001.jpg.123.456.part").write_bytes(b"half a photo")  # left by an older crash
    cmd = [sys.executable, "-m", "bincount.cli", "data", "fetch", "--ids", f"1-{N_PHOTOS}", "--out", str(out),
           "--bucket", PUBLIC_BUCKET, "--endpoint-url", server.endpoint, "--workers", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while len(list((out / "bin-images").glob("*.jpg"))) < 5:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "fetch made no progress"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "bin-images").glob("*.jpg")}
    assert 5 <= len(before) < len(good) - len(MISSING_IMAGES), "the first run was not interrupted half way"

    report = fetch(ids, out, bucket=PUBLIC_BUCKET, endpoint_url=server.endpoint, workers=4, progress=False)
    fetched_now = {f"{i}.jpg" for i in report.fetched["images"]}
    assert not fetched_now & before.keys(), "a photo was fetched twice"
    assert fetched_now | before.keys() == {f"{i}.jpg" for i in set(good) - MISSING_IMAGES}
    assert report.present["images"] == len(before)
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "bin-images").glob("*.jpg")
            if p.name in before} == before
    assert not list(out.rglob("*.part"))


@pytest.mark.integration
def test_per_class_fetch_uses_metadata_when_the_ids_have_no_counts(public_bucket, tmp_path):
    server, _, good = public_bucket
    out = tmp_path / "abid"
    report = select_and_fetch(out, id_spec="1-30", per_class=2, max_count=3, bucket=PUBLIC_BUCKET,
                              endpoint_url=server.endpoint, workers=4, progress=False)
    photos = {p.stem for p in (out / "bin-images").glob("*.jpg")}
    assert photos == set(report.fetched["images"])
    assert sorted(good[i] for i in photos) == [1, 1, 2, 2, 3, 3]
    assert not photos & MISSING_METADATA  # no count known, so never chosen


@pytest.mark.integration
def test_fetch_all_lists_the_bucket_and_label_list_is_kept(public_bucket, tmp_path):
    server, _, good = public_bucket
    out = tmp_path / "abid"
    report = select_and_fetch(out, all_ids=True, bucket=PUBLIC_BUCKET, endpoint_url=server.endpoint,
                              progress=False)
    assert report.requested == len(good) - len(MISSING_IMAGES)
    assert not report.missing["images"] and set(report.missing["metadata"]) == MISSING_METADATA

    listed = tmp_path / "file_list.json"
    listed.write_text(json.dumps({"2": ["data/metadata/00002.json"], "3": ["data/metadata/00003.json"]}))
    report = select_and_fetch(tmp_path / "sub", list_path=listed, bucket=PUBLIC_BUCKET,
                              endpoint_url=server.endpoint, progress=False)
    assert sorted(report.fetched["images"]) == ["00002", "00003"]
    assert (tmp_path / "sub" / "lists" / "file_list.json").read_text() == listed.read_text()


@pytest.mark.integration
def test_fatal_s3_errors_stop_the_run_with_a_clear_message(public_bucket, tmp_path):
    server, _, _ = public_bucket
    with pytest.raises(S3Error, match="access denied"):  # anonymous may not read a private bucket
        fetch(["00001"], tmp_path / "a", bucket=PRIVATE_BUCKET, endpoint_url=server.endpoint, progress=False)
    assert json.loads((tmp_path / "a" / "fetch_report.json").read_text())["error"].startswith("S3Error")
    client = server.client()
    with pytest.raises(S3Error, match="NoSuchBucket"):
        fetch(["00001"], tmp_path / "b", bucket="no-such-bucket", client=client, progress=False)
    with pytest.raises(S3Error, match="cannot reach the S3 endpoint"):
        fetch(["00001"], tmp_path / "c", endpoint_url="http://127.0.0.1:9", max_attempts=1, progress=False)


def test_http_workaround_applies_to_http_endpoints_only():
    """Also fails loudly when a litdata upgrade moves the obstore options the workaround patches."""
    from litdata.streaming import downloader

    options = downloader._OBSTORE_CLIENT_OPTIONS
    before = dict(options)
    try:
        assert allow_http_in_litdata("https://s3.example.com") is False
        assert allow_http_in_litdata("http://127.0.0.1:1") is True
        assert options["allow_http"] == "true"
    finally:
        options.clear()
        options.update(before)
