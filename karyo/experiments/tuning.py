"""Bayesian search over the learning rate and the batch size with keras-tuner (thesis 3.2).

The thesis ran a Bayesian optimisation of two hyperparameters, the learning rate and the batch
size, with the validation loss as objective, and plotted each against the validation loss,
coloured by validation accuracy (Figs. 3.3 and 3.4). It found learning rates in [7e-4, 3e-2]
to work, batch sizes of 16 or 32 to be best and 512 or more to run out of GPU memory, and chose
1e-3 and 16 for every later experiment. :func:`tune` repeats that search:

* keras-tuner's Bayesian optimisation (a Gaussian process over the completed trials;
  ``BayesianOptimization`` is ``keras_tuner.Tuner`` with ``BayesianOptimizationOracle``, which
  is how it is assembled here) over a :class:`KaryogramHyperModel`: the learning rate
  log-uniform in ``lr_range`` (default 1e-5 .. 1e-1), the batch size a choice of powers of two
  from 8 to 512 (those larger than the training set are left out), applied in
  ``HyperModel.fit``; objective ``val_loss``.
* ``space="extended"`` also searches how many of the backbone's last blocks to fine-tune
  (:func:`unfreeze_choices`) and the head's dropout rate: choosing what to fine-tune by search,
  as BioTune argues, instead of fixing it by hand as the thesis did in 4.3.
* A trial trains what ``karyo train`` would train with its hyperparameters, on the training
  split, and scores it on the validation split (the test split is never touched): the head on
  the frozen backbone's pooled features, which are computed once and cached on disk
  (:func:`karyo.models.features.cached_features`, shared with ``karyo train``), so a trial costs a head
  fit, not a backbone pass; with ``unfreeze`` = k > 0 the head is trained first and then the
  last k blocks with the head at ``FINE_TUNE_LEARNING_RATE`` on the cached output of the still
  frozen part. Each trial starts from the same seeded initialisation, so trials differ only by
  their hyperparameters. Models are not kept: retrain the best with ``karyo train``.

Outputs in ``out_dir``: ``trials.csv`` (one row per trial: its hyperparameters, best-epoch
validation loss and accuracy, status, seconds, the worker that ran it and, for a failed trial,
its error), ``best.json`` (the hyperparameters as ``karyo train --hyperparameters`` reads them,
under ``"hyperparameters"``), ``figures/val_loss_vs_lr.png`` and
``figures/val_loss_vs_batch_size.png`` (and, for the extended space, ``val_loss_vs_dropout.png``
and ``val_loss_vs_unfreeze.png``), ``search.json`` (the settings the search was started with)
and keras-tuner's own project in ``out_dir/keras_tuner``.

Resuming. Rerunning :func:`tune` with the same arguments continues the search (keras-tuner's
``overwrite=False``): finished trials are kept, a trial interrupted by a kill is run again, and a
finished search adds no trials (a larger ``max_trials`` extends it). keras-tuner would silently
keep the old search space if the settings changed, so a rerun with other settings is refused
(``overwrite=True`` starts afresh). keras-tuner writes its state files in place; here they are
written atomically, and a trial that a kill left half-recorded is run again rather than lost.

Failures. A trial that raises (for example running out of memory at batch size 512, as in the
thesis) is recorded as failed with its error, and the search goes on; keras-tuner's own rule
of stopping after 3 consecutive failures is replaced by stopping when the first 3 trials have
all failed, which is a broken setup, not a bad hyperparameter. A search without a completed
trial raises :class:`~karyo.errors.KaryoError`: "best" hyperparameters never come from failed
trials. Memory does not grow from trial to trial: keras-tuner calls
``keras.backend.clear_session()`` before building each trial's model.

Distributed search (keras-tuner's own mode: one chief runs the oracle, workers run trials):
start the same call (or the same ``karyo tune`` command) once per process, with::

    KERASTUNER_ORACLE_IP=10.0.0.1  KERASTUNER_ORACLE_PORT=8000  KERASTUNER_TUNER_ID=chief
    KERASTUNER_ORACLE_IP=10.0.0.1  KERASTUNER_ORACLE_PORT=8000  KERASTUNER_TUNER_ID=tuner0
    KERASTUNER_ORACLE_IP=10.0.0.1  KERASTUNER_ORACLE_PORT=8000  KERASTUNER_TUNER_ID=tuner1  ...

The chief serves the oracle (gRPC at that address and port) and runs no trial; it does not load
images. Workers ask it for hyperparameters, train and report back, until ``max_trials`` trials
were handed out. Only the chief sees every trial, so only the chief writes ``trials.csv``,
``best.json`` and the figures, once all workers have finished (keras-tuner's chief polls for
that every 20 s); a worker's :func:`tune` returns a summary of the trials it ran, with
``"role": "worker"``. keras-tuner does not send a failed trial's error message to the chief,
so each worker writes it to ``keras_tuner/trial_<id>/karyo_trial.json`` in its ``out_dir``; the
chief reads it when ``out_dir`` is a shared folder and otherwise names the worker whose output
holds it. Give every process the same arguments; ``overwrite`` is honoured by the chief only.
Concurrent data preparation in one ``out_dir`` is serialised by a file lock, and the feature
cache is safe to share. A killed worker restarted with the same ``KERASTUNER_TUNER_ID`` reruns
its unfinished trial; a restarted chief resumes the search from ``out_dir``.

Example:
    >>> best = tune("data/manifest.csv", "runs/tuning", max_trials=20, epochs=10)  # doctest: +SKIP
    >>> best["hyperparameters"]                                                    # doctest: +SKIP
    {'lr': 0.0011, 'batch_size': 16, 'dropout': 0.5, 'unfreeze': 0, 'dense_units': 256}
"""

import contextlib
import csv
import io
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from karyo import thesis
from karyo.atomic import atomic_write_text, write_csv
from karyo.data.manifest import check_manifest, KARYOGRAM_LABELS, read_manifest, sha256_file
from karyo.data.pipeline import label_indices, load_images, make_dataset, steps_per_epoch
from karyo.data.splits import split_rows
from karyo.errors import KaryoError
from karyo.experiments.figures import plot_tuning_scatter
from karyo.experiments.fit import epoch_seeding
from karyo.experiments.training import default_cache_dir, prepare_data
from karyo.models.backbones import check_image_size, get_backbone
from karyo.models.features import cached_features
from karyo.models.network import (build_backbone, build_head, build_model, DEFAULT_DENSE_UNITS, DEFAULT_DROPOUT,
                                  split_model)
from karyo.models.unfreeze import FINE_TUNE_LEARNING_RATE, unfreeze_blocks
from karyo.models.weights import resolve_weights, weights_identity

#: keras-tuner's project folder inside ``out_dir``.
PROJECT_NAME = "keras_tuner"
#: The batch sizes the thesis' search could choose from (3.2: 16 or 32 best, 512 out of memory).
BATCH_SIZES = (8, 16, 32, 64, 128, 256, 512)
#: Learning-rate range searched, log-uniformly (the thesis found [7e-4, 3e-2] to work).
LR_RANGE = (1e-5, 1e-1)
#: The thesis' choices (3.2), used as the defaults of the search space.
THESIS_LR, THESIS_BATCH_SIZE = thesis.LEARNING_RATE, thesis.BATCH_SIZE
#: Dropout rates the extended space searches (both MCDropout layers of the head share one).
DROPOUT_RANGE = (0.1, 0.7, 0.1)
#: Stop a search whose first this-many trials all failed: a broken setup, not a bad value.
FAIL_FAST = 3
#: trials.csv columns; hyperparameters not searched hold their fixed value.
TRIAL_COLUMNS = ("trial_id", "lr", "batch_size", "dropout", "unfreeze", "dense_units", "val_loss",
                 "val_accuracy", "status", "seconds", "tuner", "error")
#: Settings a resumed search must share with the one it continues (``search.json``).
_SETTING_KEYS = ("manifest_sha256", "backbone", "image_size", "weights", "space", "lr_range",
                 "batch_sizes", "unfreeze_choices", "dropout_range", "dense_units", "epochs",
                 "fine_tune_lr", "seed", "protocol", "augmented")
_RECORD_NAME = "karyo_trial.json"


# ------------------------------------------------------------------------------ the space


def batch_size_choices(n_train):
    """Powers of two from 8 to 512 (thesis 3.2), without those larger than the training set.

    A batch larger than the training set is the whole set, like the next smaller power, so it
    would only repeat a trial. At least the smallest value remains.
    """
    return [b for b in BATCH_SIZES if b <= n_train] or [BATCH_SIZES[0]]


def unfreeze_choices(backbone):
    """How many of the backbone's last blocks the extended space may fine-tune.

    0, 1 and 2 for every backbone: the thesis trained VGG16's last one and two blocks (4.3.2,
    4.3.3). Backbones cut into many small blocks (8 or more: InceptionV3's stem and 11
    Inception modules, Xception, EfficientNetV2-B0, MobileNetV3) also get half of their blocks
    and all of them, which is what the thesis did with InceptionV3 (4.3.4).
    """

    n = len(get_backbone(backbone).blocks)
    choices = [0, 1, 2] + ([n // 2, n] if n >= 8 else [])
    return sorted({c for c in choices if c <= n})


def _unfreeze_value(k, backbone):
    """The depth as ``karyo train`` takes it: ``"all"`` when every block is unfrozen."""

    return "all" if k and k == len(get_backbone(backbone).blocks) else int(k)


# ------------------------------------------------------------------------------ the hypermodel


def _keras_tuner():
    """Import keras-tuner, failing with one clear message if it cannot search (SPEC 8)."""
    try:
        import keras_tuner
        import scipy  # noqa: F401  the "bayesian" extra
        import sklearn  # noqa: F401
        import tensorboard  # noqa: F401  every trial fails without it on TF >= 2.21
    except ImportError as exc:
        raise KaryoError(f"the Bayesian search needs keras-tuner with its extras ({exc.name} is "
                         f"missing): pip install 'keras-tuner[bayesian]' tensorboard") from None
    return keras_tuner


def _compile_trial(model, lr):
    """Adam at ``lr``, binary cross-entropy, accuracy: the metrics of thesis Figs. 3.3 / 3.4."""
    import keras

    model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr), loss="binary_crossentropy",
                  metrics=[keras.metrics.BinaryAccuracy(name="accuracy")])
    return model


def _fit_phase(model, x_train, y_train, x_val, y_val, lr, batch_size, epochs, seed, verbose,
               stream="trial"):
    """Fit ``model`` for ``epochs``; return its best epoch's metrics (lowest validation loss).

    Each epoch's order and dropout masks are drawn from (seed, ``stream``, epoch) alone
    (``karyo.experiments.fit.epoch_seeding``): a trial run again after a kill scores the same."""
    from keras_tuner.errors import FailedTrialError

    _compile_trial(model, lr)
    seeding = epoch_seeding(seed, stream)
    train = make_dataset(x_train, y_train.astype("float32"), batch_size, shuffle=True,
                         seed=seeding.data_seed, first_epoch=0)
    val = make_dataset(x_val, y_val.astype("float32"), batch_size)
    history = model.fit(train, validation_data=val, epochs=epochs, verbose=verbose, shuffle=False,
                        steps_per_epoch=steps_per_epoch(len(x_train), batch_size),
                        callbacks=[seeding]).history
    val_loss = np.asarray(history["val_loss"], dtype=np.float64)
    if not np.isfinite(val_loss).any():
        raise FailedTrialError(f"training diverged: the validation loss is {val_loss[-1]} "
                               f"(learning rate {lr:.3g})")
    best = int(np.nanargmin(np.where(np.isfinite(val_loss), val_loss, np.nan)))
    return {name: float(values[best]) for name, values in history.items()}


def _make_hypermodel_class():
    """:class:`KaryogramHyperModel`, defined on first use so that importing karyo stays cheap."""
    import keras_tuner

    class KaryogramHyperModel(keras_tuner.HyperModel):
        """The thesis' network with the search space of thesis 3.2 (see :func:`tune`).

        ``build(hp)`` returns the trainable part: the head on pooled features (``unfreeze`` 0)
        or the whole network (``unfreeze`` > 0, split into phases in ``fit``).
        ``fit(hp, model)`` applies the batch size and trains on the data given to
        :meth:`set_data`; it returns the best epoch's ``val_loss`` and ``val_accuracy``.
        """

        def __init__(self, backbone, image_size, weights_arg, cache_key, space, lr_range,
                     batch_sizes, epochs, seed, input_dim, cache_dir, dense_units, dropout,
                     fine_tune_lr, progress=False):
            super().__init__(name="karyogram")
            self.backbone, self.image_size, self.weights_arg = backbone, image_size, weights_arg
            self.cache_key, self.space, self.lr_range = list(cache_key), space, tuple(lr_range)
            self.batch_sizes, self.epochs, self.seed = list(batch_sizes), int(epochs), int(seed)
            self.input_dim, self.cache_dir = int(input_dim), cache_dir
            self.dense_units, self.dropout, self.fine_tune_lr = dense_units, dropout, fine_tune_lr
            self.unfreeze = unfreeze_choices(backbone) if space == "extended" else [0]
            self.progress = progress
            self.data = None

        def set_data(self, images, labels, pooled):
            """Training and validation images, labels and pooled features (dicts by split)."""
            self.data = {"images": images, "labels": labels, "pooled": pooled}

        def values(self, hp):
            """Register the search space in ``hp`` (idempotent) and return this trial's values."""
            low, high = self.lr_range
            default_lr = THESIS_LR if low <= THESIS_LR <= high else math.sqrt(low * high)
            default_batch = THESIS_BATCH_SIZE if THESIS_BATCH_SIZE in self.batch_sizes \
                else self.batch_sizes[0]
            values = {
                "lr": hp.Float("lr", low, high, sampling="log", default=default_lr),
                "batch_size": hp.Choice("batch_size", self.batch_sizes, default=default_batch),
                "dropout": self.dropout, "unfreeze": 0, "dense_units": self.dense_units,
            }
            if self.space == "extended":
                low_d, high_d, step = DROPOUT_RANGE
                values["unfreeze"] = hp.Choice("unfreeze", self.unfreeze, default=0)
                values["dropout"] = hp.Float("dropout", low_d, high_d, step=step,
                                             default=self.dropout)
            return values

        def declare_hyperparameters(self, hp):
            # The whole space up front, so the oracle samples the batch size from the first
            # trial on (it is only read in ``fit``) and the chief knows the space without data.
            self.values(hp)

        def build(self, hp):
            import keras

            v = self.values(hp)
            keras.utils.set_random_seed(self.seed)
            if v["unfreeze"] == 0:
                return build_head(self.input_dim, v["dense_units"], v["dropout"], seed=self.seed)
            return build_model(self.backbone, self.image_size, weights=self.weights_arg,
                               dense_units=v["dense_units"], dropout=v["dropout"], seed=self.seed)

        def fit(self, hp, model, *args, verbose=0, **kwargs):
            # keras-tuner's callbacks (a checkpoint of every best epoch) are not used: the
            # search keeps hyperparameters, not models.

            if self.data is None:
                raise KaryoError("the hypermodel has no data (set_data was not called)")
            v = self.values(hp)
            labels, pooled = self.data["labels"], self.data["pooled"]
            y_train, y_val = labels["train"], labels["val"]
            if v["unfreeze"] == 0:
                return _fit_phase(model, pooled["train"], y_train, pooled["val"], y_val, v["lr"],
                                  v["batch_size"], self.epochs, self.seed, verbose)
            # As ``karyo train`` does: the head on the pooled features first, then the last
            # blocks with the head at the fine-tuning rate, on the frozen part's cached output.
            _, head = split_model(model, 0)
            _fit_phase(head, pooled["train"], y_train, pooled["val"], y_val, v["lr"],
                       v["batch_size"], self.epochs, self.seed, verbose)
            k = v["unfreeze"]
            unfreeze_blocks(model, k)
            frozen, trainable = split_model(model, k)
            images = self.data["images"]
            if frozen is None:  # every block unfrozen: the network trains on the images
                x = {p: images[p].astype("float32") for p in ("train", "val")}
            else:
                key = self.cache_key + [f"unfreeze{k}"]
                x = {p: cached_features(frozen, images[p], key, self.cache_dir, progress=self.progress)
                     for p in ("train", "val")}
            return _fit_phase(trainable, x["train"], y_train, x["val"], y_val, self.fine_tune_lr,
                              v["batch_size"], self.epochs, self.seed, verbose, stream="fine_tune")

    return KaryogramHyperModel


# ------------------------------------------------------------------------ oracle and tuner


def _trial_record_path(project_dir, trial_id):
    return Path(project_dir) / f"trial_{trial_id}" / _RECORD_NAME


def _make_tuner_classes():
    """The oracle and tuner classes (keras-tuner's, with the changes the module docstring lists)."""
    import keras_tuner
    from keras_tuner import synchronized
    from keras_tuner.engine.trial import TrialStatus

    ended = (TrialStatus.COMPLETED, TrialStatus.FAILED)

    class SearchOracle(keras_tuner.oracles.BayesianOptimizationOracle):
        """keras-tuner's Bayesian oracle, with atomic state files, a repaired resume, and the
        worker and the wall-clock seconds of every trial recorded in its state."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.karyo = {"tuner": {}, "started": {}, "seconds": {}}

        @synchronized
        def create_trial(self, tuner_id):
            resent = tuner_id in self.ongoing_trials
            trial = super().create_trial(tuner_id)
            if trial.status == TrialStatus.RUNNING and not resent:
                self.karyo["tuner"][trial.trial_id] = tuner_id
                self.karyo["started"][trial.trial_id] = time.time()
                self.save()
            return trial

        @synchronized
        def end_trial(self, trial):
            started = self.karyo["started"].get(trial.trial_id)
            if started is not None:
                self.karyo["seconds"][trial.trial_id] = round(time.time() - started, 3)
            super().end_trial(trial)

        def get_state(self):
            return {**super().get_state(), "karyo": self.karyo}

        def set_state(self, state):
            super().set_state(state)
            saved = state.get("karyo") or {}
            self.karyo = {k: dict(saved.get(k) or {}) for k in ("tuner", "started", "seconds")}

        def save(self):
            atomic_write_text(self._get_oracle_fname(), json.dumps(self.get_state()))

        def _save_trial(self, trial):
            path = Path(self._get_trial_dir(trial.trial_id)) / "trial.json"
            atomic_write_text(path, json.dumps(trial.get_state()))

        def populate_space(self, trial_id):
            # keras-tuner draws the Gaussian process' restart points from a RandomState it does
            # not save: a resumed search would draw them anew from the seed and choose other
            # values than an uninterrupted one. Drawn from (seed, trial number), they do not
            # depend on whether the search was interrupted.
            self._random_state = np.random.RandomState([int(self.seed), _trial_order(trial_id)[1]])
            return super().populate_space(trial_id)

        def reload(self):
            super().reload()
            # Trials in the order they were created, not the file system's (the Gaussian
            # process is fitted on them in this order).
            self.trials = dict(sorted(self.trials.items(), key=lambda item: _trial_order(item[0])))
            # A kill between writing a trial's file and the oracle's leaves the two disagreeing:
            # a started trial the oracle does not know is running (it would stay unfinished
            # forever) or an ended one it still lists as running (it would be redone).
            queue = [t for t in self._retry_queue if self.trials[t].status not in ended]
            for trial_id in sorted(self.trials, key=_trial_order):
                status = self.trials[trial_id].status
                if status in ended and trial_id not in self.end_order:
                    self.end_order.append(trial_id)
                elif status == TrialStatus.RUNNING and trial_id not in queue:
                    queue.append(trial_id)
            self._retry_queue = queue

    class SearchTuner(keras_tuner.Tuner):
        """keras-tuner's ``Tuner`` (with a :class:`SearchOracle` it is ``BayesianOptimization``)
        that records each trial's error where the chief can read it, and stops a search whose
        first trials all failed.

        Quiet (``quiet=True``), a failed trial shows its one-line error only: keras-tuner prints
        the traceback of every failed trial to ``sys.stderr`` (unless its debug switch, which
        is not public, is off), so each trial's standard error is held and, after the trial,
        passed on without what was written after the trial raised.
        """

        def __init__(self, *args, progress=None, quiet=False, **kwargs):
            super().__init__(*args, **kwargs)
            self.progress = progress
            self.quiet = quiet
            self.ran = []
            self.held = None  # (the real sys.stderr, the buffer, where the trial raised)

        def on_trial_begin(self, trial):
            super().on_trial_begin(trial)
            if self.quiet and self.held is None:
                self.held = [sys.stderr, io.StringIO(), None]
                sys.stderr = self.held[1]

        def release_stderr(self):
            """Give ``sys.stderr`` back, passing on what the trial wrote before it raised."""
            if self.held is None:
                return
            real, buffer, raised_at = self.held
            self.held = None
            sys.stderr = real
            real.write(buffer.getvalue()[:raised_at])
            real.flush()

        def run_trial(self, trial, *args, **kwargs):
            started = time.time()
            record = {"trial_id": trial.trial_id, "tuner": self.tuner_id, "error": ""}
            try:
                return super().run_trial(trial, *args, **kwargs)
            except Exception as exc:
                record["error"] = _one_line(exc)
                print(f"karyo tune: trial {trial.trial_id} failed: {record['error']}",
                      file=sys.stderr)
                if self.held is not None:
                    self.held[2] = len(self.held[1].getvalue())
                raise
            finally:
                record["seconds"] = round(time.time() - started, 3)
                self.ran.append(record)
                with contextlib.suppress(OSError):
                    atomic_write_text(_trial_record_path(self.project_dir, trial.trial_id),
                                      json.dumps(record))

        def on_trial_end(self, trial):
            self.release_stderr()
            super().on_trial_end(trial)
            if self.progress is not None:
                self.progress.update(1)
            if _role() != "standalone":
                return  # a worker cannot see the other trials
            statuses = [t.status for t in self.oracle.trials.values()]
            failed = statuses.count(TrialStatus.FAILED)
            if failed >= FAIL_FAST and TrialStatus.COMPLETED not in statuses:
                raise SearchFailed(f"the first {failed} trials all failed")

        def save(self):
            if not self._is_worker():
                self.oracle.save()
            atomic_write_text(self._get_tuner_fname(), json.dumps(self.get_state()))

    class SearchFailed(keras_tuner.errors.FatalError):
        """The fail-fast rule: keras-tuner's own "stop the search" error, raised from the search
        loop; :func:`tune` catches it and reports the trials' errors as a ``KaryoError``."""

    return SearchOracle, SearchTuner, SearchFailed


def _trial_order(trial_id):
    return (0, int(trial_id)) if str(trial_id).isdigit() else (1, str(trial_id))


def _one_line(exc_or_text):
    """The last meaningful line of an error or traceback, without keras-tuner's wrapper name."""
    if isinstance(exc_or_text, BaseException):
        text = f"{type(exc_or_text).__name__}: {exc_or_text}".strip()
    else:
        lines = [ln.strip() for ln in str(exc_or_text or "").splitlines() if ln.strip()]
        text = lines[-1] if lines else ""
    for prefix in ("keras_tuner.src.errors.", "keras_tuner.errors."):
        text = text.replace(prefix, "")
    if text.startswith("FailedTrialError: "):
        text = text[len("FailedTrialError: "):]
    return " ".join(text.split())[:500]


# ------------------------------------------------------------------------------ results


def _trial_rows(oracle, project_dir, fixed):
    """One dict per trial the oracle knows, for trials.csv and best.json."""
    rows = []
    for trial_id in sorted(oracle.trials, key=_trial_order):
        trial = oracle.trials[trial_id]
        values = dict(fixed, **trial.hyperparameters.values)
        status = str(trial.status or "").lower()

        def metric(name):
            if status != "completed" or not trial.metrics.exists(name):
                return None
            value = trial.metrics.get_last_value(name)
            return float(value) if value is not None else None

        record = {}
        path = _trial_record_path(project_dir, trial_id)
        with contextlib.suppress(OSError, ValueError):
            record = json.loads(path.read_text())
        tuner = oracle.karyo["tuner"].get(trial_id, record.get("tuner", ""))
        error = ""
        if status == "failed":
            error = record.get("error") or _one_line(trial.message) or (
                f"failed on worker {tuner or '?'} (its error is in that worker's output)")
        seconds = oracle.karyo["seconds"].get(trial_id, record.get("seconds"))
        rows.append({
            "trial_id": trial_id, "lr": values.get("lr"), "batch_size": values.get("batch_size"),
            "dropout": values.get("dropout"), "unfreeze": values.get("unfreeze"),
            "dense_units": values.get("dense_units"), "val_loss": metric("val_loss"),
            "val_accuracy": metric("val_accuracy"), "status": status, "seconds": seconds,
            "tuner": tuner, "error": error,
        })
    return rows


def read_trials(path):
    """Rows of a ``trials.csv`` as dicts (numbers stay strings; empty = missing)."""
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _write_figures(out_dir, rows, space):
    """The thesis' Figs. 3.3 / 3.4 (and the extended space's two more), from every trial."""

    loss = [r["val_loss"] for r in rows]
    acc = [r["val_accuracy"] for r in rows]
    figures = out_dir / "figures"
    plots = [("lr", "Learning rate", True), ("batch_size", "Batch size", False)]
    if space == "extended":
        plots += [("dropout", "Dropout rate", False), ("unfreeze", "Unfrozen blocks", False)]
    paths = []
    for key, label, log in plots:
        values = [_numeric(r[key]) for r in rows]
        paths.append(plot_tuning_scatter(values, loss, acc, figures / f"val_loss_vs_{key}.png",
                                         label, log=log))
    return paths


def _numeric(value):
    if value == "all":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# ------------------------------------------------------------------------------ the search


@contextlib.contextmanager
def _file_lock(path):
    """An exclusive lock on ``path`` (POSIX ``flock``), so that a chief and workers sharing
    ``out_dir`` prepare the augmented data once instead of overwriting each other's."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no distributed search across processes there
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _check_arguments(backbone, max_trials, epochs, image_size, space, lr_range, protocol):

    name = get_backbone(backbone).name
    check_image_size(name, image_size)
    for label, value in (("max_trials", max_trials), ("epochs", epochs)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise KaryoError(f"{label} must be a positive whole number, not {value!r}")
    if space not in ("thesis", "extended"):
        raise KaryoError(f"unknown search space '{space}' (choose thesis or extended)")
    if protocol not in ("grouped", "thesis"):
        raise KaryoError(f"unknown split protocol '{protocol}' (choose grouped or thesis)")
    try:
        low, high = (float(v) for v in lr_range)
    except (TypeError, ValueError):
        raise KaryoError(f"lr_range must be two numbers, not {lr_range!r}") from None
    if not (0 < low < high and math.isfinite(high)):
        raise KaryoError(f"lr_range must satisfy 0 < low < high, not {lr_range!r}")
    return name, (low, high)


def _check_settings(out_dir, settings, max_trials):
    """Refuse to resume a search started with other settings; record them otherwise."""
    path = out_dir / "search.json"
    if (out_dir / PROJECT_NAME).is_dir() and path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
        changed = [f"{k}: {old.get(k)!r} -> {settings[k]!r}" for k in _SETTING_KEYS
                   if k in old and _jsonable(old.get(k)) != _jsonable(settings[k])]
        if changed:
            raise KaryoError(
                f"{out_dir}: holds a search started with other settings ({'; '.join(changed)}); "
                f"keras-tuner would keep the old search. Pass --overwrite (overwrite=True) to "
                f"start afresh, or choose another --out")
    atomic_write_text(path, json.dumps(dict(settings, max_trials=max_trials), indent=2) + "\n")


def _jsonable(value):
    return json.loads(json.dumps(value))


def _clear(out_dir):
    for name in (PROJECT_NAME, "figures"):
        if (out_dir / name).is_dir():
            shutil.rmtree(out_dir / name)
    for name in ("trials.csv", "best.json", "search.json"):
        with contextlib.suppress(FileNotFoundError):
            (out_dir / name).unlink()


def _role():
    """``standalone``, ``chief`` or ``worker``, from keras-tuner's environment variables."""
    if "KERASTUNER_ORACLE_IP" not in os.environ:
        return "standalone"
    missing = [v for v in ("KERASTUNER_ORACLE_PORT", "KERASTUNER_TUNER_ID") if not os.environ.get(v)]
    if missing:
        raise KaryoError(f"KERASTUNER_ORACLE_IP is set but {' and '.join(missing)} is not: a "
                         f"distributed search needs all three (see karyo.experiments.tuning)")
    return "chief" if "chief" in os.environ["KERASTUNER_TUNER_ID"] else "worker"


def _pooled_dim(backbone, image_size):
    """Length of the backbone's pooled feature vector (built without weights: shapes only)."""

    return int(build_backbone(backbone, image_size, "none").output.shape[-1])


def tune(manifest_path, out_dir, backbone="vgg16", max_trials=20, epochs=10, image_size=416,
         weights="imagenet", space="thesis", seed=0, root=None, cache_dir=None, data_dir=None,
         overwrite=False, protocol="grouped", augmented=True, lr_range=LR_RANGE, verbose=0,
         progress=True):
    """Bayesian search over learning rate and batch size (thesis 3.2); return best.json's content.

    Args:
        manifest_path: karyogram manifest CSV (labels normal / abnormal, ``group`` = case).
        out_dir: the search folder (created; rerunning with it resumes the search).
        backbone: a registered backbone (thesis: ``vgg16``; it also searched InceptionV3's).
        max_trials: number of trials (hyperparameter sets) in all.
        epochs: epochs per trial (per phase when blocks are unfrozen).
        image_size: input side in pixels (thesis: 416).
        weights: ``imagenet``, ``none``, ``auto`` or a weights file.
        space: ``thesis`` (learning rate, batch size) or ``extended`` (also the number of
            unfrozen blocks and the dropout rate).
        seed: seeds the split, the augmentation, every trial's initialisation and the oracle.
        root: folder the manifest's paths are relative to (default: the manifest's folder).
        cache_dir: feature cache (default ``karyo.experiments.training.default_cache_dir()``, shared with
            ``karyo train`` so a search's features serve the training runs and vice versa).
        data_dir: where augmented data is written (default ``out_dir/data``).
        overwrite: discard an earlier search in ``out_dir`` and start afresh.
        protocol: ``grouped`` (split by case, augment the training part only) or ``thesis``.
        augmented: search on the thesis' augmented data (as it did) or on the original images.
        lr_range: (low, high) of the log-uniform learning rate.
        verbose: 0 quiet; 1 keras-tuner's trial tables and Keras progress bars; 2 one line
            per epoch.
        progress: with ``verbose=0``, a progress bar over the trials.

    Returns:
        The content of ``out_dir/best.json``: ``hyperparameters`` (``lr``, ``batch_size``,
        ``dropout``, ``unfreeze``, ``dense_units``, as ``karyo train --hyperparameters`` reads
        them), ``val_loss``, ``val_accuracy``, ``trial_id``, ``completed_trials``,
        ``failed_trials`` and the search's settings. In a distributed worker: a summary of the
        trials it ran (``"role": "worker"``; the chief writes the files).

    Raises:
        KaryoError: bad arguments or data, settings that differ from the search being
            resumed, missing keras-tuner extras, or a search in which no trial completed.
    """
    import keras

    _keras_tuner()
    role = _role()
    backbone, lr_range = _check_arguments(backbone, max_trials, epochs, image_size, space,
                                          lr_range, protocol)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise KaryoError(f"{out_dir}: exists and is not a folder; choose another --out")
    # Validate first, then write: labels, both classes, files, sha256 and decoding of every row,
    # and the split, are checked before the search folder exists.

    manifest = check_manifest(read_manifest(manifest_path, root), KARYOGRAM_LABELS,
                              progress=progress and verbose == 0)
    if protocol == "grouped" or not augmented:
        split_rows(manifest.rows, protocol, seed)
    if overwrite and role != "worker" and out_dir.exists():
        _clear(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    data_dir = Path(data_dir) if data_dir else out_dir / "data"

    with _file_lock(data_dir / ".prepare.lock"):
        prepared = prepare_data(manifest, augmented, protocol, seed, data_dir,
                                progress=progress and verbose == 0)
    parts = {p: [r for r in prepared.rows if r["split"] == p] for p in ("train", "val")}
    for part, members in parts.items():
        if not members:
            raise KaryoError(f"{manifest_path}: the {part} split is empty (too few karyograms)")
    labels = {p: _label_array(rows) for p, rows in parts.items()}
    batch_sizes = batch_size_choices(len(parts["train"]))
    settings = {
        "manifest": str(Path(manifest_path).resolve()),
        "manifest_sha256": sha256_file(manifest_path), "backbone": backbone,
        "image_size": int(image_size), "weights": str(weights), "space": space,
        "lr_range": list(lr_range), "batch_sizes": batch_sizes,
        "unfreeze_choices": unfreeze_choices(backbone) if space == "extended" else [0],
        "dropout_range": list(DROPOUT_RANGE) if space == "extended" else [DEFAULT_DROPOUT],
        "dense_units": DEFAULT_DENSE_UNITS, "epochs": int(epochs),
        "fine_tune_lr": FINE_TUNE_LEARNING_RATE, "seed": int(seed), "protocol": protocol,
        "augmented": bool(augmented),
    }
    if role != "worker":
        _check_settings(out_dir, settings, max_trials)

    weights_arg = weights_used = None
    cache_key = []
    if role != "chief":
        weights_arg, weights_used, _ = resolve_weights(weights, backbone)
        cache_key = [backbone, weights_identity(weights_used, weights_arg, seed), int(image_size)]

    keras_tuner = _keras_tuner()
    SearchOracle, SearchTuner, SearchFailed = _make_tuner_classes()
    HyperModel = _make_hypermodel_class()
    oracle = SearchOracle(
        objective=keras_tuner.Objective("val_loss", direction="min"), max_trials=int(max_trials),
        # keras-tuner reads seed 0 as "no seed": shift it.
        seed=int(seed) + 1,
        # Its own stop after 3 consecutive failures would end a search on a run of
        # out-of-memory batch sizes and, in a chief, leave its lock held (a deadlock).
        max_consecutive_failed_trials=10 ** 9)
    hypermodel = HyperModel(backbone, int(image_size), weights_arg, cache_key, space, lr_range,
                            batch_sizes, epochs, seed, 0, cache_dir, DEFAULT_DENSE_UNITS,
                            DEFAULT_DROPOUT, FINE_TUNE_LEARNING_RATE,
                            progress=progress and verbose == 0)
    if role == "chief" or _finished(out_dir, max_trials):
        # No trial will run here: the chief only serves the oracle, and a finished search
        # only rewrites its results. The head's input width is all that is needed.
        hypermodel.input_dim = _pooled_dim(backbone, int(image_size))
    else:
        hypermodel.set_data(*_load_data(prepared, parts, labels, backbone, image_size,
                                        weights_arg, cache_key, cache_dir, seed,
                                        progress and verbose == 0))
        hypermodel.input_dim = int(hypermodel.data["pooled"]["train"].shape[-1])

    bar = None
    if progress and verbose == 0 and role != "chief":
        from tqdm.auto import tqdm

        bar = tqdm(total=int(max_trials), desc="trials", unit="trial", leave=False)
    # keras-tuner prints "Reloading Tuner from ..." whatever its verbosity.
    with contextlib.redirect_stdout(io.StringIO()) if verbose == 0 else contextlib.nullcontext():
        tuner = SearchTuner(oracle, hypermodel, directory=str(out_dir), project_name=PROJECT_NAME,
                            overwrite=False, progress=bar, quiet=verbose == 0)
    if bar is not None and role == "standalone":
        bar.update(sum(t.status in ("COMPLETED", "FAILED") for t in tuner.oracle.trials.values()))
    stopped = None
    try:
        tuner.search(verbose=verbose)
    except SearchFailed as exc:
        stopped = exc
    finally:
        tuner.release_stderr()
        if bar is not None:
            bar.close()
        keras.backend.clear_session()

    if role == "worker":
        return {"role": "worker", "tuner_id": tuner.tuner_id,
                "trials": [r["trial_id"] for r in tuner.ran],
                "completed_trials": sum(not r["error"] for r in tuner.ran),
                "failed_trials": sum(bool(r["error"]) for r in tuner.ran)}
    return _finish(out_dir, tuner.oracle, tuner.project_dir, settings, weights_used, parts, labels,
                   max_trials, stopped)


def _label_array(rows):

    return label_indices(rows, KARYOGRAM_LABELS)


def _finished(out_dir, max_trials):
    """True if ``out_dir``'s search already ended ``max_trials`` trials (nothing left to run)."""
    project = out_dir / PROJECT_NAME
    ended = 0
    for path in project.glob("trial_*/trial.json"):
        with contextlib.suppress(OSError, ValueError):
            ended += json.loads(path.read_text()).get("status") in ("COMPLETED", "FAILED")
    return ended >= max_trials


def _load_data(prepared, parts, labels, backbone, image_size, weights_arg, cache_key, cache_dir,
               seed, progress):
    """Images, labels and cached pooled features of the training and validation splits."""

    images = {p: load_images(prepared, rows, int(image_size), progress, p) for p, rows in parts.items()}
    # The same network (and seed) as karyo train builds, so the cached features are shared.
    frozen, _ = split_model(build_model(backbone, int(image_size), weights=weights_arg, seed=seed), 0)
    pooled = {p: cached_features(frozen, images[p], cache_key + ["pooled"], cache_dir,
                                 progress=progress) for p in parts}
    return images, labels, pooled


def _finish(out_dir, oracle, project_dir, settings, weights_used, parts, labels, max_trials,
            stopped):
    """Write trials.csv, the figures and best.json; raise if no trial completed."""

    fixed = {"dropout": DEFAULT_DROPOUT, "unfreeze": 0, "dense_units": DEFAULT_DENSE_UNITS}
    rows = _trial_rows(oracle, project_dir, fixed)
    for row in rows:
        row["unfreeze"] = _unfreeze_value(row["unfreeze"] or 0, settings["backbone"])
    write_csv(out_dir / "trials.csv", rows, TRIAL_COLUMNS)
    completed = [r for r in rows if r["status"] == "completed" and r["val_loss"] is not None]
    failed = [r for r in rows if r["status"] == "failed"]
    if not completed:
        with contextlib.suppress(FileNotFoundError):
            (out_dir / "best.json").unlink()
        first = failed[0]["error"] if failed else "no trial ran"
        why = f"{stopped}; " if stopped else ""
        raise KaryoError(f"no trial of the search completed ({why}{len(failed)} failed; the first "
                         f"error: {first}); see {out_dir / 'trials.csv'}")
    _write_figures(out_dir, rows, settings["space"])
    best = min(completed, key=lambda r: (r["val_loss"], _trial_order(r["trial_id"])))
    result = {
        "hyperparameters": {k: best[k] for k in ("lr", "batch_size", "dropout", "unfreeze",
                                                 "dense_units")},
        "val_loss": best["val_loss"], "val_accuracy": best["val_accuracy"],
        "trial_id": best["trial_id"], "completed_trials": len(completed),
        "failed_trials": len(failed), "max_trials": int(max_trials), "objective": "val_loss",
        "searched": ["lr", "batch_size"] + (["unfreeze", "dropout"]
                                            if settings["space"] == "extended" else []),
        "weights_used": weights_used,
        "counts": {p: {lab: int((labels[p] == i).sum()) for i, lab in enumerate(KARYOGRAM_LABELS)}
                   for p in parts},
        "settings": settings,
        "thesis": {"lr": THESIS_LR, "batch_size": THESIS_BATCH_SIZE,
                   "note": "thesis 3.2: lr in [7e-4, 3e-2] works; batch 16 or 32; 512+ ran out "
                           "of GPU memory"},
    }
    atomic_write_text(out_dir / "best.json", json.dumps(result, indent=2) + "\n")
    return result
