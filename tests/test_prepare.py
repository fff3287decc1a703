"""`bincount data prepare`: validation, the training core's split, litdata shards, EDA, S3 output."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from litdata import StreamingDataset
from PIL import Image

from bincount.cli import main as bincount_cli
from bincount.data.abid import build_index
from bincount.data.decode import decode_rgb_bytes
from bincount.data.prepare import STAGING_PREFIX, prepare
from bincount.data.s3 import S3Error, upload_tree
from bincount.data.shards import MANIFEST, read_manifest
from bincount.data.splits import block_split
from tests.conftest_s3 import DATA_BUCKET
from tests.fakes import corrupt_middle, make_fake_abid

SPLIT = {"val_fraction": 0.2, "test_fraction": 0.2, "block_size": 2, "seed": 3}
FAST = {"chunk_bytes": "8KB", "num_workers": 2, "start_method": "fork", "progress": False}
CORRUPT = "00007"


@pytest.fixture(scope="module")
def abid_folder(tmp_path_factory):
    """24 fake photos plus the bad inputs of tests/fakes.py, and one photo corrupt only inside."""
    root = tmp_path_factory.mktemp("abid")
    made = make_fake_abid(root, n=24)
    corrupt_middle(root / "bin-images" / f"{CORRUPT}.jpg")
    return root, made


def read_split(uri: str, **kwargs) -> dict[str, dict]:
    """Every sample of a litdata split, by image id."""
    return {s["image_id"]: s for s in StreamingDataset(uri, **kwargs)}


def test_prepare_writes_the_training_core_split_as_shards_and_rejects_corrupt_photos(abid_folder, tmp_path):
    root, made = abid_folder
    out = tmp_path / "shards"
    ctrl_c = signal.getsignal(signal.SIGINT)
    manifest = prepare(root, str(out), **SPLIT, **FAST)
    assert signal.getsignal(signal.SIGINT) is ctrl_c  # not litdata's handler, which would exit 0 on Ctrl-C

    records, _ = build_index(root, min_count=1, max_count=5)
    expected = block_split(records, **SPLIT)
    assert manifest["rejected"].keys() == {CORRUPT} and "decode" in manifest["rejected"][CORRUPT]
    for name, recs in expected.items():
        kept = [r for r in recs if r.image_id != CORRUPT]
        entry = manifest["splits"][name]
        assert entry["image_ids"] == [r.image_id for r in kept]
        assert entry["counts"] == [r.expected_quantity for r in kept]
        samples = read_split(str(out / name))
        assert samples.keys() == set(entry["image_ids"])
        for image_id, sample in samples.items():
            assert sample["count"] == made["good"][image_id]
            assert sample["image"] == (root / "bin-images" / f"{image_id}.jpg").read_bytes()  # no resize: as is
        assert manifest["shards"][name]["photos"] == len(kept)
    assert manifest["shards"]["train"]["chunks"] > 1
    assert read_manifest(str(out)) == json.loads((out / MANIFEST).read_text()) == manifest

    summary = json.loads((out / "eda" / "summary.json").read_text())
    kept_counts = Counter(c for image_id, c in made["good"].items() if image_id != CORRUPT)
    assert summary["photos"] == len(made["good"]) - 1 == 23
    assert summary["by_count"] == {str(c): n for c, n in sorted(kept_counts.items())}
    assert summary["width_px"] == {"min": 64, "median": 64, "max": 64}
    for png in ("class_histogram.png", "image_sizes.png", "sample_grid.png"):
        with Image.open(out / "eda" / png) as img:
            assert img.format == "PNG" and min(img.size) > 200

    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare(root, str(out), **SPLIT, **FAST)


def test_resize_shrinks_large_photos_only(tmp_path):
    root = tmp_path / "abid"
    make_fake_abid(root, n=25, bad=False)
    Image.new("RGB", (44, 36), (200, 10, 10)).save(root / "bin-images" / "00002.jpg")  # already small
    manifest = prepare(root, str(tmp_path / "out"), resize=40, quality=80, eda=False, **SPLIT, **FAST)
    shapes = {}
    for name, entry in manifest["splits"].items():
        for image_id, sample in read_split(str(tmp_path / "out" / name)).items():
            shapes[image_id] = tuple(decode_rgb_bytes(sample["image"]).shape)
    assert shapes.pop("00002") == (3, 36, 44)
    assert set(shapes.values()) == {(3, 40, 40)}
    assert not (tmp_path / "out" / "eda").exists()


def test_prepare_overwrite_and_bad_input_errors(abid_folder, tmp_path, capsys):
    root, _ = abid_folder
    out = tmp_path / "out"
    prepare(root, str(out), max_count=3, eda=False, **SPLIT, **FAST)
    manifest = prepare(root, str(out), max_count=5, eda=False, overwrite=True, **SPLIT, **FAST)
    assert read_manifest(str(out))["max_count"] == manifest["max_count"] == 5

    assert bincount_cli(["data", "prepare", "--in", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "bin-images not found" in capsys.readouterr().err
    assert bincount_cli(["data", "prepare", "--in", str(root), "--out", str(out)]) == 2  # the `bincount` command
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="bincount data prepare"):
        read_manifest(str(tmp_path / "x"))
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / MANIFEST).write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a bincount-abid-shards"):
        read_manifest(str(tmp_path / "x"))


@pytest.mark.integration
def test_prepare_into_s3_uploads_chunks_then_manifest(abid_folder, s3_env, tmp_path):
    root, _ = abid_folder
    uri = f"s3://{DATA_BUCKET}/prepare-test/v1"
    s3_env.empty_bucket(DATA_BUCKET, "prepare-test/")
    manifest = prepare(root, uri, staging_dir=str(tmp_path), **SPLIT, **FAST)
    assert read_manifest(uri) == manifest
    listing = s3_env.client().list_objects_v2(Bucket=DATA_BUCKET, Prefix="prepare-test/v1/")
    keys = {o["Key"] for o in listing["Contents"]}
    for name in ("manifest.json", "train/index.json", "val/index.json", "test/index.json", "eda/summary.json",
                 "eda/sample_grid.png", "eda/class_histogram.png", "eda/image_sizes.png"):
        assert f"prepare-test/v1/{name}" in keys, name
    assert not list(tmp_path.iterdir()), "the staging folder is removed after the upload"
    with pytest.raises(FileExistsError):
        prepare(root, uri, **SPLIT, **FAST)


@pytest.mark.integration
def test_upload_order_puts_each_index_after_its_chunks_and_the_manifest_last(s3_env, tmp_path):
    for name in ("train/chunk-0-0.bin", "train/index.json", "train/chunk-1-0.bin", "manifest.json", "eda/a.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    client = s3_env.client()
    order = []

    class Recording:
        def upload_file(self, filename, bucket, key, **kwargs):
            order.append(key.removeprefix("order/"))
            return client.upload_file(filename, bucket, key, **kwargs)

    assert upload_tree(tmp_path, f"s3://{DATA_BUCKET}/order", client=Recording(), progress=False,
                       last=["manifest.json"]) == 5
    assert order[-1] == "manifest.json"
    assert order.index("train/index.json") > max(order.index("train/chunk-0-0.bin"), order.index("train/chunk-1-0.bin"))
    assert client.get_object(Bucket=DATA_BUCKET, Key="order/manifest.json")["Body"].read() == b"x"


@pytest.mark.integration
def test_s3_failures_stop_prepare_before_any_work(abid_folder, s3_env, monkeypatch, tmp_path):
    root, _ = abid_folder
    with pytest.raises(S3Error, match="NoSuchBucket"):
        prepare(root, "s3://no-such-bucket/abid/v1", staging_dir=str(tmp_path), **SPLIT, **FAST)
    with pytest.raises(S3Error, match="cannot reach the S3 endpoint"):
        prepare(root, f"s3://{DATA_BUCKET}/x", endpoint_url="http://127.0.0.1:9", **SPLIT, **FAST)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(S3Error, match="credentials rejected|access denied"):
        prepare(root, f"s3://{DATA_BUCKET}/x", **SPLIT, **FAST)
    assert not list(tmp_path.iterdir())


def test_reject_reasons_say_what_is_wrong_without_the_decoders_build_path(abid_folder):
    root, _ = abid_folder
    with pytest.raises(ValueError) as caught:
        decode_rgb_bytes((root / "bin-images" / f"{CORRUPT}.jpg").read_bytes())
    assert str(caught.value).startswith("cannot decode JPEG (") and len(str(caught.value)) > len("cannot decode JPEG ()")
    assert ".cpp" not in str(caught.value) and "/" not in str(caught.value), caught.value


def children(pid: int) -> set[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder``, by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def kill_prepare_while_writing(root: Path, out: Path, tmp_path: Path, split: str, *extra: str) -> set[int]:
    """Start ``bincount data prepare`` into ``out``, SIGKILL it once its workers write ``split``'s
    chunks (in its staging folder beside ``out``); returns its worker processes' pids."""
    proc = subprocess.Popen([sys.executable, "-m", "bincount.cli", "data", "prepare", "--in", str(root), "--out",
                             str(out), "--workers", "2", "--chunk-bytes", "8KB", "--block-size", "2", "--no-eda",
                             "--no-progress", *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "TMPDIR": str(tmp_path / "tmp")})
    deadline = time.monotonic() + 180
    while not list(out.parent.glob(f"{STAGING_PREFIX}*/{split}/chunk-*.bin")):  # litdata's workers write chunks
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, f"prepare wrote no {split} chunk"
        time.sleep(0.05)
    workers = children(proc.pid)
    proc.kill()
    proc.wait()
    return workers


@pytest.mark.slow
def test_a_killed_prepare_leaves_the_old_data_set_whole_and_takes_its_workers_along(tmp_path):
    root = tmp_path / "abid"
    make_fake_abid(root, n=60, bad=False)
    out = tmp_path / "shards"
    (tmp_path / "tmp").mkdir()  # litdata's item list of a killed run stays behind in TMPDIR: keep it here

    workers = kill_prepare_while_writing(root, out, tmp_path, "train")
    assert workers, "prepare had no worker processes"
    deadline = time.monotonic() + 60
    while left := {pid for pid in workers if alive(pid)}:
        assert time.monotonic() < deadline, f"processes {left} outlived the killed prepare"
        time.sleep(0.1)
    assert not list(out.iterdir())  # no data set, not a partial one

    prepare(root, str(out), max_count=3, block_size=2, eda=False, **FAST)
    old = files(out)
    for split in ("train", "val"):  # --overwrite killed at two moments: the old data set stays, byte for byte
        kill_prepare_while_writing(root, out, tmp_path, split, "--overwrite", "--max-count", "5")
        assert files(out) == old, split

    manifest = prepare(root, str(out), max_count=5, block_size=2, eda=False, overwrite=True, **FAST)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "test", "train", "val"]
    assert read_manifest(str(out))["max_count"] == 5
    assert sum(len(s["image_ids"]) for s in manifest["splits"].values()) == 60
    assert not list(tmp_path.glob(f"{STAGING_PREFIX}*"))  # the killed runs' staging folders are gone


def test_a_folder_that_is_not_a_data_set_is_refused(abid_folder, tmp_path):
    root, _ = abid_folder
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me\n")
    with pytest.raises(ValueError, match="holds files but no manifest.json"):
        prepare(root, str(tmp_path / "notes"), eda=False, overwrite=True, **SPLIT, **FAST)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me\n"
