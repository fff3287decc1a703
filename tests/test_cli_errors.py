"""What a user sees when the disk or the arguments are wrong: one ``error:`` line, exit 2, no partial files.

Read-only folders and full disks are real: a read-only bind mount and a 64 KiB tmpfs, made in a
private mount namespace (``unshare -m``, as root) in which the command runs; what it left on that
disk is listed inside the namespace, before the mount goes away.
"""

import base64
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bincount.cli import main
from bincount.report import confusion_matrix_figure, fit_title
from tests.fakes import MIN_COUNT, free_port, make_fake_abid, make_model_dir, write_bin_photo
from tests.moto_server import BUCKET, aws, moto_server  # noqa: F401  (fixtures)

CLI = [sys.executable, "-m", "bincount.cli"]
REPO = Path(__file__).resolve().parents[1]
OLD_CSV = "source,image_id\nkept.jpg,kept\n"


def can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


needs_mount_namespace = pytest.mark.skipif(not can_unshare(), reason="needs root and unshare -m (mount namespaces)")


def run_mounted(mount: str, argv: list[str], *, listing: Path, timeout: float = 300) -> tuple[int, str, dict]:
    """Run ``argv`` in a private mount namespace after the shell command ``mount``.

    Returns:
        The exit code, stderr, and what was under ``listing`` when the command ended: relative
        path -> size in bytes, or the text itself for a ``.csv`` file.
    """
    listing_cmd = (f"cd {shlex.quote(str(listing))} && find . -type f | sort | while read -r f; do "
                   'case "$f" in *.csv) printf "%s\\t%s\\n" "$f" "$(base64 -w0 "$f")";; '
                   '*) printf "%s\\t%s\\n" "$f" "$(stat -c %s "$f")";; esac; done')
    script = f'{mount} || exit 99\n"$@" 2>"$ERR_FILE"\necho "exit=$?"\n{listing_cmd}'
    err_file = listing.parent / f"{listing.name}.stderr"
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *argv], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "ERR_FILE": str(err_file)})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    code = next(int(line[5:]) for line in lines if line.startswith("exit="))
    files = {}
    for line in lines:
        if line.startswith("./"):
            name, value = line[2:].split("\t")
            files[name] = base64.b64decode(value).decode() if name.endswith(".csv") else int(value)
    return code, err_file.read_text(), files


def assert_one_error_line(code: int, stderr: str, *fragments: str) -> None:
    """Exit 2 and one ``error:`` line holding every fragment (log lines before it are allowed)."""
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert stderr.rstrip().endswith(errors[0]), stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def ro_bind(folder: Path) -> str:
    q = shlex.quote(str(folder))
    return f"mount --bind -o ro {q} {q}"


def tmpfs(folder: Path, size: str = "64k") -> str:
    return f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(str(folder))}"


@pytest.fixture(scope="module")
def predict_inputs(tmp_path_factory):
    """Four photos and a model folder."""
    root = tmp_path_factory.mktemp("predict_inputs")
    photos = [root / "photos" / f"{i + 1:05d}.jpg" for i in range(4)]
    for i, photo in enumerate(photos):
        write_bin_photo(photo, MIN_COUNT + i, seed=i)
    return root / "photos", make_model_dir(root / "model", photos)


@needs_mount_namespace
@pytest.mark.parametrize("command", ["fetch", pytest.param("prepare", marks=pytest.mark.slow),
                                     pytest.param("predict", marks=pytest.mark.slow)])
def test_a_read_only_output_is_one_error_line(command, predict_inputs, fake_abid, tmp_path):
    photos, model_dir = predict_inputs
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "p.csv").write_text(OLD_CSV)
    argv = {
        "fetch": ["data", "fetch", "--ids", "1-3", "--out", str(ro / "abid"), "--no-progress"],
        "prepare": ["data", "prepare", "--in", str(fake_abid[0]), "--out", str(ro / "shards"),
                    "--block-size", "2", "--no-progress"],
        "predict": ["predict", "--model-dir", str(model_dir), str(photos), "--out", str(ro / "p.csv"),
                    "--num-workers", "0", "--no-progress"],
    }[command]
    code, stderr, files = run_mounted(ro_bind(ro), [*CLI, *argv], listing=ro)
    assert_one_error_line(code, stderr, str(ro), "Read-only file system")
    if command == "predict":  # the user's file, not the temporary one beside it
        assert_one_error_line(code, stderr, f"error: {ro / 'p.csv'}: Read-only file system")
    assert ".part" not in stderr, stderr
    assert files == {"p.csv": OLD_CSV}


def test_an_output_of_the_wrong_kind_is_one_error_line(predict_inputs, fake_abid, tmp_path, capsys):
    photos, model_dir = predict_inputs
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    a_folder = tmp_path / "a_folder"
    a_folder.mkdir()
    cases = [
        (["data", "fetch", "--ids", "1-3", "--out", str(a_file)], "is a file"),
        (["data", "prepare", "--in", str(fake_abid[0]), "--out", str(a_file)], "is a file"),
        (["data", "prepare", "--in", str(fake_abid[0]), "--out", str(a_file / "shards"), "--block-size", "2"],
         "Not a directory"),
        (["predict", "--model-dir", str(model_dir), str(photos), "--out", str(a_folder)], "is a folder"),
        (["predict", "--model-dir", str(model_dir), str(photos), "--out", str(a_file / "p.csv")], "is a file"),
        (["predict", "--model-dir", str(model_dir), str(photos), "--out", str(a_file / "sub" / "p.csv"),
          "--num-workers", "0", "--no-progress"], "Not a directory"),
    ]
    for argv, fragment in cases:
        code = main(argv)
        assert_one_error_line(code, capsys.readouterr().err, fragment)
    assert a_file.read_text() == "x" and not list(a_folder.iterdir())


@needs_mount_namespace
def test_a_full_disk_stops_fetch_with_one_error_line_and_no_partial_file(aws, tmp_path):
    import boto3

    s3 = boto3.client("s3")
    for i in range(1, 7):  # 6 x 24 KiB: more than the 64 KiB disk
        s3.put_object(Bucket=BUCKET, Key=f"bin-images/{i:05d}.jpg", Body=os.urandom(24 * 1024))
        s3.put_object(Bucket=BUCKET, Key=f"metadata/{i:05d}.json", Body=b'{"EXPECTED_QUANTITY": 1}')
    disk = tmp_path / "disk"
    disk.mkdir()
    code, stderr, files = run_mounted(tmpfs(disk), [*CLI, "data", "fetch", "--ids", "1-6", "--out", str(disk / "abid"),
                                                    "--bucket", BUCKET, "--signed", "--workers", "2",
                                                    "--no-progress"], listing=disk)
    assert_one_error_line(code, stderr, str(disk / "abid"), "No space left on device")
    assert not [f for f in files if ".part" in f], files
    photos = {f: size for f, size in files.items() if f.startswith("abid/bin-images/")}
    assert 0 < len(photos) < 6 and set(photos.values()) == {24 * 1024}, files  # whole photos only


@needs_mount_namespace
def test_a_fetch_report_that_does_not_fit_leaves_no_partial_file(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    have = " && ".join(f"mkdir -p {disk}/abid/{folder} && : > {disk}/abid/{folder}/00001.{ext}"
                       for folder, ext in (("bin-images", "jpg"), ("metadata", "json")))
    fill = f"(cat /dev/zero > {disk}/fill 2>/dev/null; true)"  # the photo is there: only the report is written
    code, stderr, files = run_mounted(f"{tmpfs(disk)} && {have} && {fill}",
                                      [*CLI, "data", "fetch", "--ids", "1", "--out", str(disk / "abid"),
                                       "--endpoint-url", "http://127.0.0.1:9", "--no-progress"], listing=disk)
    assert_one_error_line(code, stderr, str(disk / "abid" / "fetch_report.json"), "No space left on device")
    assert sorted(files) == ["abid/bin-images/00001.jpg", "abid/metadata/00001.json", "fill"]


@needs_mount_namespace
@pytest.mark.slow
def test_a_full_disk_stops_prepare_with_one_error_line(tmp_path):
    root = tmp_path / "abid"
    make_fake_abid(root, n=60, bad=False)  # ~120 KiB of photos for a 64 KiB disk
    disk = tmp_path / "disk"
    disk.mkdir()
    code, stderr, files = run_mounted(tmpfs(disk), [*CLI, "data", "prepare", "--in", str(root), "--out",
                                                    str(disk / "shards"), "--workers", "2", "--chunk-bytes", "8KB",
                                                    "--block-size", "2", "--no-eda", "--no-progress"], listing=disk)
    assert_one_error_line(code, stderr, str(disk / "shards"), "No space left on device")
    # chunks fill the disk in the staging folder beside shards/, which goes with the failed run
    assert "shards/manifest.json" not in files and not [f for f in files if "rejects" in f], files
    assert not [f for f in files if f.startswith("bincount-prepare-")], files


@needs_mount_namespace
@pytest.mark.slow
def test_a_full_disk_keeps_the_previous_predictions_whole(predict_inputs, tmp_path):
    photos, model_dir = predict_inputs
    disk = tmp_path / "disk"
    disk.mkdir()
    fill = f"printf %s {shlex.quote(OLD_CSV)} > {disk}/p.csv && (cat /dev/zero > {disk}/fill 2>/dev/null; true)"
    code, stderr, files = run_mounted(f"{tmpfs(disk)} && {fill}", [*CLI, "predict", "--model-dir", str(model_dir),
                                                                   str(photos), "--out", str(disk / "p.csv"),
                                                                   "--num-workers", "0", "--no-progress"],
                                      listing=disk)
    assert_one_error_line(code, stderr, str(disk / "p.csv"), "No space left on device")
    assert files.keys() == {"fill", "p.csv"} and files["p.csv"] == OLD_CSV


def test_a_malformed_model_config_names_the_file(predict_inputs, tmp_path, capsys):
    photos, model_dir = predict_inputs
    broken = tmp_path / "model"
    broken.mkdir()
    for name in ("model.pt", "model.onnx"):
        (broken / name).write_bytes((model_dir / name).read_bytes())
    good = json.loads((model_dir / "model_config.json").read_text())
    bad_fields = (
        ({"min_count": "1"}, "min_count: Input should be a valid integer, got '1'"),
        ({"max_count": 1}, "count range 1..1: need whole numbers 0 <= min_count < max_count"),
        ({"num_classes": 4}, "num_classes=4 does not match min_count=1, max_count=5"),
        ({"preset": {"image_size": 0}}, "preset.image_size: Input should be greater than or equal to 1, got 0"),
        ({"preset": {"image_size": 32, "mean": [0.5]}}, "preset.mean: Tuple should have at least 3 items"),
        ({"decode": "mode"}, "decode: Input should be 'argmax' or 'median', got 'mode'"),
        ({"calibration": {"temperature": -1.0, "review_threshold": 0.5}},
         "calibration.temperature: Input should be greater than 0, got -1.0"),
        ({"calibration": {"temperature": 2.0}}, "lacks calibration.review_threshold"),
        ({"arch": "resnet9000"}, "arch: unknown arch 'resnet9000'"),
    )
    for text, fragment in (('{"arch": "resnet18",', "is not valid JSON"), ("[1, 2]", "not an object"),
                           ('{"arch": "resnet18"}', "lacks min_count"),
                           *((json.dumps({**good, **change}), message) for change, message in bad_fields)):
        (broken / "model_config.json").write_text(text)
        assert main(["predict", "--model-dir", str(broken), str(photos), "--out", str(tmp_path / "p.csv")]) == 2
        assert_one_error_line(2, capsys.readouterr().err, str(broken / "model_config.json"), fragment)
    assert not (tmp_path / "p.csv").exists()


def test_a_truncated_model_file_is_one_error_line_in_predict_and_eval(predict_inputs, tmp_path, capsys):
    photos, model_dir = predict_inputs
    cut = tmp_path / "model"
    cut.mkdir()
    (cut / "model_config.json").write_text((model_dir / "model_config.json").read_text())
    for name in ("model.pt", "model.onnx"):  # copies stopped part-way: predict reads model.onnx, eval model.pt
        (cut / name).write_bytes((model_dir / name).read_bytes()[:4096])
    assert main(["predict", "--model-dir", str(cut), str(photos), "--out", str(tmp_path / "p.csv")]) == 2
    assert_one_error_line(2, capsys.readouterr().err, str(cut / "model.onnx"), "is not a readable ONNX model",
                          f"re-export it with `bincount export --model-dir {cut}`")
    proc = subprocess.run([sys.executable, "eval.py", f"model_dir={cut}", f"data.root={photos}",
                           f"hydra.run.dir={tmp_path / 'eval'}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert_one_error_line(proc.returncode, proc.stderr, str(cut / "model.pt"), "is not a readable weights file")


def test_serve_without_a_model_fails_at_start(tmp_path):
    model_dir = tmp_path / "missing"
    proc = subprocess.run([*CLI, "serve", "--model-dir", str(model_dir), "--port", str(free_port())],
                          capture_output=True, text=True, timeout=120)  # before: up, answering 503, forever
    assert_one_error_line(proc.returncode, proc.stderr, str(model_dir / "model_config.json"), "not found")


def test_confusion_matrix_keeps_its_figures_inside_the_picture():
    figures = "n=1234, acc=0.612, mae=0.517"
    title = "test split of /data/" + "/".join(f"folder-{i:02d}-of-a-long-path" for i in range(12)) + "/abid-v3"
    for classes in (2, 5, 11):
        fig = confusion_matrix_figure([[3] * classes] * classes, min_count=1, title=title, figures=figures)
        fig.canvas.draw()
        picture = fig.bbox
        texts = [t for t in fig.findobj(lambda a: hasattr(a, "get_text") and a.get_text())]
        heading = next(t for t in texts if figures in t.get_text())
        box = heading.get_window_extent()
        assert picture.x0 <= box.x0 and box.x1 <= picture.x1 and box.y1 <= picture.y1, (classes, box, picture)
        lines = heading.get_text().splitlines()
        assert lines[-1] == figures and lines[0].startswith("test split of /data/") and lines[-2].endswith("abid-v3")


def test_fit_title():
    assert fit_title("short title", 20) == "short title"
    assert fit_title("/data/abid/v1", 5) == "/data\n/abid\n/v1"
    long = fit_title("x" * 30 + "END", 10, max_lines=2)
    assert long.splitlines()[0] == "x" * 10 and long.endswith("END") and "…" in long
    assert all(len(line) <= 10 for line in long.splitlines())
    with pytest.raises(ValueError, match="width"):
        fit_title("t", 2)


@needs_mount_namespace
def test_a_full_disk_while_exporting_is_an_os_error_naming_the_model_folder_and_leaves_no_folder(predict_inputs,
                                                                                                 tmp_path):
    _, model_dir = predict_inputs  # its model.pt is 45 MB: more than the 1 MiB disk
    disk = tmp_path / "disk"
    disk.mkdir()
    export = ("from bincount.models.export import load_model_dir, save_model_dir; import sys; "
              f"net, card = load_model_dir({str(model_dir)!r}); save_model_dir(net, {str(disk / 'model')!r}, card)")
    code, stderr, files = run_mounted(tmpfs(disk, "1m"), [sys.executable, "-c", export], listing=disk)
    assert code == 1 and stderr.strip().splitlines()[-1] == f"OSError: [Errno 28] No space left on device: " \
                                                              f"'{disk / 'model'}'", stderr
    assert files == {}  # no model/, no staging folder


def test_train_py_prints_one_error_line_for_a_missing_folder_and_an_unreachable_mlflow(fake_abid, tmp_path):
    root, _ = fake_abid
    missing = subprocess.run([sys.executable, "train.py", f"data.root={tmp_path / 'nowhere'}",
                              f"hydra.run.dir={tmp_path / 'run1'}"], cwd=REPO, capture_output=True, text=True,
                             timeout=300)
    assert_one_error_line(missing.returncode, missing.stderr, f"{tmp_path / 'nowhere'}/bin-images not found")
    started = time.monotonic()
    unreachable = subprocess.run([sys.executable, "train.py", f"data.root={root}", "logger=mlflow",
                                  f"hydra.run.dir={tmp_path / 'run2'}"], cwd=REPO, capture_output=True, text=True,
                                 timeout=300, env={**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"})
    assert_one_error_line(unreachable.returncode, unreachable.stderr, "Connection refused")
    assert time.monotonic() - started < 60  # MLflow's own retries took minutes
