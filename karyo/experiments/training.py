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

import functools
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import keras
import numpy as np

from karyo import __version__
from karyo.atomic import atomic_path, atomic_write_text
from karyo.data.augment import augment_rows, default_targets
from karyo.data.leakage import check_leakage
from karyo.data.manifest import check_run_data, KARYOGRAM_LABELS, read_manifest, sha256_file, write_manifest
from karyo.data.pipeline import label_indices, load_images
from karyo.data.splits import split_rows
from karyo.errors import KaryoError
from karyo.experiments.detection import train_detector
from karyo.experiments.fit import FitConfig, strategy_scope, strategy_summary, two_phase_fit, write_history
from karyo.experiments.pretrain import starting_weights
from karyo.experiments.runs import evaluate_run
from karyo.karyograms.layout import get_layout
from karyo.karyograms.pair_augment import augment_pairs
from karyo.models.backbones import get_backbone
from karyo.models.network import build_model
from karyo.models.saving import load_model
from karyo.models.features import default_cache_dir
from karyo.models.weights import weights_identity

CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.json"


def is_complete(run_dir):
    """True if ``run_dir`` holds a finished run (its ``metrics.json`` exists)."""
    return (Path(run_dir) / METRICS_NAME).is_file()


# ------------------------------------------------------------------------------- data


def _hash_text(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def manifest_layout(rows):
    """The karyogram layout of a manifest's rows: its ``layout`` column, ``standard`` without one.

    Raises:
        KaryoError: the rows mix layouts (per-pair augmentation must know where the slots are).
    """
    layouts = sorted({row.get("layout") or "standard" for row in rows})
    if len(layouts) > 1:
        raise KaryoError(f"the manifest mixes karyogram layouts ({', '.join(layouts)}): per-pair augmentation "
                         "needs one (render or assemble them with one --layout)")
    return get_layout(layouts[0] if layouts else "standard").name


def prepare_data(manifest, augmented, protocol, seed, data_dir, progress=True,
                 brightness=0.25, noise=0.05, blur=0.0, per_pair=False):
    """Split a manifest (and augment it, if asked) under one protocol.

    ``grouped``: split by group first, then augment the training part only; validation and
    test keep their original images. ``thesis``: augment every image first, then split per image
    (thesis sections 3.1.2 and 4.2), so copies of one karyogram land in several parts.

    The augmented images are written once into ``data_dir`` and reused by every experiment that
    asks for the same data (same source rows, protocol, seed and parameters). ``per_pair`` also
    moves each chromosome pair of every augmented copy inside its slot (thesis 5.3;
    :func:`karyo.karyograms.pair_augment.augment_pairs`).

    Returns:
        A :class:`Manifest` whose rows carry a ``split`` column (train / val / test).
    """

    rows = [dict(row) for row in manifest.rows]
    if not augmented:
        parts = split_rows(rows, protocol, seed)
        for row, part in zip(rows, parts):
            row["split"] = part
        return manifest.subset(rows)

    settings = [protocol, seed, brightness, noise, blur] + (["per_pair"] if per_pair else [])
    key = _hash_text(json.dumps(settings + [[(r["path"], r["label"], r["group"], r.get("sha256", ""))
                                             for r in rows]]))
    out = Path(data_dir) / f"augmented-{protocol}-seed{seed}-{key}"
    transform = functools.partial(augment_pairs, layout=manifest_layout(rows)) if per_pair else None
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
            new_rows = augment_rows(manifest, train, tmp, targets, brightness, noise, blur, seed, progress,
                                    transform)
            new_rows += augment_rows(manifest, rest, tmp, {}, brightness, noise, blur, seed, False)
        else:
            targets = default_targets(counts(rows))
            new_rows = augment_rows(manifest, rows, tmp, targets, brightness, noise, blur, seed, progress,
                                    transform)
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


# ------------------------------------------------------------------------------ training


def _member_dir(run_dir, member, ensemble):
    return run_dir if ensemble == 1 else run_dir / f"member{member}"


def train_model(experiment, images, labels, run_dir, seed, cache_dir, weights_arg, weights_used,
                class_weight=None, verbose=1, strategy=None):
    """Train one network of an experiment with the thesis' two-phase fit; return ``(model, history_rows)``.

    With a ``strategy`` (``karyo.experiments.fit.distribution_strategy``) the model is built,
    compiled and trained in its scope."""
    keras.utils.set_random_seed(seed)
    config = FitConfig(epochs=experiment.epochs, batch_size=experiment.batch_size, lr=experiment.lr,
                       unfreeze=experiment.unfreeze, fine_tune_epochs=experiment.fine_tune_epochs,
                       fine_tune_lr=experiment.fine_tune_lr, patience=experiment.patience, seed=seed,
                       class_weight=class_weight, verbose=verbose, progress=verbose > 0)
    cache_key = [experiment.backbone, weights_identity(weights_used, weights_arg, seed), experiment.image_size]
    with strategy_scope(strategy):
        model = build_model(experiment.backbone, experiment.image_size, weights=weights_arg,
                            dense_units=experiment.dense_units, dropout=experiment.dropout, seed=seed)
        return model, two_phase_fit(model, images, labels, config, run_dir, cache_dir, cache_key)


def print_warning(text):
    """Print one ``karyo: warning: ...`` line on standard error (the default ``warn`` of a run)."""
    print(f"karyo: warning: {text}", file=sys.stderr)


def train_experiment(experiment, data, out, protocol="grouped", seed=0, resume=False, root=None,
                     cache_dir=None, data_dir=None, class_weight=None, verbose=1, progress=True,
                     warn=print_warning, strategy=None):
    """Train ``experiment`` on the manifest ``data`` and evaluate it; return the run folder.

    Args:
        experiment: an :class:`karyo.experiments.registry.Experiment` (``get_experiment(name, ...)``).
        data: manifest CSV path (labels normal / abnormal; ``group`` = case).
        out: the run folder to create.
        protocol: ``grouped`` (leakage-free, the default) or ``thesis`` (as published).
        seed: seeds the split, the augmentation, the initial weights and dropout.
        resume: continue a killed run in ``out`` (finished phases and epochs are kept).
        root: folder the manifest's paths are relative to (default: the manifest's).
        cache_dir: backbone feature cache (default :func:`default_cache_dir`).
        data_dir: where augmented data is written (default ``out/data``).
        class_weight: ``None`` or ``"balanced"`` (scikit-learn's inverse class frequency).
        warn: called with the text of each warning (the thesis protocol's leakage, ``auto``
            weights falling back to none); ``karyo reproduce`` collects them to print each once.
        strategy: a ``tf.distribute`` strategy (``karyo.experiments.fit.distribution_strategy``)
            to train in; ``None``: the default device.

    Raises:
        KaryoError: the run folder exists without ``resume``, the data is unusable, or the
            ImageNet weights cannot be obtained.
    """

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise KaryoError(f"{out}: exists and is not a folder; choose another --out")
    if out.exists() and any(out.iterdir()) and not resume:
        raise KaryoError(f"{out}: the run folder exists; pass --resume to continue it or choose another --out")
    if resume and is_complete(out):
        return out
    if experiment.kind == "detector":  # it checks its data itself before writing anything
        if protocol != "grouped":
            raise KaryoError(f"{experiment.name} is trained under the grouped protocol only, not '{protocol}'")

        def train():
            return train_detector(experiment, data, out, seed=seed, root=root, progress=progress)
    else:
        backbone = get_backbone(experiment.backbone)
        if experiment.image_size < backbone.min_size:
            raise KaryoError(f"--image-size {experiment.image_size} is below {backbone.name}'s minimum "
                             f"of {backbone.min_size} pixels")
        # Validate first, then write: every row is checked (labels, both classes, files, sha256,
        # decoding) and the split is drawn before the run folder exists.
        manifest = check_run_data(data, (protocol,), seed, experiment.augmented, root, progress=progress)

        def train():
            return _train_run(experiment, data, out, manifest, protocol, seed, cache_dir, data_dir, class_weight,
                              verbose, progress, warn, strategy)
    created = not out.exists()
    try:
        return train()
    except KaryoError:
        # A run that failed on its input leaves nothing behind (a killed one keeps its files to resume).
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _train_run(experiment, data, out, manifest, protocol, seed, cache_dir, data_dir, class_weight, verbose,
               progress, warn, strategy):

    out.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    weights_arg, weights_used, weights_note = starting_weights(experiment.weights, experiment.backbone,
                                                               experiment.image_size)
    if str(experiment.weights).lower() == "auto" and weights_used != "imagenet":
        warn(weights_note)

    started = time.time()
    prepared = prepare_data(manifest, experiment.augmented, protocol, seed,
                            Path(data_dir) if data_dir else out / "data", progress, per_pair=experiment.per_pair)
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
        warn(leakage["warning"])
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
    if strategy is not None:
        config["distribute"] = strategy_summary(strategy)
    _write_json(out / CONFIG_NAME, config)

    members = []
    for m in range(experiment.ensemble):
        member_dir = _member_dir(out, m, experiment.ensemble)
        model_path = member_dir / "model.keras"
        if model_path.is_file() and (member_dir / "history.csv").is_file():

            model = load_model(model_path)
        else:
            model, history = train_model(experiment, images, labels, member_dir, seed + 1000 * m,
                                         cache_dir, weights_arg, weights_used, class_weight, verbose, strategy)
            with atomic_path(model_path) as tmp:
                model.save(tmp)
            write_history(member_dir / "history.csv", history)
        members.append(model)

    config["train_seconds"] = round(time.time() - started, 1)
    _write_json(out / CONFIG_NAME, config)
    evaluate_run(out, members=members, images=images, labels=labels, rows=parts,
                 passes=experiment.mc_passes, threshold=experiment.threshold, seed=seed)
    return out
