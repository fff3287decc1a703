"""What a user meets around a training run: stops, resumes, early errors (the README's commands: test_readme.py)."""

from __future__ import annotations

import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
from hydra.errors import InstantiationException

import bincount.train
from bincount.config import compose
from bincount.evaluate import evaluate
from bincount.models.card import ModelCard
from bincount.train import train
from tests.fakes import FAST, make_fake_abid, set_output_dir

REPO = Path(__file__).resolve().parents[1]


class ProcessOutput:
    """A subprocess's text output, read line by line in a thread so a test can wait for a line
    with a timeout (iterating ``proc.stdout`` directly would block for as long as the process runs)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self.ended = False
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(proc.stdout,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put(None)  # end of output

    def _next(self, timeout: float) -> str | None:
        """The next line, or None at the end of the output or after ``timeout`` seconds without one."""
        if self.ended:
            return None
        try:
            line = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None
        if line is None:
            self.ended = True
        else:
            self.lines.append(line)
        return line

    def wait_for(self, text: str, timeout: float) -> bool:
        """Whether a line containing ``text`` arrives within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while (line := self._next(deadline - time.monotonic())) is not None:
            if text in line:
                return True
        return False

    def text(self, timeout: float = 0) -> str:
        """The output read so far, reading on to its end for up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self._next(deadline - time.monotonic()) is not None:
            pass
        return "".join(self.lines)


@pytest.mark.slow
def test_sigterm_to_the_process_group_stops_a_local_run_nonzero_with_a_checkpoint_and_the_resume_command(tmp_path):
    """As ``timeout``, systemd or a batch scheduler stop a run: SIGTERM to the whole process group,
    its DataLoader workers included (a worker killed first used to end the run in a traceback)."""
    data = tmp_path / "abid"
    make_fake_abid(data, n=120, bad=False)  # ~70 training photos: ~18 steps per epoch at batch 4
    run = tmp_path / "run"
    args = [f"data.root={data}", *FAST, "data.batch_size=4", "data.num_workers=2", "trainer.max_epochs=50",
            "callbacks.rich_model_summary=null", "+callbacks.metric_lines={_target_: bincount.callbacks.MetricLines}",
            f"hydra.run.dir={run}"]
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output = ProcessOutput(proc)
    try:
        # the first validation has run: epoch 1 is under way
        assert output.wait_for("[bincount] validation epoch=0", timeout=300), output.text()[-3000:]
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=300)
    finally:
        proc.kill()  # a no-op once it has exited
    log = output.text(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, log[-3000:]
    assert "Traceback" not in log and "killed by signal" not in log, log[-3000:]
    assert re.search(r"raised with message:\s+SIGTERM received, training stopped after step \d+", log), log[-3000:]
    assert not (run / "model").exists() and not (run / "metrics.json").exists()  # nothing pretends to be finished
    step = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]
    per_epoch = int(re.search(r"validation epoch=0 global_step=(\d+)", log).group(1))
    stopped = int(re.search(r"training stopped by SIGTERM at epoch \d+, step (\d+)", log).group(1))
    assert step == stopped >= per_epoch  # the checkpoint holds the step where the signal stopped training
    command = re.search(r"Resume with:\s*\n\s*(python train\.py .*)", log).group(1)
    assert f"hydra.run.dir={run}" in command and command.endswith("ckpt_path=last")
    resumed = shlex.split(command)[2:]
    assert resumed[:-2] == args[:-1]  # the run's own overrides, then where it was and what to resume


def test_resume_errors_say_what_is_wrong_before_training(train_cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ckpt_path=last: no checkpoint at .*nowhere/checkpoints/last\.ckpt"):
        train(train_cfg("ckpt_path=last", out=tmp_path / "nowhere"))
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(ValueError, match="notes.txt: not a Lightning checkpoint"):
        train(train_cfg(f"ckpt_path={text}"))
    eval_cfg = compose("eval", ["data.root=x", f"ckpt_path={text}"])
    with pytest.raises(ValueError, match="notes.txt: not a Lightning checkpoint"):
        evaluate(set_output_dir(eval_cfg, tmp_path / "eval"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        train(train_cfg(f"ckpt_path={tmp_path / 'missing.ckpt'}"))


@pytest.mark.slow
def test_a_one_cycle_run_cannot_be_extended_and_says_so(train_cfg, tmp_path):
    out = tmp_path / "run"
    short = ["model/scheduler=onecycle", "data.batch_size=2", "trainer.limit_val_batches=1", "test=false"]  # 12 steps an epoch
    train(train_cfg(*short, "trainer.max_epochs=2", out=out))
    with pytest.raises(ValueError, match="planned for 24 steps and cannot be extended to this run's 36"):
        train(train_cfg(*short, "trainer.max_epochs=3", "ckpt_path=last", out=out))
    # the same length resumes (nothing left to do, but no error)
    train(train_cfg(*short, "trainer.max_epochs=2", "ckpt_path=last", out=out))


@pytest.mark.parametrize(("override", "error", "message"), [
    ("data.min_count=5 data.max_count=1", ValueError, r"count range 5\.\.1"),
    ("data.image_size=0", ValueError, r"data\.image_size=0"),
    ("model.optimizer.lr=abc", ValueError, r"model\.optimizer"),
    ("model.weights=IMAGENET1K_V1 model.weights_path=/missing/resnet18.pth", FileNotFoundError,
     r"model\.weights_path=/missing/resnet18\.pth: no such file"),
])
def test_bad_values_fail_at_construction_naming_the_key(override, error, message, tmp_path):
    cfg = set_output_dir(compose("train", ["data.root=x", *override.split()]), tmp_path)
    with pytest.raises(InstantiationException, match=message) as raised:  # Hydra names the config node too
        hydra.utils.instantiate(cfg.data)
        hydra.utils.instantiate(cfg.model)
    assert isinstance(raised.value.__cause__, error)


# the fake folder's 24 training photos at batch 8: 3 steps an epoch
@pytest.mark.parametrize(("scheduler", "length", "steps"), [
    ("onecycle", "trainer.max_epochs=2 trainer.limit_train_batches=2", 4),  # warm-up of 0.4 steps: constant lr
    ("onecycle", "trainer.max_epochs=1 trainer.max_steps=1", 1),
    ("onecycle", "trainer.max_epochs=4 trainer.max_steps=10", 10),  # pct_start x 10 = 1 step: OneCycleLR divides by 0
    ("cosine", "trainer.max_epochs=2 trainer.limit_train_batches=1", 2),
    ("cosine", "trainer.max_epochs=3 trainer.max_steps=2", 2),
    ("none", "trainer.max_epochs=-1 trainer.max_steps=2", 2),
])
def test_a_shortened_run_trains(scheduler, length, steps, train_cfg, tmp_path, caplog):
    out = tmp_path / "run"
    with caplog.at_level("INFO"):
        train(train_cfg(f"model/scheduler={scheduler}", *length.split(), "test=false", "trainer.limit_val_batches=1",
                        out=out))
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == steps
    constant = [r.getMessage() for r in caplog.records if "leave no room for one-cycle's warm-up" in r.getMessage()]
    assert len(constant) == (scheduler == "onecycle" and steps * 0.1 < 2)


@pytest.mark.parametrize(("scheduler", "length", "message"), [
    ("cosine", "trainer.max_epochs=-1 trainer.max_steps=2", r"model\.scheduler steps once an epoch over trainer\.max_epochs"),
    ("onecycle", "trainer.max_epochs=-1", r"set trainer\.max_epochs or trainer\.max_steps"),
])
def test_a_run_its_schedule_cannot_fit_names_the_key(scheduler, length, message, train_cfg):
    with pytest.raises(ValueError, match=message):
        train(train_cfg(f"model/scheduler={scheduler}", *length.split(), "test=false"))


class SigtermAtTest(L.Callback):
    """Sends this process SIGTERM when the test's first batch is done."""

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        os.kill(os.getpid(), signal.SIGTERM)


def sigterm_between_the_model_files(monkeypatch) -> None:
    """SIGTERM once ``model.pt`` is written and before ``model_config.json`` is (the card's JSON)."""
    model_dump = ModelCard.model_dump

    def model_dump_after_sigterm(card, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return model_dump(card, **kwargs)

    monkeypatch.setattr(ModelCard, "model_dump", model_dump_after_sigterm)


def sigterm_at_calibration(monkeypatch) -> None:
    calibrate = bincount.train.calibrate

    def calibrate_after_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return calibrate(*args, **kwargs)

    monkeypatch.setattr(bincount.train, "calibrate", calibrate_after_sigterm)


@pytest.mark.parametrize("phase", ["test", "calibration", "export"])
def test_a_stop_after_training_exports_nothing_exits_nonzero_and_the_resume_exports(phase, train_cfg, tmp_path,
                                                                                    monkeypatch, caplog):
    out = tmp_path / "run"
    stop = [f"+callbacks.sigterm={{_target_: {__name__}.SigtermAtTest}}"] if phase == "test" else []
    cfg = train_cfg("trainer.limit_val_batches=1", *stop, out=out)
    if phase == "calibration":
        sigterm_at_calibration(monkeypatch)
    if phase == "export":
        sigterm_between_the_model_files(monkeypatch)
    with caplog.at_level("INFO"), pytest.raises(SystemExit) as stopped:
        train(cfg)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert sorted(p.name for p in out.iterdir() if "model" in p.name) == []  # no model/, no staging folder
    line = next(r.getMessage() for r in caplog.records if "after training" in r.getMessage())
    assert re.match(r"stopped by SIGTERM after training \(step 3\), .* model/ not written\. "
                    r"Resume with:\n  .*ckpt_path=\S*last(\.ckpt)?$", line), line
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back

    monkeypatch.undo()
    metrics = train(train_cfg("trainer.limit_val_batches=1", "ckpt_path=last", out=out))  # no more training: test, export
    assert "test/mae" in metrics
    assert sorted(p.name for p in (out / "model").iterdir()) == ["model.onnx", "model.pt", "model_config.json"]
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3
