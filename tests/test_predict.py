"""``bincount predict``: files, folders and S3 prefixes to one CSV."""

import base64
import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from inotify_simple import INotify, flags

from bincount.cli import main
from bincount.data.s3 import S3Error
from bincount.predict import find_photos, predict
from bincount.serve.errors import RequestError
from bincount.serve.inference import input_fn, model_fn, predict_fn
from tests.conftest_s3 import DATA_BUCKET
from tests.fakes import MAX_COUNT, MIN_COUNT, THRESHOLD, free_port, make_model_dir, reference_probs, write_bin_photo

PROBS = [f"prob_{c}" for c in range(MIN_COUNT, MAX_COUNT + 1)]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """``root/photos/{a,b}/*.jpg`` (8 good), a truncated and a fake JPEG, a text file; and a model."""
    root = tmp_path_factory.mktemp("predict")
    good = []
    for i in range(8):
        good.append(root / "photos" / ("a" if i < 4 else "b") / f"{i + 1:05d}.jpg")
        write_bin_photo(good[-1], MIN_COUNT + i % 5, seed=i)
    data = good[0].read_bytes()
    (root / "photos" / "b" / "90001.jpg").write_bytes(data[: len(data) - 100])
    (root / "photos" / "b" / "90002.JPEG").write_text("not a photo")
    (root / "photos" / "notes.txt").write_text("ignored")
    return root, good, make_model_dir(root / "model", good)


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_writes_one_row_per_photo_with_verdicts(photos, tmp_path):
    root, good, model_dir = photos
    labels = tmp_path / "labels.csv"
    labels.write_text("image_id,expected_quantity\n00001,1\n00002,5\n00003,40\n")
    summary = predict(model_dir, [str(root / "photos"), str(good[2])], tmp_path / "out" / "p.csv", labels=labels,
                      batch_size=3, num_workers=0, progress=False)

    rows = read_rows(tmp_path / "out" / "p.csv")
    sources = [r["source"] for r in rows]
    assert sources == [*map(str, good[:4]), *map(str, good[4:]), str(root / "photos/b/90001.jpg"),
                       str(root / "photos/b/90002.JPEG"), str(good[2])]
    assert list(rows[0]) == ["source", "image_id", "count", "confidence", *PROBS, "expected_quantity", "verdict",
                             "error"]
    assert summary["photos"] == len(rows) == 11 and summary["failed"] == 2
    readable = rows[:8] + rows[-1:]
    for row, probs in zip(readable, reference_probs(model_dir, [Path(r["source"]) for r in readable])):
        assert int(row["count"]) == MIN_COUNT + int(probs.argmax()) and row["error"] == ""
        assert [float(row[c]) for c in PROBS] == pytest.approx(probs.tolist(), abs=1e-4)
        assert row["image_id"] == row["source"].rsplit("/", 1)[-1].split(".")[0]
    bad = {r["image_id"]: r for r in rows[8:10]}
    assert bad["90001"]["count"] == "" and "corrupt or truncated JPEG" in bad["90001"]["error"]
    assert "not an image" in bad["90002"]["error"]

    # verdicts exactly as the endpoint gives them for the same photo and expected quantity
    model = model_fn(str(model_dir))
    for row in rows:
        if row["image_id"] in ("00001", "00002", "00003"):
            photo = base64.b64encode(Path(row["source"]).read_bytes()).decode()
            body = json.dumps({"instances": [{"image_b64": photo}],
                               "expected_quantity": [int(row["expected_quantity"])]})
            assert row["verdict"] == predict_fn(input_fn(body, "application/json"), model)[0]["verdict"]
        else:
            assert row["verdict"] == row["expected_quantity"] == ""
    assert rows[2]["verdict"] == "review"  # 40 objects: outside the model's range
    assert sum(summary["verdicts"].values()) == 4  # 00003 twice
    assert {r["verdict"] for r in rows[:2]} <= {"match", "mismatch", "review"}
    assert all((float(r["confidence"]) >= THRESHOLD) == (r["verdict"] != "review") for r in rows[:2])


def test_find_photos_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        find_photos([str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no photos found"):
        find_photos([str(tmp_path / "empty")])


def test_cli_predict(photos, tmp_path, capsys):
    root, good, model_dir = photos
    out = tmp_path / "cli.csv"
    assert main(["predict", "--model-dir", str(model_dir), str(root / "photos" / "a"), "--out", str(out),
                 "--num-workers", "1", "--no-progress", "--max-pixels", "4096"]) == 0
    assert [r["source"] for r in read_rows(out)] == list(map(str, good[:4]))
    assert "4 photos" in capsys.readouterr().err

    assert main(["predict", "--model-dir", str(model_dir), str(good[0]), "--out", str(out), "--num-workers", "0",
                 "--no-progress", "--max-pixels", "4000"]) == 0
    assert "the limit is 4000" in read_rows(out)[0]["error"]  # the limit reached the reader

    assert main(["predict", "--model-dir", str(model_dir), str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "error:" in capsys.readouterr().err


def test_cli_predict_reads_the_review_threshold_as_serve_does(photos, tmp_path, monkeypatch, capsys):
    root, good, model_dir = photos
    labels = tmp_path / "labels.csv"
    labels.write_text("image_id,expected_quantity\n" + "".join(f"{p.stem},{MIN_COUNT}\n" for p in good[:4]))
    out = tmp_path / "p.csv"

    def verdicts(*flags):
        assert main(["predict", "--model-dir", str(model_dir), str(root / "photos" / "a"), "--out", str(out),
                     "--labels", str(labels), "--num-workers", "0", "--no-progress", *flags]) == 0
        return {r["verdict"] for r in read_rows(out)}

    monkeypatch.setenv("BINCOUNT_REVIEW_THRESHOLD", "1.01")  # no confidence reaches it
    assert verdicts() == {"review"}
    assert "review" not in verdicts("--review-threshold", "0")  # the flag wins over the environment
    monkeypatch.setenv("BINCOUNT_REVIEW_THRESHOLD", "high")
    assert main(["predict", "--model-dir", str(model_dir), str(good[0]), "--out", str(out), "--no-progress"]) == 2
    assert "BINCOUNT_REVIEW_THRESHOLD" in capsys.readouterr().err


def test_unreachable_s3_prefix_is_a_clear_error(photos, tmp_path, monkeypatch, capsys):
    _, _, model_dir = photos
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setattr("bincount.serve.images._s3_clients", {})
    with pytest.raises(S3Error, match="cannot reach the S3 endpoint"):
        predict(model_dir, ["s3://bucket/bin-images/"], tmp_path / "p.csv", num_workers=0, progress=False)
    assert main(["predict", "--model-dir", str(model_dir), "s3://bucket/bin-images/", "--out",
                 str(tmp_path / "p.csv"), "--no-progress"]) == 2
    assert "cannot reach the S3 endpoint" in capsys.readouterr().err


@pytest.mark.integration
def test_predict_over_an_s3_prefix_and_s3_uri_instances(photos, s3_env, tmp_path, monkeypatch):
    root, good, model_dir = photos
    monkeypatch.setattr("bincount.serve.images._s3_clients", {})
    client = s3_env.client()
    s3_env.empty_bucket(DATA_BUCKET)
    for path in good[:3]:
        client.put_object(Bucket=DATA_BUCKET, Key=f"run/bin-images/{path.name}", Body=path.read_bytes())
    client.put_object(Bucket=DATA_BUCKET, Key="run/bin-images/readme.txt", Body=b"not a photo")
    client.put_object(Bucket=DATA_BUCKET, Key="run/bin-images-old/00009.jpg", Body=good[3].read_bytes())

    predict(model_dir, [f"s3://{DATA_BUCKET}/run/bin-images/"], tmp_path / "s3.csv", num_workers=1, progress=False)
    predict(model_dir, list(map(str, good[:3])), tmp_path / "local.csv", num_workers=0, progress=False)
    s3_rows, local_rows = read_rows(tmp_path / "s3.csv"), read_rows(tmp_path / "local.csv")
    assert [r["source"] for r in s3_rows] == [f"s3://{DATA_BUCKET}/run/bin-images/{p.name}" for p in good[:3]]
    for s3_row, local_row in zip(s3_rows, local_rows):
        assert {k: v for k, v in s3_row.items() if k != "source"} == {k: v for k, v in local_row.items()
                                                                        if k != "source"}

    model = model_fn(str(model_dir))
    uri = f"s3://{DATA_BUCKET}/run/bin-images/"
    [pred] = predict_fn(input_fn(json.dumps({"instances": [{"s3_uri": uri + good[0].name}]}), "application/json"),
                        model)
    assert pred["count"] == int(local_rows[0]["count"])
    with pytest.raises(RequestError) as caught:
        input_fn(json.dumps({"instances": [{"s3_uri": uri + good[0].name}, {"s3_uri": uri + "missing.jpg"}]}),
                 "application/json")
    assert caught.value.status_code == 400 and "instances[1]" in caught.value.message
    assert "missing.jpg does not exist" in caught.value.message


@pytest.mark.parametrize(("stop", "when", "num_workers", "code", "line"), [
    (signal.SIGINT, flags.CREATE, 0, 130, "error: interrupted"),  # Ctrl-C
    # kill, timeout, a scheduler, sent to the process group: the DataLoader workers get it too, while they
    # start (just after the temporary CSV appears) or once rows are being written
    (signal.SIGTERM, flags.CREATE, 2, 143, "error: stopped by SIGTERM"),
    (signal.SIGTERM, flags.MODIFY, 2, 143, "error: stopped by SIGTERM"),
], ids=["SIGINT", "SIGTERM as workers start", "SIGTERM while writing"])
def test_an_interrupted_predict_keeps_the_previous_csv_whole(stop, when, num_workers, code, line, photos, tmp_path):
    root, _, model_dir = photos
    out = tmp_path / "p.csv"
    out.write_text("source,image_id\nfrom-the-last-run.jpg,1\n")
    before = out.read_bytes()
    inputs = [str(root / "photos")] * 100  # 1000 photos, one per batch: long enough to interrupt
    with INotify() as inotify:
        inotify.add_watch(tmp_path, flags.CREATE | flags.MODIFY)
        proc = subprocess.Popen([sys.executable, "-m", "bincount.cli", "predict", "--model-dir", str(model_dir),
                                 *inputs, "--out", str(out), "--batch-size", "1", "--num-workers", str(num_workers),
                                 "--no-progress"], stderr=subprocess.PIPE, text=True, start_new_session=True,
                                # Ctrl-C's default, as in a terminal: a shell's background job (`cmd &`) ignores
                                # SIGINT, and its children inherit that
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        seen = False
        while not seen:  # the temporary CSV beside p.csv made, or its first rows written
            events = inotify.read(timeout=120_000)
            assert events, f"predict did not start writing: {proc.poll()=}"
            seen = any(event.name.endswith(".part") and event.mask & when for event in events)
    assert proc.poll() is None, proc.stderr.read()
    assert out.read_bytes() == before, "the previous CSV must stay whole while the new one is written"
    os.killpg(proc.pid, stop)  # to predict and its DataLoader workers, as a terminal or `timeout` sends it
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code and stderr.strip().splitlines()[-1] == line, stderr
    assert "Traceback" not in stderr, stderr
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv"], "no partial file is left"
