"""A killed training resumes where it stopped (SIGKILL mid-run, then --resume)."""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.test_training import _karyograms


def _epochs_in(path):
    if not path.is_file():
        return []
    with open(path) as fh:
        return [int(r["epoch"]) for r in csv.DictReader(fh)]


@pytest.mark.slow
def test_sigkill_then_resume_finishes_without_redoing_epochs(tmp_path):
    manifest = _karyograms(tmp_path / "data")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "karyo", "train", "vgg16_augmented", "--data", str(manifest),
           "--out", str(out), "--image-size", "32", "--weights", "none", "--epochs", "40",
           "--batch-size", "4", "--mc", "5", "--cache", str(tmp_path / "cache")]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    log = out / "phase-head" / "history.csv"
    deadline = time.time() + 240
    while len(_epochs_in(log)) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = _epochs_in(log)
    assert 3 <= len(done_before) < 40, "the run must be killed mid-training"
    assert not (out / "metrics.json").exists()

    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    first_epoch = next(int(line.split()[1].split("/")[0]) for line in resumed.stdout.splitlines()
                       if line.startswith("Epoch "))
    assert first_epoch > 1  # Keras numbers epochs from 1: the resumed run did not start over
    epochs = _epochs_in(out / "history.csv")
    assert epochs == list(range(len(epochs))) and len(epochs) >= len(done_before)
    assert (out / "metrics.json").is_file()
