"""Killed training resumes to the same result: no finished epoch is redone, and the weights,
history, predictions and metrics equal those of a training that was never interrupted."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

import karyo.experiments.fit as fitting
from karyo.cli import main
from karyo.models.network import build_head
from tests.common import write_karyograms

# ------------------------------------------------------------------ one phase, interrupted in-process


class _Interrupted(Exception):
    pass


class _Interrupt(keras.callbacks.Callback):
    """Stops ``fit`` abruptly (no ``on_train_end``) at a chosen moment, as a kill would."""

    def __init__(self, epoch, moment):
        super().__init__()
        self.epoch, self.moment = epoch, moment

    def on_epoch_begin(self, epoch, logs=None):
        if self.moment == "epoch_begin" and epoch == self.epoch:
            raise _Interrupted

    def on_epoch_end(self, epoch, logs=None):
        if self.moment == "before_backup" and epoch == self.epoch:
            raise _Interrupted

    def on_train_end(self, logs=None):
        if self.moment == "train_end":
            raise _Interrupted


def _phase_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 16)).astype("float32")
    y = (x[:, 0] + rng.normal(size=40) > 0).astype(int)
    x_val = rng.normal(size=(12, 16)).astype("float32")
    return x, y, x_val, (x_val[:, 0] > 0).astype(int)


def _fit(phase_dir, interrupt=None, monkeypatch=None, epochs=12, patience=2):
    """fit_part on a small head; with ``interrupt`` = (epoch, moment), stop it there first and
    run it again (the resume). Returns (weights, history)."""
    data = _phase_data()

    def head():
        keras.utils.set_random_seed(0)
        return build_head(16, 8, seed=0)

    def fit_phase(model):
        return fitting.fit_part(model, *data, epochs, 8, 1e-2, phase_dir, phase_dir.parent / "logs",
                                patience, 0, verbose=0)

    if interrupt is not None:
        real = fitting.phase_callbacks

        def with_interrupt(*args, **kwargs):
            callbacks = real(*args, **kwargs)
            stop = _Interrupt(*interrupt)
            # before_backup: killed after the epoch was logged, before its backup was written;
            # train_end: killed after the last backup, before early stopping restored the best.
            at = {"epoch_begin": len(callbacks), "before_backup": len(callbacks) - 1, "train_end": 0}
            callbacks.insert(at[interrupt[1]], stop)
            return callbacks

        monkeypatch.setattr(fitting, "phase_callbacks", with_interrupt)
        with pytest.raises(_Interrupted):
            fit_phase(head())
        monkeypatch.setattr(fitting, "phase_callbacks", real)
        assert not (phase_dir / "done.weights.h5").exists()
    model = head()
    history = fit_phase(model)
    return model.get_weights(), history


def _h5_arrays(path):
    import h5py

    arrays = {}
    with h5py.File(path) as fh:
        fh.visititems(lambda name, item: arrays.update({name: item[()].tobytes()})
                      if isinstance(item, h5py.Dataset) else None)
    return arrays


def _raw_epochs(phase_dir):
    with open(phase_dir / "history.csv") as fh:
        return [int(r["epoch"]) for r in csv.DictReader(fh)]


def test_an_interrupted_phase_ends_with_the_weights_and_history_of_an_uninterrupted_one(
        tmp_path, monkeypatch):
    weights, history = _fit(tmp_path / "whole" / "phase-head")
    stopped, best = len(history), int(np.argmax([float(r["val_auc"]) for r in history]))
    # The premise: early stopping ended the phase with its best epoch before the last, so
    # the resumed runs below must restore its state (best, wait) and the best weights.
    assert stopped < 12 and best < stopped - 1, history
    cases = [(stopped - 1, "epoch_begin"), (best + 1, "epoch_begin"), (best, "before_backup"),
             (0, "train_end")]
    for k, moment in cases:
        phase = tmp_path / f"{moment}{k}" / "phase-head"
        resumed_weights, resumed_history = _fit(phase, (k, moment), monkeypatch)
        assert resumed_history == history, (k, moment)
        assert all(np.array_equal(a, b) for a, b in zip(resumed_weights, weights)), (k, moment)
        # The best-only checkpoint kept its best value too: it holds the same epoch's weights.
        checkpoint = tmp_path / "whole" / "phase-head" / "best.weights.h5"
        assert _h5_arrays(phase / "best.weights.h5") == _h5_arrays(checkpoint), (k, moment)
        assert not (phase / "backup").exists()  # a finished phase drops its backup
        # Only the epoch that a kill cut short (before its backup) is trained twice.
        redone = {"epoch_begin": [], "before_backup": [k], "train_end": []}[moment]
        assert _raw_epochs(phase) == sorted(list(range(stopped)) + redone), (k, moment)


def test_the_backup_holds_the_optimizer_state_and_the_callbacks_state(tmp_path, monkeypatch):
    import h5py

    phase = tmp_path / "phase-head"
    real = fitting.phase_callbacks
    monkeypatch.setattr(fitting, "phase_callbacks",
                        lambda *a, **kw: real(*a, **kw) + [_Interrupt(2, "epoch_begin")])
    with pytest.raises(_Interrupted):
        keras.utils.set_random_seed(0)
        fitting.fit_part(build_head(16, 8, seed=0), *_phase_data(), 12, 8, 1e-2, phase,
                         tmp_path / "logs", 2, 0, verbose=0)
    state = fitting.read_backup_state(phase / "backup")
    assert state["epoch"] == 2 and state["weights"] == "epoch2.weights.h5" and not state["stopped"]
    assert set(state["callbacks"]) == {"early_stopping", "checkpoint"}
    assert state["callbacks"]["early_stopping"]["best"] == state["callbacks"]["checkpoint"]["best"]
    with h5py.File(phase / "backup" / state["weights"]) as fh:
        names = []
        fh.visit(names.append)
    # Adam's step count, learning rate and two moments per trainable variable (the head has 6).
    assert sum(n.startswith("optimizer/vars/") for n in names) == 2 + 2 * 6


def test_each_epoch_draws_its_order_and_masks_from_the_seed_and_epoch_alone():
    from karyo.data.pipeline import make_dataset, steps_per_epoch

    x = np.arange(10, dtype=np.float32)[:, None]
    steps = steps_per_epoch(10, 4)

    def epochs(first, n):
        stream = iter(make_dataset(x, np.zeros(10), 4, shuffle=True, seed=7, first_epoch=first))
        return [[int(v) for _ in range(steps) for v in next(stream)[0].numpy().ravel()] for _ in range(n)]

    zero, one, two = epochs(0, 3)
    assert all(sorted(e) == list(range(10)) for e in (zero, one, two))
    assert len({tuple(e) for e in (zero, one, two, list(range(10)))}) == 4  # reshuffled every epoch
    assert epochs(1, 2) == [one, two]  # a stream resumed at epoch 1 continues as if never stopped
    assert epochs(0, 1) != [[int(v) for b in make_dataset(x, None, 4, shuffle=True, seed=8, first_epoch=0).take(steps)
                             for v in b.numpy().ravel()]]  # another seed, another order

    model = build_head(4, 4, seed=0)
    generators = fitting.seed_generators(model)
    assert len(generators) == 2  # the two MC Dropout layers
    states = {}
    for first in (5, 4):
        seeding = fitting.epoch_seeding(3, "phase-head", first_epoch=first)
        seeding.set_model(model)
        for epoch in range(first, 7):
            seeding.on_epoch_begin(epoch)
            states.setdefault(epoch, []).append([g.state.numpy().tolist() for g in generators])
            for g in generators:
                g.next()  # the batches of the epoch advance the masks
        with pytest.raises(RuntimeError, match="training data is at epoch 7"):
            seeding.on_epoch_begin(8)
    assert states[5][0] == states[5][1] and states[6][0] == states[6][1] != states[5][0]
    other = fitting.epoch_seeding(3, "phase-fine_tune")
    assert other.data_seed != seeding.data_seed  # another phase, another stream


# ------------------------------------------------------------------ karyo train, SIGKILLed twice


def _epochs_in(path):
    if not path.is_file():
        return []
    with open(path) as fh:
        return [int(r["epoch"]) for r in csv.DictReader(fh)]


def _run_until(cmd, env, log, n_epochs, timeout=240):
    """Start ``cmd``; SIGKILL it once ``log`` shows ``n_epochs`` epochs. Returns the epochs logged."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.time() + timeout
        while len(_epochs_in(log)) < n_epochs and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return _epochs_in(log)


def _same_run(a, b):
    for name in ("predictions.csv", "history.csv", "split.csv", "wrong_predictions.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert json.loads((a / "metrics.json").read_text()) == json.loads((b / "metrics.json").read_text())


@pytest.mark.slow
def test_train_killed_in_each_phase_then_resumed_gives_the_uninterrupted_result(tmp_path):
    manifest = write_karyograms(tmp_path / "data")
    args = ["train", "vgg16_unfreeze1", "--data", str(manifest), "--image-size", "32",
            "--weights", "none", "--epochs", "30", "--batch-size", "4", "--mc", "10",
            "--cache", str(tmp_path / "cache")]
    reference = tmp_path / "whole"
    assert main(args + ["--out", str(reference)]) == 0
    head_epochs = len(_epochs_in(reference / "phase-head" / "history.csv"))
    fine_epochs = len(_epochs_in(reference / "phase-fine_tune" / "history.csv"))
    assert head_epochs >= 4 and fine_epochs >= 3, "too few epochs to kill the run in the middle"

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "karyo"] + args + ["--out", str(out)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    done = _run_until(cmd, env, out / "phase-head" / "history.csv", 2)
    assert 2 <= len(done) < head_epochs, "the first kill must land in the head phase"
    done = _run_until(cmd + ["--resume"], env, out / "phase-fine_tune" / "history.csv", 2)
    assert (out / "phase-head" / "done.weights.h5").is_file()
    assert 2 <= len(done) < fine_epochs, "the second kill must land in the fine-tuning phase"
    assert not (out / "metrics.json").exists()

    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    first_epoch = next(int(line.split()[1].split("/")[0]) for line in resumed.stdout.splitlines()
                       if line.startswith("Epoch "))
    assert first_epoch > 1  # Keras numbers epochs from 1: the fine-tuning did not start over
    _same_run(out, reference)
