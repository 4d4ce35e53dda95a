"""Training an experiment end to end into a run folder.

``train_experiment`` follows the thesis' chapter 4: split the karyograms 64 / 16 / 20 %,
train the head on a frozen ImageNet backbone (Adam, learning rate 1e-3, batch size 16, binary
cross-entropy, metrics loss / precision / recall / AUC, validation AUC monitored), optionally
unfreeze the last backbone blocks and fine-tune, then evaluate the test split with 100 MC
Dropout passes. Two things differ from a naive implementation:

* the frozen part of the network runs once per image: its output is cached on disk and the
  trainable part trains on it (SPEC 6), with predictions identical to end-to-end training;
* the split protocol is explicit: ``grouped`` (split by group, then augment the training part
  only: no augmented copy of a test karyogram is ever trained on) or ``thesis`` (augment
  everything, then split per image, as published, which leaks copies across the split).

A run folder holds ``config.json``, ``split.csv``, ``history.csv``, ``model.keras``,
``predictions.csv``, ``metrics.json``, ``wrong_predictions.{csv,md}``, ``figures/*.png`` and
TensorBoard logs in ``logs/``. ``metrics.json`` is written last: its presence means the run is
complete, which is how ``--resume`` and ``karyo reproduce`` know to skip it.
"""

import csv
import functools
import hashlib
import json
import os
import platform
import shutil
import sys
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np

from karyo.atomic import atomic_path, atomic_write_text
from karyo.errors import KaryoError
from karyo.leakage import check_leakage
from karyo.manifest import KARYOGRAM_LABELS, read_manifest, sha256_file, write_manifest
from karyo.pipeline import label_indices, load_images
from karyo.splits import split_rows

CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.json"


def default_cache_dir():
    """Where backbone features are cached: ``$KARYO_CACHE`` or ``~/.cache/karyo``."""
    return Path(os.environ.get("KARYO_CACHE", Path.home() / ".cache" / "karyo"))


def is_complete(run_dir):
    """True if ``run_dir`` holds a finished run (its ``metrics.json`` exists)."""
    return (Path(run_dir) / METRICS_NAME).is_file()


# ------------------------------------------------------------------------------- data


def _hash_text(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def prepare_data(manifest, augmented, protocol, seed, data_dir, progress=True,
                 brightness=0.25, noise=0.05, blur=0.0):
    """Split a manifest (and augment it, if asked) under one protocol.

    ``grouped``: split by group first, then augment the training part only; validation and
    test keep their original images. ``thesis``: augment every image first, then split per image
    (thesis sections 3.1.2 and 4.2), so copies of one karyogram land in several parts.

    The augmented images are written once into ``data_dir`` and reused by every experiment that
    asks for the same data (same source rows, protocol, seed and parameters).

    Returns:
        A :class:`Manifest` whose rows carry a ``split`` column (train / val / test).
    """
    from karyo.augment import augment_rows, default_targets

    rows = [dict(row) for row in manifest.rows]
    if not augmented:
        parts = split_rows(rows, protocol, seed)
        for row, part in zip(rows, parts):
            row["split"] = part
        return manifest.subset(rows)

    key = _hash_text(json.dumps([protocol, seed, brightness, noise, blur,
                                 [(r["path"], r["label"], r["group"], r.get("sha256", "")) for r in rows]]))
    out = Path(data_dir) / f"augmented-{protocol}-seed{seed}-{key}"
    prepared = out / "manifest.csv"
    if prepared.is_file():
        return read_manifest(prepared)

    def counts(subset):
        return dict(Counter(row["label"] for row in subset))

    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        if protocol == "grouped":
            parts = split_rows(rows, "grouped", seed)
            for row, part in zip(rows, parts):
                row["split"] = part
            train = [r for r in rows if r["split"] == "train"]
            rest = [r for r in rows if r["split"] != "train"]
            targets = default_targets(counts(train))
            new_rows = augment_rows(manifest, train, tmp, targets, brightness, noise, blur, seed, progress)
            new_rows += augment_rows(manifest, rest, tmp, {}, brightness, noise, blur, seed, False)
        else:
            targets = default_targets(counts(rows))
            new_rows = augment_rows(manifest, rows, tmp, targets, brightness, noise, blur, seed, progress)
            parts = split_rows(new_rows, "thesis", seed)
            for row, part in zip(new_rows, parts):
                row["split"] = part
        write_manifest(tmp / "manifest.csv", new_rows)
    except BaseException:
        # A failed preparation leaves no half-written folder behind (a killed one is removed on the rerun).
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return read_manifest(prepared)


# ------------------------------------------------------------------------------ config


def environment():
    """Versions of what produced a run (recorded in its config)."""
    import keras
    import sklearn
    import tensorflow as tf

    from karyo import __version__

    return {
        "karyo": __version__, "tensorflow": tf.__version__, "keras": keras.__version__,
        "scikit-learn": sklearn.__version__, "numpy": np.__version__,
        "python": platform.python_version(), "machine": platform.machine(),
        "cpus": os.cpu_count(),
        # oneDNN changes the last bits of every convolution, and training amplifies them.
        "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "unset (on)"),
    }


def _write_json(path, data):
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path):
    return json.loads(Path(path).read_text())


# ------------------------------------------------------------------------------ fitting

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
    import keras

    class EpochSeeding(keras.callbacks.Callback):
        """Makes each epoch's dropout masks a function of (seed, epoch) alone, and checks that
        the training data is at the same epoch as Keras.

        When Keras starts epoch e this rewinds every seed generator of the model (the dropout
        masks) to a state drawn from (seed, stream, e, its index), and it checks that e is the
        epoch the dataset of :func:`karyo.pipeline.make_dataset` (``first_epoch``) is at, whose
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


def _callbacks(phase_dir, log_dir, patience, seeding, monitor="val_auc"):
    """The thesis' callbacks for one phase, resumable to the same result, after ``seeding``
    (the phase's :func:`epoch_seeding`)."""
    import keras

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


def _compile(model, lr, n_outputs=1):
    import keras

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
    from sklearn.utils.class_weight import compute_class_weight

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
    from karyo.pipeline import make_dataset, steps_per_epoch

    done = phase_dir / "done.weights.h5"
    if done.is_file():  # finished before a kill: keep its weights, do not train it again
        model.load_weights(done)
        shutil.rmtree(phase_dir / BACKUP_DIR, ignore_errors=True)
        return _read_history(phase_dir / "history.csv")
    _compile(model, lr, model.output_shape[-1])
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
              callbacks=_callbacks(phase_dir, log_dir, patience, seeding, monitor),
              class_weight=_class_weight(y_train, class_weight))
    with atomic_path(done) as tmp:
        model.save_weights(tmp)
    shutil.rmtree(phase_dir / BACKUP_DIR, ignore_errors=True)  # the phase is done: its backup is not needed
    return _read_history(phase_dir / "history.csv")


def _read_history(path):
    if not Path(path).is_file():
        return []
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    # A resumed run appends to its log: keep the last record of every epoch.
    by_epoch = {}
    for row in rows:
        by_epoch[int(row["epoch"])] = row
    return [by_epoch[k] for k in sorted(by_epoch)]


# ------------------------------------------------------------------------------ training


def _member_dir(run_dir, member, ensemble):
    return run_dir if ensemble == 1 else run_dir / f"member{member}"


def train_model(experiment, images, labels, run_dir, seed, cache_dir, weights_arg, weights_used,
                class_weight=None, verbose=1):
    """Train one network of an experiment; return ``(model, history_rows)``.

    Phase ``head``: the backbone is frozen; its pooled features are computed once (cached on
    disk) and only the head trains on them. Phase ``fine_tune`` (``experiment.unfreeze`` > 0):
    the last blocks are unfrozen (BatchNormalization stays frozen), the output of the still
    frozen part is cached, and the rest trains with ``experiment.fine_tune_lr``.
    """
    import keras

    from karyo.backbones import weights_identity
    from karyo.features import cached_features
    from karyo.models import build_model, split_model
    from karyo.unfreeze import unfreeze_blocks

    x_train, x_val = images["train"], images["val"]
    y_train, y_val = labels["train"], labels["val"]
    keras.utils.set_random_seed(seed)
    model = build_model(experiment.backbone, experiment.image_size, weights=weights_arg,
                        dense_units=experiment.dense_units, dropout=experiment.dropout, seed=seed)
    log_dir = run_dir / "logs"
    cache_key = [experiment.backbone, weights_identity(weights_used, weights_arg, seed),
                 experiment.image_size]

    frozen, head = split_model(model, 0)
    f_train = cached_features(frozen, x_train, cache_key + ["pooled"], cache_dir, progress=verbose > 0)
    f_val = cached_features(frozen, x_val, cache_key + ["pooled"], cache_dir, progress=verbose > 0)
    history = [dict(r, phase="head") for r in fit_part(
        head, f_train, y_train, f_val, y_val, experiment.epochs, experiment.batch_size,
        experiment.lr, run_dir / "phase-head", log_dir / "head", experiment.patience, seed,
        class_weight, verbose)]

    if experiment.unfreeze not in (0, "0", None) and experiment.fine_tune_epochs > 0:
        unfreeze_blocks(model, experiment.unfreeze)
        frozen, rest = split_model(model, experiment.unfreeze)
        if frozen is None:  # nothing left frozen: the whole network trains on the images
            t_train, t_val, trainable = x_train.astype("float32"), x_val.astype("float32"), model
        else:
            key = cache_key + [f"unfreeze{experiment.unfreeze}"]
            t_train = cached_features(frozen, x_train, key, cache_dir, progress=verbose > 0)
            t_val = cached_features(frozen, x_val, key, cache_dir, progress=verbose > 0)
            trainable = rest
        offset = len(history)
        fine = fit_part(trainable, t_train, y_train, t_val, y_val, experiment.fine_tune_epochs,
                        experiment.batch_size, experiment.fine_tune_lr, run_dir / "phase-fine_tune",
                        log_dir / "fine_tune", experiment.patience, seed, class_weight, verbose)
        history += [dict(r, phase="fine_tune", epoch=str(int(r["epoch"]) + offset)) for r in fine]
    return model, history


def _write_history(path, history):
    columns = ["epoch", "phase"]
    for row in history:
        columns += [k for k in row if k not in columns]
    lines = [",".join(columns)]
    for row in history:
        lines.append(",".join(str(row.get(c, "")) for c in columns))
    atomic_write_text(path, "\n".join(lines) + "\n")


def train_experiment(experiment, data, out, protocol="grouped", seed=0, resume=False, root=None,
                     cache_dir=None, data_dir=None, class_weight=None, verbose=1, progress=True):
    """Train ``experiment`` on the manifest ``data`` and evaluate it; return the run folder.

    Args:
        experiment: an :class:`karyo.experiments.Experiment` (``get_experiment(name, ...)``).
        data: manifest CSV path (labels normal / abnormal; ``group`` = case).
        out: the run folder to create.
        protocol: ``grouped`` (leakage-free, the default) or ``thesis`` (as published).
        seed: seeds the split, the augmentation, the initial weights and dropout.
        resume: continue a killed run in ``out`` (finished phases and epochs are kept).
        root: folder the manifest's paths are relative to (default: the manifest's).
        cache_dir: backbone feature cache (default :func:`default_cache_dir`).
        data_dir: where augmented data is written (default ``out/data``).
        class_weight: ``None`` or ``"balanced"`` (scikit-learn's inverse class frequency).

    Raises:
        KaryoError: the run folder exists without ``resume``, the data is unusable, or the
            ImageNet weights cannot be obtained.
    """
    from karyo.backbones import get_backbone
    from karyo.manifest import check_manifest

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise KaryoError(f"{out}: exists and is not a folder; choose another --out")
    if out.exists() and any(out.iterdir()) and not resume:
        raise KaryoError(f"{out}: the run folder exists; pass --resume to continue it or choose another --out")
    if resume and is_complete(out):
        return out
    backbone = get_backbone(experiment.backbone)
    if experiment.image_size < backbone.min_size:
        raise KaryoError(f"--image-size {experiment.image_size} is below {backbone.name}'s minimum "
                         f"of {backbone.min_size} pixels")
    # Validate first, then write: every row is checked (labels, both classes, files, sha256,
    # decoding) and the split is drawn before the run folder exists.
    manifest = check_manifest(read_manifest(data, root), KARYOGRAM_LABELS, progress=progress)
    if protocol == "grouped" or not experiment.augmented:
        split_rows(manifest.rows, protocol, seed)  # a class with too few groups fails here
    created = not out.exists()
    try:
        return _train_run(experiment, data, out, manifest, protocol, seed, cache_dir, data_dir, class_weight,
                          verbose, progress)
    except KaryoError:
        # A run that failed on its input leaves nothing behind (a killed one keeps its files to resume).
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _train_run(experiment, data, out, manifest, protocol, seed, cache_dir, data_dir, class_weight, verbose,
               progress):
    from karyo.backbones import resolve_weights
    from karyo.runs import evaluate_run

    out.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    weights_arg, weights_used, weights_note = resolve_weights(
        experiment.weights, experiment.backbone, image_size=experiment.image_size)

    started = time.time()
    prepared = prepare_data(manifest, experiment.augmented, protocol, seed,
                            Path(data_dir) if data_dir else out / "data", progress)
    for row in prepared.rows:  # split.csv records the sha256 of every image the run reads
        row["sha256"] = row.get("sha256") or sha256_file(prepared.resolve(row))
    write_manifest(out / "split.csv", prepared.rows)
    parts = {p: [r for r in prepared.rows if r["split"] == p] for p in ("train", "val", "test")}
    for part, members in parts.items():
        if not members:
            raise KaryoError(f"{data}: the {part} split is empty (too few karyograms)")
    # Near-identical images in two parts: an error under grouped, counted under thesis.
    leakage = check_leakage(prepared, protocol, progress=progress)
    if leakage["warning"]:
        print(f"karyo: warning: {leakage['warning']}", file=sys.stderr)
    images = {p: load_images(prepared, rows, experiment.image_size, progress, p) for p, rows in parts.items()}
    labels = {p: label_indices(rows, KARYOGRAM_LABELS) for p, rows in parts.items()}

    config = {
        "experiment": experiment.to_dict(),
        "data": {"manifest": str(Path(data).resolve()), "sha256": sha256_file(data),
                 "root": str(manifest.root.resolve()), "protocol": protocol,
                 "split_root": str(prepared.root.resolve()), "split_sha256": sha256_file(out / "split.csv"),
                 "counts": {p: {lab: int((labels[p] == i).sum()) for i, lab in enumerate(KARYOGRAM_LABELS)}
                            for p in parts},
                 "leakage": leakage},
        "seed": seed, "weights_requested": experiment.weights, "weights_used": weights_used,
        "weights_note": weights_note, "class_weight": class_weight,
        "environment": environment(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    _write_json(out / CONFIG_NAME, config)

    members = []
    for m in range(experiment.ensemble):
        member_dir = _member_dir(out, m, experiment.ensemble)
        model_path = member_dir / "model.keras"
        if model_path.is_file() and (member_dir / "history.csv").is_file():
            from karyo.models import load_model

            model = load_model(model_path)
        else:
            model, history = train_model(experiment, images, labels, member_dir, seed + 1000 * m,
                                         cache_dir, weights_arg, weights_used, class_weight, verbose)
            with atomic_path(model_path) as tmp:
                model.save(tmp)
            _write_history(member_dir / "history.csv", history)
        members.append(model)

    config["train_seconds"] = round(time.time() - started, 1)
    _write_json(out / CONFIG_NAME, config)
    evaluate_run(out, members=members, images=images, labels=labels, rows=parts,
                 passes=experiment.mc_passes, threshold=experiment.threshold, seed=seed)
    return out
