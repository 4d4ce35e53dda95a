"""The thesis' two-phase fit, written once: the head on cached features, then the last blocks.

Phase ``head``: the backbone is frozen; its pooled features are computed once (cached on disk,
:mod:`karyo.models.features`) and only the head trains on them. Phase ``fine_tune``
(``unfreeze`` > 0): the last blocks are unfrozen (BatchNormalization stays frozen), the output of
the still frozen part is cached, and the rest trains with the fine-tuning learning rate. Both
phases use the thesis' callbacks (validation AUC monitored, early stopping with the best weights
restored) and a backup that lets a killed phase resume to the same result.

:func:`two_phase_fit` is what the karyogram experiments (:mod:`.training`) and the 24-class
chromosome task (:mod:`.chromosomes`) call; :func:`fit_part` fits one phase.
"""

import contextlib
import csv
import functools
import json
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from sklearn.utils.class_weight import compute_class_weight

from karyo import thesis
from karyo.atomic import atomic_path, atomic_write_text, write_csv
from karyo.data.pipeline import make_dataset, steps_per_epoch
from karyo.errors import KaryoError
from karyo.models.features import cached_features
from karyo.models.network import split_model
from karyo.models.unfreeze import FINE_TUNE_LEARNING_RATE, unfreeze_blocks


#: ``--distribute`` choices: one device, TensorFlow's MirroredStrategy (the devices of one
#: machine) or its MultiWorkerMirroredStrategy (several machines, described by ``TF_CONFIG``).
DISTRIBUTE_CHOICES = ("none", "mirrored", "multi-worker")


def distribution_strategy(distribute="none"):
    """TensorFlow's own distribution strategy for ``distribute`` (one of :data:`DISTRIBUTE_CHOICES`).

    Create it first, before any other TensorFlow work (``MultiWorkerMirroredStrategy`` must be),
    and build and train the model in its scope (:func:`strategy_scope`). ``mirrored`` replicates
    the model on every GPU, or on every logical CPU device when there is no GPU; each batch of
    ``batch_size`` images is split across the replicas and their gradients summed.

    Returns:
        ``None`` for ``none`` (the default device), else the ``tf.distribute.Strategy``.

    Raises:
        KaryoError: an unknown name, or ``multi-worker`` without a valid ``TF_CONFIG``.
    """
    name = str(distribute or "none").lower()
    if name == "none":
        return None
    if name == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    if name == "multi-worker":
        text = os.environ.get("TF_CONFIG", "")
        try:
            cluster = json.loads(text)["cluster"]
        except (ValueError, KeyError, TypeError):
            raise KaryoError("--distribute multi-worker needs TF_CONFIG, the JSON that names every worker "
                             "and this one's index, e.g. {\"cluster\": {\"worker\": [\"host1:12345\", "
                             "\"host2:12345\"]}, \"task\": {\"type\": \"worker\", \"index\": 0}}") from None
        if not cluster.get("worker"):
            raise KaryoError("--distribute multi-worker: TF_CONFIG's cluster lists no worker")
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise KaryoError(f"--distribute {distribute}: choose from {', '.join(DISTRIBUTE_CHOICES)}")


def strategy_scope(strategy):
    """``strategy.scope()``, or a no-op for ``None``: where a model is built and compiled."""
    return strategy.scope() if strategy is not None else contextlib.nullcontext()


def strategy_summary(strategy):
    """What a run's config records of its strategy (``None`` when it had none)."""
    if strategy is None:
        return None
    # MultiWorkerMirroredStrategy's objects are of its implementation class, whose name says less.
    name = ("multi-worker" if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            else "mirrored" if isinstance(strategy, tf.distribute.MirroredStrategy) else type(strategy).__name__)
    return {"distribute": name, "strategy": type(strategy).__name__,
            "replicas": int(strategy.num_replicas_in_sync)}


@dataclass(frozen=True)
class FitConfig:
    """What a two-phase fit needs to know, besides the network and the data.

    Attributes:
        epochs, batch_size, lr: the head phase (thesis 3.2: batch 16, Adam 1e-3).
        unfreeze: blocks fine-tuned after the head: ``0`` (none), ``k`` or ``"all"``.
        fine_tune_epochs, fine_tune_lr: the second phase (skipped when ``unfreeze`` is 0).
        patience: early-stopping patience, in epochs.
        seed: seeds shuffling and dropout masks, per phase and epoch.
        monitor: the validation metric early stopping follows (``val_auc``; ``val_accuracy``
            for the 24-class chromosome task).
        class_weight: ``None`` or ``"balanced"``.
        verbose: Keras' fit verbosity; ``progress``: show the feature-cache progress bars.
    """

    epochs: int
    batch_size: int = thesis.BATCH_SIZE
    lr: float = thesis.LEARNING_RATE
    unfreeze: object = 0
    fine_tune_epochs: int = 0
    fine_tune_lr: float = FINE_TUNE_LEARNING_RATE
    patience: int = 10
    seed: int = 0
    monitor: str = "val_auc"
    class_weight: object = None
    verbose: int = 1
    progress: bool = True

    @property
    def fine_tunes(self):
        """True when a second phase trains unfrozen blocks."""
        return str(self.unfreeze) not in ("0", "None") and self.fine_tune_epochs > 0


def two_phase_fit(model, images, labels, config, run_dir, cache_dir, cache_key):
    """Fit ``model`` (made by ``karyo.models.network.build_model``) in the thesis' two phases.

    Args:
        model: the network; it is trained in place.
        images, labels: dicts with ``train`` and ``val`` arrays (uint8 images, label vectors).
        config: a :class:`FitConfig`.
        run_dir: the folder that receives ``phase-head/``, ``phase-fine_tune/`` and ``logs/``.
        cache_dir, cache_key: the feature cache and the key parts naming this backbone and its
            starting weights (see ``karyo.models.features.cached_features``).

    Returns:
        One history: a dict per epoch with ``phase`` (``head`` or ``fine_tune``) and ``epoch``
        counted across both phases.
    """
    run_dir = Path(run_dir)
    x_train, x_val = images["train"], images["val"]
    y_train, y_val = labels["train"], labels["val"]
    frozen, head = split_model(model, 0)
    f_train, f_val = (cached_features(frozen, x, list(cache_key) + ["pooled"], cache_dir,
                                      progress=config.progress) for x in (x_train, x_val))
    history = [dict(r, phase="head") for r in fit_part(
        head, f_train, y_train, f_val, y_val, config.epochs, config.batch_size, config.lr,
        run_dir / "phase-head", run_dir / "logs" / "head", config.patience, config.seed,
        config.class_weight, config.verbose, config.monitor)]
    if not config.fine_tunes:
        return history
    unfreeze_blocks(model, config.unfreeze)
    frozen, rest = split_model(model, config.unfreeze)
    if frozen is None:  # nothing left frozen: the whole network trains on the images
        t_train, t_val, rest = x_train.astype("float32"), x_val.astype("float32"), model
    else:
        key = list(cache_key) + [f"unfreeze{config.unfreeze}"]
        t_train, t_val = (cached_features(frozen, x, key, cache_dir, progress=config.progress)
                          for x in (x_train, x_val))
    offset = len(history)
    fine = fit_part(rest, t_train, y_train, t_val, y_val, config.fine_tune_epochs, config.batch_size,
                    config.fine_tune_lr, run_dir / "phase-fine_tune", run_dir / "logs" / "fine_tune",
                    config.patience, config.seed, config.class_weight, config.verbose, config.monitor)
    return history + [dict(r, phase="fine_tune", epoch=str(int(r["epoch"]) + offset)) for r in fine]


#: A phase's backup folder (``phase-*/backup``) and the file in it that says what it holds.
BACKUP_DIR, BACKUP_STATE = "backup", "state.json"


def _derived_seed(*numbers):
    """A seed in [0, 2**31) drawn from integers: independent streams for (seed, epoch, layer)."""
    return int(np.random.SeedSequence([int(n) for n in numbers]).generate_state(1, np.uint32)[0] >> 1)


def _stream_number(stream):
    """A stable number for a stream name (a phase: ``phase-head``), so phases draw differently."""
    return stream if isinstance(stream, int) else zlib.crc32(str(stream).encode("utf-8"))


def seed_generators(model):
    """Every Keras ``SeedGenerator`` in ``model`` (its dropout layers' mask streams), in layer order."""
    found, seen = [], set()
    for layer in model._flatten_layers(include_self=True, recursive=True):
        for generator in getattr(layer, "_seed_generators", ()):
            if id(generator) not in seen:
                seen.add(id(generator))
                found.append(generator)
    return found


@functools.lru_cache(maxsize=None)
def _callback_classes():
    """The Keras callbacks that make training resumable to the same result (defined on first use)."""
    class EpochSeeding(keras.callbacks.Callback):
        """Makes each epoch's dropout masks a function of (seed, epoch) alone, and checks that
        the training data is at the same epoch as Keras.

        When Keras starts epoch e this rewinds every seed generator of the model (the dropout
        masks) to a state drawn from (seed, stream, e, its index), and it checks that e is the
        epoch the dataset of :func:`karyo.data.pipeline.make_dataset` (``first_epoch``) is at, whose
        order is drawn from (seed, e). A training resumed at epoch e shuffles and drops units
        exactly as one that was never interrupted; nothing runs per batch.
        """

        def __init__(self, seed, stream=0, first_epoch=0):
            super().__init__()
            self.seed, self.stream = int(seed), _stream_number(stream)
            self.data_seed = _derived_seed(self.seed, self.stream)
            self.first_epoch, self.epochs_begun = int(first_epoch), 0

        def on_epoch_begin(self, epoch, logs=None):
            expected = self.first_epoch + self.epochs_begun
            if epoch != expected:  # a bug, not a user error: the batches would be another epoch's
                raise RuntimeError(f"Keras starts epoch {epoch} but the training data is at epoch "
                                   f"{expected}")
            self.epochs_begun += 1
            for i, generator in enumerate(seed_generators(self.model)):
                state = np.array([_derived_seed(self.seed, self.stream, epoch, i), 0])
                generator.state.assign(state.astype(generator.state.dtype))

    def _number(value):
        return None if value is None else float(value)

    class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
        """Keras' early stopping whose state (best value, epochs waited, best epoch) survives a kill."""

        def get_state(self):
            return {"best": _number(self.best), "wait": int(self.wait), "best_epoch": int(self.best_epoch),
                    "stopped_epoch": int(self.stopped_epoch)}

        def set_state(self, state):
            self.best, self.wait = state["best"], state["wait"]
            self.best_epoch, self.stopped_epoch = state["best_epoch"], state["stopped_epoch"]

    class ResumableCheckpoint(keras.callbacks.ModelCheckpoint):
        """Keras' best-only checkpoint, written atomically, whose best value survives a kill
        (Keras' own forgets it, so a resumed run's first epoch always counted as the best)."""

        def _save_model(self, epoch, batch, logs):
            filepath = self._get_file_path(epoch, batch, logs)
            if self._should_save_model(epoch, batch, logs, filepath):
                with atomic_path(filepath) as tmp:
                    if self.save_weights_only:
                        self.model.save_weights(tmp)
                    else:
                        self.model.save(tmp)

        def get_state(self):
            return {"best": _number(self.best)}

        def set_state(self, state):
            self.best = state["best"]

    class ResumableBackup(keras.callbacks.BackupAndRestore):
        """Keras' backup and restore, made exact: after every epoch it saves, atomically, the
        weights (with the optimizer's state: Adam's moments and step count) and the state of
        the early stopping and checkpoint callbacks; a resumed ``fit`` restores all of it,
        including the best weights early stopping will restore at the end.

        Files: ``epoch<k>.weights.h5`` (after k epochs; the best epoch's file is kept too) and
        ``state.json``, written last, naming them: a kill at any moment leaves a consistent pair.
        It must come after the callbacks whose state it saves in ``fit``'s callback list.
        """

        def __init__(self, backup_dir, early_stopping, checkpoint):
            super().__init__(str(backup_dir), delete_checkpoint=False)
            self.folder = Path(backup_dir)
            self.stateful = {"early_stopping": early_stopping, "checkpoint": checkpoint}

        def on_train_begin(self, logs=None):
            state = read_backup_state(self.folder)
            if state is None:
                return
            model = self.model
            if model.optimizer is not None and not model.optimizer.built:
                model.optimizer.build(model.trainable_variables)
            early = self.stateful["early_stopping"]
            if state["best_weights"] and early.restore_best_weights:
                model.load_weights(self.folder / state["best_weights"])
                early.best_weights = model.get_weights()
            model.load_weights(self.folder / state["weights"])
            for name, callback in self.stateful.items():
                callback.set_state(state["callbacks"][name])
            self._current_epoch = state["epoch"]
            # A phase that early stopping had ended trains no further (its best weights are
            # restored when fit ends).
            model._initial_epoch = self.params["epochs"] if state["stopped"] else state["epoch"]

        def _save_model(self):
            epochs_done = self._current_epoch
            name = f"epoch{epochs_done}.weights.h5"
            with atomic_path(self.folder / name) as tmp:
                self.model.save_weights(tmp)
            early = self.stateful["early_stopping"]
            best = None
            if early.restore_best_weights and early.best_weights is not None:
                best = f"epoch{early.best_epoch + 1}.weights.h5"  # saved when that epoch ended
            state = {"epoch": epochs_done, "weights": name, "best_weights": best,
                     "stopped": bool(self.model.stop_training),
                     "callbacks": {k: c.get_state() for k, c in self.stateful.items()}}
            atomic_write_text(self.folder / BACKUP_STATE, json.dumps(state, indent=1) + "\n")
            for old in self.folder.glob("epoch*.weights.h5"):
                if old.name not in (name, best):
                    old.unlink(missing_ok=True)

    return EpochSeeding, ResumableEarlyStopping, ResumableCheckpoint, ResumableBackup


def read_backup_state(folder):
    """The ``state.json`` of a phase's backup folder, or None (no epoch finished yet)."""
    try:
        return json.loads((Path(folder) / BACKUP_STATE).read_text())
    except (OSError, ValueError):
        return None


def epoch_seeding(seed, stream=0, first_epoch=0):
    """A Keras callback making each epoch's dropout masks a function of (seed, epoch).

    Pair it with the training data ``make_dataset(x, y, batch_size, shuffle=True,
    seed=callback.data_seed, first_epoch=first_epoch)`` (whose epoch e is shuffled from
    (seed, e)), fitted with ``steps_per_epoch``, and put it first in ``fit``'s callbacks.
    ``stream`` (a name or number) separates the draws of two trainings with the same seed (the
    head and fine-tuning phases); ``first_epoch`` is the epoch ``fit`` starts at (a resumed one).
    """
    return _callback_classes()[0](seed, stream, first_epoch)


def phase_callbacks(phase_dir, log_dir, patience, seeding, monitor="val_auc"):
    """The thesis' callbacks for one phase, resumable to the same result, after ``seeding``
    (the phase's :func:`epoch_seeding`)."""
    _, EarlyStopping, Checkpoint, Backup = _callback_classes()
    phase_dir.mkdir(parents=True, exist_ok=True)
    mode = "min" if monitor.endswith("loss") else "max"
    early = EarlyStopping(monitor=monitor, mode=mode, patience=patience, restore_best_weights=True)
    checkpoint = Checkpoint(str(phase_dir / "best.weights.h5"), monitor=monitor, mode=mode,
                            save_best_only=True, save_weights_only=True)
    resume = read_backup_state(phase_dir / BACKUP_DIR) is not None
    return [
        seeding,
        early,
        checkpoint,
        keras.callbacks.CSVLogger(str(phase_dir / "history.csv"), append=resume),
        keras.callbacks.TensorBoard(str(log_dir), write_graph=False, profile_batch=0),
        # Last: it saves the state the callbacks above reached at the end of each epoch.
        Backup(phase_dir / BACKUP_DIR, early, checkpoint),
    ]


def compile_model(model, lr, n_outputs=1):
    if n_outputs == 1:
        metrics = [keras.metrics.Precision(name="precision"), keras.metrics.Recall(name="recall"),
                   keras.metrics.AUC(name="auc")]
        loss = "binary_crossentropy"
    else:
        # keras.metrics.AUC needs one-hot targets; with the sparse labels used here it fails
        # ("segment_ids and data should have same leading dimension"), so accuracy only.
        metrics = ["accuracy"]
        loss = "sparse_categorical_crossentropy"
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr), loss=loss, metrics=metrics)
    return model


def _class_weight(y, mode):
    if mode in (None, "none"):
        return None
    classes = np.unique(y)
    weights = compute_class_weight("balanced", classes=classes, y=y)
    return {int(c): float(w) for c, w in zip(classes, weights)}


def fit_part(model, x_train, y_train, x_val, y_val, epochs, batch_size, lr, phase_dir, log_dir,
             patience, seed, class_weight=None, verbose=1, monitor="val_auc"):
    """Fit a model (a head on cached features, or a partly unfrozen network) with the thesis'
    callbacks: validation AUC monitored, early stopping with the best weights restored,
    checkpoints, a CSV log, TensorBoard, and a backup that lets a killed run resume.

    A phase killed and run again ends with the same weights and history as one that was never
    interrupted: finished epochs are not redone, and the next ones shuffle, drop units and stop
    early exactly as they would have (:func:`epoch_seeding`, the backup's saved state).

    ``monitor`` is the validation metric that early stopping and the checkpoint follow (the
    thesis' ``val_auc`` by default; ``val_accuracy`` for the 24-class chromosome task; a name
    ending in ``loss`` is minimised, any other maximised)."""

    done = phase_dir / "done.weights.h5"
    if done.is_file():  # finished before a kill: keep its weights, do not train it again
        model.load_weights(done)
        shutil.rmtree(phase_dir / BACKUP_DIR, ignore_errors=True)
        return read_history(phase_dir / "history.csv")
    compile_model(model, lr, model.output_shape[-1])
    # The epoch the backup resumes at (its callback reads the same file when fit starts); a
    # phase that early stopping ended trains no further, and then the data is not read.
    state = read_backup_state(phase_dir / BACKUP_DIR)
    first = state["epoch"] if state and not state["stopped"] else 0
    seeding = epoch_seeding(seed, phase_dir.name, first)
    train_ds = make_dataset(x_train, y_train.astype("float32"), batch_size, shuffle=True,
                            seed=seeding.data_seed, first_epoch=first)
    val_ds = make_dataset(x_val, y_val.astype("float32"), batch_size)
    model.fit(train_ds, validation_data=val_ds, epochs=epochs, verbose=verbose, shuffle=False,
              steps_per_epoch=steps_per_epoch(len(x_train), batch_size),
              callbacks=phase_callbacks(phase_dir, log_dir, patience, seeding, monitor),
              class_weight=_class_weight(y_train, class_weight))
    with atomic_path(done) as tmp:
        model.save_weights(tmp)
    shutil.rmtree(phase_dir / BACKUP_DIR, ignore_errors=True)  # the phase is done: its backup is not needed
    return read_history(phase_dir / "history.csv")


def read_history(path):
    if not Path(path).is_file():
        return []
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    # A resumed run appends to its log: keep the last record of every epoch.
    by_epoch = {}
    for row in rows:
        by_epoch[int(row["epoch"])] = row
    return [by_epoch[k] for k in sorted(by_epoch)]


def write_history(path, history):
    """Write per-epoch rows (dicts) as ``history.csv``, with the ``epoch`` and ``phase`` columns first."""
    columns = ["epoch", "phase"]
    for row in history:
        columns += [k for k in row if k not in columns]
    write_csv(path, history, columns)
