"""The container side of a Batch Transform job and ``bincount transform collect``: SageMaker's inference
toolkit answers each photo alone, as the job's request says to send it, the answers are written as
Batch Transform writes them (``<output><path under input>.out``), and collecting them gives
``bincount predict``'s CSV for the same photos, row for row, an unreadable photo's error row included."""

import csv
import json
import re
import shutil
from pathlib import Path

import pytest

from bincount.cli import main
from bincount.predict import predict
from sagemaker_launch import transform
from tests.conftest_s3 import DATA_BUCKET
from tests.fakes import MAX_COUNT, MIN_COUNT, make_model_dir, write_bin_photo
from tests.inference_toolkit import serve, unpacked_model_tar_gz


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict:
    """Photos (``bin-images/``, one in a subfolder, one truncated), their model, labels, and the job's
    answers in ``counts/``.

    The answers come from the toolkit running model.tar.gz's own code with the headers and
    environment of the CreateTransformJob request that ``transform`` builds. Every photo is
    answered 200 (a 4xx would mark the whole job Failed), the truncated one with why it has no count.
    """
    root = tmp_path_factory.mktemp("transform")
    photos = [root / "bin-images" / f"{i:05d}.jpg" for i in range(1, 7)] + [root / "bin-images" / "b" / "00007.jpg"]
    for i, photo in enumerate(photos):
        write_bin_photo(photo, MIN_COUNT + i % (MAX_COUNT - MIN_COUNT + 1), seed=i)
    model = make_model_dir(root / "model", photos)
    photos.append(root / "bin-images" / "00008.jpg")
    photos[-1].write_bytes(photos[0].read_bytes()[:-100])
    opt_ml_model = unpacked_model_tar_gz(model, root / "tar")
    request = transform.main(["model_data=s3://b/model.tar.gz", "input=s3://b/bin-images/", "output=s3://b/counts/",
                              "--dry-run"]).requests["CreateTransformJob"]
    headers = {"Content-Type": request["TransformInput"]["ContentType"], "Accept": request["TransformOutput"]["Accept"]}
    answers = serve(opt_ml_model, root, [(headers, p.read_bytes()) for p in photos], request["Environment"])
    for photo, answer in zip(photos, answers):
        assert (answer["status"], answer["content_type"]) == (200, "application/json"), answer
        assert "Traceback" not in answer["body"], answer
        out = root / "counts" / f"{photo.relative_to(root / 'bin-images')}.out"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(answer["body"])
    labels = root / "labels.csv"  # a match or mismatch, one out of the model's range, one not a photo here
    labels.write_text("image_id,expected_quantity\n00001,1\n00002,3\n00003,40\n00007,2\n99999,1\n")
    return {"root": root, "photos": photos, "model": model, "labels": labels, "answers": answers}


def collect(job: dict, out: Path, *extra: str, outputs: Path | str | None = None,
            input_prefix: Path | str | None = None) -> int:
    return main(["transform", "collect", str(outputs or job["root"] / "counts"), "--input-prefix",
                 str(input_prefix or job["root"] / "bin-images"), "--model-dir", str(job["model"]), "--out", str(out),
                 "--no-progress", *extra])


@pytest.mark.parametrize("labelled", [False, True], ids=["counts", "verdicts"])
def test_collect_gives_predicts_csv_for_the_same_photos(job, labelled, tmp_path, capsys):
    labels = ["--labels", str(job["labels"])] if labelled else []
    assert collect(job, tmp_path / "collected.csv", *labels) == 0
    err = capsys.readouterr().err
    assert "8 photos" in err and "1 without a count" in err
    predict(job["model"], [str(job["root"] / "bin-images")], tmp_path / "predicted.csv",
            labels=job["labels"] if labelled else None, batch_size=1, num_workers=0, progress=False)
    collected, predicted = read_rows(tmp_path / "collected.csv"), read_rows(tmp_path / "predicted.csv")
    assert list(collected[0]) == list(predicted[0])  # the same columns, in the same order
    assert [r["source"] for r in collected] == sorted(map(str, job["photos"]))
    for got, want in zip(collected, predicted, strict=True):
        assert got == want
    assert len({r["count"] for r in collected}) > 2
    # the truncated photo: predict's error row, the handler's one-line reason (the rows are equal above)
    [refused] = [r for r in collected if r["error"]]
    assert refused["image_id"] == "00008" and refused["count"] == ""
    assert refused["error"] == "corrupt or truncated JPEG image (Image is incomplete or truncated)"
    verdicts = {r["image_id"]: r["verdict"] for r in collected}
    if labelled:
        assert verdicts["00003"] == "review" and verdicts["00001"] in ("match", "mismatch", "review")
        assert [r["expected_quantity"] for r in collected if r["image_id"] in ("00001", "00007")] == ["1", "2"]
    assert sum(v != "" for v in verdicts.values()) == (4 if labelled else 0)


def test_a_photo_without_an_answer_gets_an_error_row_and_a_malformed_answer_stops(job, tmp_path, capsys):
    outputs = tmp_path / "counts"
    shutil.copytree(job["root"] / "counts", outputs)
    (outputs / "00002.jpg.out").unlink()  # the job failed on this photo
    (outputs / "old" / "00001.jpg.out").parent.mkdir()
    shutil.copy(outputs / "00001.jpg.out", outputs / "old" / "00001.jpg.out")  # the answer to no photo here
    assert collect(job, tmp_path / "c.csv", outputs=outputs) == 0
    err = capsys.readouterr().err
    assert "8 photos" in err and "2 without a count" in err and "1 answers of no photo there" in err
    rows = {r["image_id"]: r for r in read_rows(tmp_path / "c.csv")}
    assert rows["00002"]["count"] == "" and rows["00002"]["error"].startswith(
        f"no answer: {outputs}/00002.jpg.out is missing")
    assert rows["00001"]["count"] == str(json.loads(job["answers"][0]["body"])["predictions"][0]["count"])

    before = (tmp_path / "c.csv").read_bytes()
    bad = {"truncated": b'{"predictions": [{"count": 2, "probabil',
           "two predictions": json.dumps({"predictions": [{"count": 1, "probabilities": [1], "confidence": 1}] * 2}
                                         ).encode(),
           "a count as text": b'{"predictions": [{"count": "2", "probabilities": [0.2], "confidence": 0.2}]}',
           "another model's": json.dumps({"predictions": [{"count": 2, "probabilities": [0.5, 0.5],
                                                            "confidence": 0.5}]}).encode()}
    messages = {}
    for name, body in bad.items():
        (outputs / "00003.jpg.out").write_bytes(body)
        assert collect(job, tmp_path / "c.csv", outputs=outputs) == 2, name
        [line] = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"error: {outputs}/00003.jpg.out: "), line
        messages[name] = line
    assert "predictions.0.count" in messages["a count as text"]
    assert "2 probabilities" in messages["another model's"]
    assert f"counts {MIN_COUNT}..{MAX_COUNT}" in messages["another model's"]
    assert (tmp_path / "c.csv").read_bytes() == before  # a failed run leaves the last CSV whole


def test_answers_that_belong_to_no_photo_are_a_clear_error(job, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert collect(job, tmp_path / "c.csv", outputs=tmp_path / "empty") == 2
    assert capsys.readouterr().err.startswith(f"error: no .out files under {tmp_path / 'empty'}")
    elsewhere = tmp_path / "elsewhere"  # the right photos, named differently
    shutil.copytree(job["root"] / "bin-images", elsewhere / "bin-images")
    for photo in (elsewhere / "bin-images").rglob("*.jpg"):
        photo.rename(photo.with_name("x" + photo.name))
    assert collect(job, tmp_path / "c.csv", input_prefix=elsewhere / "bin-images") == 2
    err = capsys.readouterr().err
    assert f"none of the 8 .out files under {job['root'] / 'counts'} answers a photo under" in err
    assert re.search(r"the answer to \S+/elsewhere/bin-images/(\S+) is \S+/counts/\1\.out$", err.strip()), err
    assert not (tmp_path / "c.csv").exists()


@pytest.mark.integration
def test_collect_from_s3_gives_predicts_csv_for_the_prefix(job, s3_env, tmp_path, monkeypatch):
    monkeypatch.setattr("bincount.serve.images._s3_clients", {})
    client = s3_env.client()
    s3_env.empty_bucket(DATA_BUCKET)
    root = job["root"]
    for path in [*(root / "bin-images").rglob("*.jpg"), *(root / "counts").rglob("*.out")]:
        client.put_object(Bucket=DATA_BUCKET, Key=f"run/{path.relative_to(root).as_posix()}", Body=path.read_bytes())
    inputs, outputs = f"s3://{DATA_BUCKET}/run/bin-images", f"s3://{DATA_BUCKET}/run/counts"  # no trailing /
    assert collect(job, tmp_path / "collected.csv", "--labels", str(job["labels"]), outputs=outputs,
                   input_prefix=inputs) == 0
    predict(job["model"], [inputs + "/"], tmp_path / "predicted.csv", labels=job["labels"], batch_size=1,
            num_workers=0, progress=False)
    collected, predicted = read_rows(tmp_path / "collected.csv"), read_rows(tmp_path / "predicted.csv")
    assert collected == predicted and len(collected) == 8
    assert collected[-1]["source"] == f"{inputs}/b/00007.jpg" and collected[-1]["verdict"] != ""
