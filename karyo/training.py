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
import hashlib
import json
import os
import platform
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np

from karyo.atomic import atomic_path, atomic_write_text
from karyo.errors import KaryoError
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
    }


def _write_json(path, data):
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path):
    return json.loads(Path(path).read_text())


# ------------------------------------------------------------------------------ fitting


def _callbacks(phase_dir, log_dir, patience, resume, monitor="val_auc"):
    import keras

    phase_dir.mkdir(parents=True, exist_ok=True)
    mode = "min" if monitor.endswith("loss") else "max"
    callbacks = [
        # double_checkpoint: a kill while the backup is being written leaves the previous one usable.
        keras.callbacks.BackupAndRestore(str(phase_dir / "backup"), double_checkpoint=True),
        keras.callbacks.EarlyStopping(monitor=monitor, mode=mode, patience=patience,
                                      restore_best_weights=True),
        keras.callbacks.ModelCheckpoint(str(phase_dir / "best.weights.h5"), monitor=monitor,
                                        mode=mode, save_best_only=True, save_weights_only=True),
        keras.callbacks.CSVLogger(str(phase_dir / "history.csv"), append=resume),
        keras.callbacks.TensorBoard(str(log_dir), write_graph=False, profile_batch=0),
    ]
    return callbacks


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

    ``monitor`` is the validation metric that early stopping and the checkpoint follow (the
    thesis' ``val_auc`` by default; ``val_accuracy`` for the 24-class chromosome task; a name
    ending in ``loss`` is minimised, any other maximised)."""
    from karyo.pipeline import make_dataset

    done = phase_dir / "done.weights.h5"
    if done.is_file():  # finished before a kill: keep its weights, do not train it again
        model.load_weights(done)
        return _read_history(phase_dir / "history.csv")
    _compile(model, lr, model.output_shape[-1])
    train_ds = make_dataset(x_train, y_train.astype("float32"), batch_size, shuffle=True, seed=seed)
    val_ds = make_dataset(x_val, y_val.astype("float32"), batch_size)
    resume = (phase_dir / "backup").exists()
    model.fit(train_ds, validation_data=val_ds, epochs=epochs, verbose=verbose, shuffle=False,
              callbacks=_callbacks(phase_dir, log_dir, patience, resume, monitor),
              class_weight=_class_weight(y_train, class_weight))
    with atomic_path(done) as tmp:
        model.save_weights(tmp)
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

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not resume:
        raise KaryoError(f"{out}: the run folder exists; pass --resume to continue it or choose another --out")
    if resume and is_complete(out):
        return out
    backbone = get_backbone(experiment.backbone)
    if experiment.image_size < backbone.min_size:
        raise KaryoError(f"--image-size {experiment.image_size} is below {backbone.name}'s minimum "
                         f"of {backbone.min_size} pixels")
    manifest = read_manifest(data, root)
    unknown = sorted({r["label"] for r in manifest.rows} - set(KARYOGRAM_LABELS))
    if unknown:
        raise KaryoError(f"{data}: unknown label '{unknown[0]}' (the karyogram task uses normal and abnormal)")
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
    weights_arg, weights_used, weights_note = resolve_weights(experiment.weights, experiment.backbone)

    started = time.time()
    prepared = prepare_data(manifest, experiment.augmented, protocol, seed,
                            Path(data_dir) if data_dir else out / "data", progress)
    write_manifest(out / "split.csv", prepared.rows)
    parts = {p: [r for r in prepared.rows if r["split"] == p] for p in ("train", "val", "test")}
    for part, members in parts.items():
        if not members:
            raise KaryoError(f"{data}: the {part} split is empty (too few karyograms)")
    images = {p: load_images(prepared, rows, experiment.image_size, progress, p) for p, rows in parts.items()}
    labels = {p: label_indices(rows, KARYOGRAM_LABELS) for p, rows in parts.items()}

    config = {
        "experiment": experiment.to_dict(),
        "data": {"manifest": str(Path(data).resolve()), "sha256": sha256_file(data),
                 "root": str(manifest.root.resolve()), "protocol": protocol,
                 "split_root": str(prepared.root.resolve()),
                 "counts": {p: {lab: int((labels[p] == i).sum()) for i, lab in enumerate(KARYOGRAM_LABELS)}
                            for p in parts}},
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
            import keras

            model = keras.saving.load_model(model_path, safe_mode=True)
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
