"""Chromosome-pretrained backbones: the 24-class single-chromosome task, so karyo learns offline.

Without ImageNet weights a karyogram model starts from random features and learns nothing from
a few hundred karyograms. :func:`pretrain` trains a registered backbone from a random
initialisation, end to end with a small softmax head, to classify single chromosomes (``1`` ..
``22``, ``X``, ``Y``): synthetic ones from :mod:`karyo.karyograms.chromosome_synth` (always available) and,
when given, real crops from ``karyo data chromosomes`` manifests. Both are drawn at the scale the
chromosomes have in a karyogram of ``karyogram_size`` pixels and centred on a crop of the
backbone's input size, so the learnt filters fire on karyogram pixels. The backbone's weights are
then the starting point of the karyogram task (``--weights out/backbone.weights.h5``, or
``--weights chromosome`` for the cached ones of :func:`chromosome_weights`).

An output folder holds ``backbone.weights.h5`` (the backbone alone, float32), ``model.keras`` (the
whole classifier, for :func:`score_chromosomes`), ``card.json`` (what
was trained on what, how long, and the held-out accuracy, Macro-F1 and per-class F1),
``predictions.csv`` (the held-out crops, from which the card's numbers can be recomputed),
``history.csv`` and ``figures/confusion_matrix.png`` / ``figures/training_curves.png``. The folder
appears whole or not at all; a killed run resumes from its last finished epoch (Keras'
``BackupAndRestore`` in a hidden folder beside it).

TensorFlow is imported inside the functions that train, so importing this module stays cheap.
"""

import hashlib
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np

from karyo import __version__
from karyo.atomic import atomic_dir, atomic_path, write_csv
from karyo.data.manifest import check_manifest, CHROMOSOME_LABELS, read_manifest, sha256_file, write_manifest
from karyo.errors import KaryoError
from karyo.experiments import figures
from karyo.karyograms.assemble import load_crop, trim, upright
from karyo.karyograms.chromosome_synth import default_crop_size, STAIN_CHOICES, synthetic_chromosomes
from karyo.karyograms.layout import background_level, BLACK, fit_scale, MIN_SIZE, WHITE
from karyo.models.backbones import check_image_size, get_backbone
from karyo.models.layers import Preprocess
from karyo.models.network import build_backbone
from karyo.data.splits import split_by_case
from karyo.models.features import default_cache_dir
from karyo.models.saving import load_model
from karyo.models.weights import resolve_weights
from karyo.uncertainty.metrics import chromosome_metrics

#: Defaults of the cached pretraining (:func:`chromosome_weights`): a few minutes per backbone
#: on two CPU cores.
DEFAULT_EPOCHS = 6
DEFAULT_N_SYNTHETIC = 2400
DEFAULT_BATCH_SIZE = 32
DEFAULT_LR = 3e-4
#: Share of the synthetic crops drawn (from other cells) for the held-out set.
HELD_OUT_SHARE = 0.2
#: ``predictions.csv`` columns.
PREDICTION_COLUMNS = ("source", "path", "group", "label", "pred_label", "prob")
PRECISIONS = ("float32", "mixed_bfloat16")
#: bf16 convolutions: 52 vs 24-34 img/s for VGG16 at 40 px on this CPU (avx512_bf16), same held-out
#: accuracy at chance-level budgets; the variables, softmax and loss stay float32 (docs/pretraining.md).
DEFAULT_PRECISION = "mixed_bfloat16"


def build_classifier(backbone, image_size, seed=0, precision=DEFAULT_PRECISION, sample=None):
    """A randomly initialised backbone with a 24-way softmax head, every layer trainable.

    ``image (0..255) -> Preprocess -> backbone -> GlobalAveragePooling2D -> Dropout(0.3) ->
    Dense(24, softmax)``. Under ``mixed_bfloat16`` the convolutions compute in bfloat16 while the
    variables, the softmax and the loss stay in float32.

    Args:
        sample: a few training images (uint8 or 0..255 floats): with them the backbone is
            initialised by :func:`he_initialise` instead of Keras' default.

    Returns:
        ``(model, base)``: the classifier and its backbone (named ``backbone``).
    """
    import keras

    if precision not in PRECISIONS:
        raise KaryoError(f"unknown precision '{precision}' (choose {', '.join(PRECISIONS)})")
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)
    try:
        base = build_backbone(backbone, image_size, "none", seed=seed)
        if sample is not None:
            he_initialise(base, get_backbone(backbone).preprocess_input()(np.array(sample, np.float32)), seed)
        inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
        x = Preprocess(get_backbone(backbone).name, name="preprocess")(inputs)
        x = keras.layers.GlobalAveragePooling2D(name="pool")(base(x))
        x = keras.layers.Dropout(0.3, seed=seed, name="dropout")(x)
        outputs = keras.layers.Dense(len(CHROMOSOME_LABELS), activation="softmax", dtype="float32",
                                     name="chromosome_class")(x)
    finally:
        keras.config.set_dtype_policy(previous)
    return keras.Model(inputs, outputs, name=f"chromosomes_{get_backbone(backbone).name}"), base


def he_initialise(base, sample, seed=0):
    """Redraw the convolution kernels (He-normal), then scale each to unit output variance.

    Keras' default Glorot initialisation halves the signal's variance at each ReLU layer: after
    VGG16's 13 convolutions without BatchNormalization nothing is left, and training from scratch
    stalls at chance (measured: loss stuck at ln 24). He initialisation keeps the variance but
    not its scale: "caffe" inputs span +-128, and the first epoch's loss exploded to ~50. So
    each kernel is rescaled in turn until its layer's output on ``sample`` (preprocessed images)
    has unit standard deviation (Mishkin and Matas' layer-sequential unit-variance init).
    """
    import keras

    for i, layer in enumerate(base.layers):
        kernel = getattr(layer, "kernel", None)
        if kernel is None or len(kernel.shape) != 4:
            continue
        init = keras.initializers.HeNormal(seed=int(seed) * 1000 + i)
        kernel.assign(init(kernel.shape, dtype=kernel.dtype))
        if getattr(layer, "bias", None) is not None:
            layer.bias.assign(np.zeros(layer.bias.shape, np.float32))
        probe = keras.Model(base.inputs[0], layer.output)
        std = float(np.std(keras.ops.convert_to_numpy(probe(sample, training=False))))
        if std > 1e-8:
            kernel.assign(kernel * (1.0 / std))


def cell_scale(crops, karyogram_size):
    """The scale ``karyo data assemble`` would give a cell's crops in a ``karyogram_size`` karyogram.

    Args:
        crops: ``{slot: [trimmed upright gray crop, ...]}`` of one cell.
    """
    return fit_scale({s: [c.shape for c in cs] for s, cs in crops.items() if cs}, karyogram_size)


def present(crop, scale, crop_size, background):
    """Resize a real crop by ``scale`` and centre it on a ``crop_size`` square of ``background``."""
    import cv2

    h, w = crop.shape
    f = min(scale, crop_size / max(h, w))  # a crop taller than the square is shrunk to fit
    nh, nw = max(1, int(h * f + 1e-6)), max(1, int(w * f + 1e-6))
    if (nh, nw) != (h, w):
        crop = cv2.resize(crop, (nw, nh), interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR)
    canvas = np.full((crop_size, crop_size), int(background), np.uint8)
    top, left = (crop_size - nh) // 2, (crop_size - nw) // 2
    canvas[top:top + nh, left:left + nw] = crop
    return canvas


def real_chromosomes(manifest, crop_size, karyogram_size, exclude_groups=(), root=None, progress=True):
    """Real crops of a chromosome manifest, each at its cell's karyogram scale.

    Each cell's crops are trimmed and stood upright as ``karyo data assemble`` does, scaled by
    the one factor that fits the cell into a ``karyogram_size`` karyogram, and centred on a
    ``crop_size`` square. (A manifest written with ``--size`` has squared, resized crops: their
    scale is no longer the cell's, so give one written without it.)

    Returns:
        ``(images uint8 (n, s, s, 3), labels int (n,), rows)`` with the manifest rows kept.

    Raises:
        KaryoError: unknown labels, missing files or sha256 mismatches (named by file).
    """
    data = check_manifest(read_manifest(manifest, root), CHROMOSOME_LABELS, every_class=False,
                          progress=False)
    excluded = {str(g) for g in exclude_groups}
    rows = [dict(r) for r in data.rows if r["group"] not in excluded]
    by_cell = {}
    for row in rows:
        by_cell.setdefault(row.get("cell") or row["group"], []).append(row)
    iterator = by_cell.items()
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, total=len(by_cell), desc="real chromosomes", unit="cell")
    images, labels, kept = [], [], []
    for _, members in iterator:
        raw = [load_crop(data.resolve(r)) for r in members]
        background = WHITE if np.median([background_level(c) for c in raw]) >= 128 else BLACK
        crops = [upright(trim(c, background), background) for c in raw]
        slots = {}
        for row, crop in zip(members, crops):
            slots.setdefault(row["label"], []).append(crop)
        scale = cell_scale(slots, karyogram_size)
        for row, crop in zip(members, crops):
            images.append(present(crop, scale, crop_size, background))
            labels.append(CHROMOSOME_LABELS.index(row["label"]))
            kept.append(row)
    if not images:
        raise KaryoError(f"{manifest}: no chromosomes left after excluding {len(excluded)} case(s)")
    x = np.repeat(np.stack(images)[:, :, :, None], 3, axis=3)
    return x, np.asarray(labels, np.int64), kept


def _progress_callback(epochs, enabled):
    import keras

    class EpochBar(keras.callbacks.Callback):
        """One tqdm bar over the epochs, with the latest loss and accuracy."""

        def on_train_begin(self, logs=None):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=epochs, desc="pretrain", unit="epoch", disable=not enabled)

        def on_epoch_end(self, epoch, logs=None):
            self.bar.n = epoch + 1
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in (logs or {}).items()
                                  if k in ("loss", "accuracy", "val_accuracy")})
            self.bar.refresh()

        def on_train_end(self, logs=None):
            self.bar.close()

    return EpochBar()


class _EpochTimer:
    """Seconds and images/s of each epoch (a Keras callback built lazily)."""

    @staticmethod
    def make(n_images):
        import keras

        class EpochTimer(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                self.seconds = []

            def on_epoch_begin(self, epoch, logs=None):
                self.started = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                self.seconds.append(time.perf_counter() - self.started)
                if logs is not None:
                    logs["seconds"] = self.seconds[-1]
                    logs["images_per_second"] = n_images / self.seconds[-1]

        return EpochTimer()


def _training_curves(history, out, title):
    """Loss and accuracy per epoch, train vs validation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = np.arange(1, len(history["loss"]) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(8.8, 3.6))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        ax.plot(epochs, history[metric], marker="o", markersize=3, label="train")
        if f"val_{metric}" in history:
            ax.plot(epochs, history[f"val_{metric}"], marker="o", markersize=3, label="held-out")
        ax.set_title(metric.capitalize())
        ax.set_xlabel("Epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return out


def pretrain(backbone, out, image_size=None, karyogram_size=64, epochs=DEFAULT_EPOCHS, data=None,
             n_synthetic=DEFAULT_N_SYNTHETIC, seed=0, progress=True, stain="both",
             batch_size=DEFAULT_BATCH_SIZE, lr=DEFAULT_LR, exclude_groups=(), root=None,
             precision=DEFAULT_PRECISION, verbose=0):
    """Train ``backbone`` from random weights on the 24-class chromosome task; write ``out/``.

    Args:
        backbone: a registered backbone name.
        out: folder to create (replaced atomically when the run finishes).
        image_size: crop side = the backbone's input size (default: the smallest that holds a
            chromosome 1 at ``karyogram_size``, at least the backbone's minimum).
        karyogram_size: side of the karyograms the weights are meant for; sets the drawing scale.
        epochs: passes over the training crops.
        data: chromosome manifests (``karyo data chromosomes``, best without ``--size``); they are
            split by case, their train cases added to the synthetic crops, their test cases
            held out.
        n_synthetic: synthetic training crops (0 for real crops only); a fifth as many more,
            from other cells, are held out.
        seed: seeds the crops, the split, the initial weights and dropout.
        stain: ``g``, ``q`` or ``both`` for the synthetic crops.
        batch_size, lr: Adam's.
        exclude_groups: cases of the manifests to leave out entirely (a karyogram task's
            validation and test cases when both come from the same patients).
        root: folder the manifests' paths are relative to.
        precision: ``float32`` or ``mixed_bfloat16``.

    Returns:
        ``out`` as a Path.

    Raises:
        KaryoError: bad backbone, sizes, stain, counts or manifests.
    """
    import keras

    bb = get_backbone(backbone)
    if image_size is None:
        image_size = default_crop_size(karyogram_size, bb.min_size)
    image_size = check_image_size(bb.name, image_size)
    if stain not in STAIN_CHOICES:
        raise KaryoError(f"unknown stain '{stain}' (choose {', '.join(STAIN_CHOICES)})")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise KaryoError(f"epochs must be a positive integer, not {epochs!r}")
    if isinstance(n_synthetic, bool) or not isinstance(n_synthetic, int) or n_synthetic < 0:
        raise KaryoError(f"n_synthetic must be a non-negative integer, not {n_synthetic!r}")
    manifests = [Path(m) for m in (data or [])]
    if n_synthetic == 0 and not manifests:
        raise KaryoError("nothing to pretrain on: n_synthetic is 0 and no --data manifest was given")
    out = Path(out)
    started = time.perf_counter()

    train_x, train_y, test_x, test_y, test_rows, sources = [], [], [], [], [], []
    if n_synthetic:
        x, y = synthetic_chromosomes(n_synthetic, image_size, karyogram_size, seed, stain)
        n_held = max(len(CHROMOSOME_LABELS), int(round(n_synthetic * HELD_OUT_SHARE)))
        # Other cells for the held-out crops: a different seed stream, never a copy.
        hx, hy = synthetic_chromosomes(n_held, image_size, karyogram_size, seed + 7919, stain)
        train_x.append(x)
        train_y.append(y)
        test_x.append(hx)
        test_y.append(hy)
        test_rows += [{"source": "synthetic", "path": f"synthetic:{seed + 7919}:{i}",
                       "group": f"synthetic-cell-{i // len(CHROMOSOME_LABELS)}"} for i in range(n_held)]
        sources.append({"source": "synthetic", "stain": stain, "seed": seed, "n_train": int(len(y)),
                        "n_held_out": int(n_held)})
    for manifest in manifests:
        x, y, rows = real_chromosomes(manifest, image_size, karyogram_size, exclude_groups, root, progress)
        parts = np.array(split_by_case(rows, seed))
        # Validation cases train too: the card reports the test cases, and pretraining has no
        # early stopping to feed.
        fit_part = parts != "test"
        train_x.append(x[fit_part])
        train_y.append(y[fit_part])
        test_x.append(x[~fit_part])
        test_y.append(y[~fit_part])
        test_rows += [{"source": str(manifest), "path": r["path"], "group": r["group"]}
                      for r, p in zip(rows, parts) if p == "test"]
        sources.append({"source": str(Path(manifest).resolve()), "sha256": sha256_file(manifest),
                        "n_train": int(fit_part.sum()), "n_held_out": int((~fit_part).sum()),
                        "cases_held_out": len({r["group"] for r, p in zip(rows, parts) if p == "test"}),
                        "excluded_cases": len({str(g) for g in exclude_groups})})
    x_train, y_train = np.concatenate(train_x), np.concatenate(train_y)
    x_test, y_test = np.concatenate(test_x), np.concatenate(test_y)
    data_seconds = time.perf_counter() - started

    keras.utils.set_random_seed(seed)
    model, base = build_classifier(bb.name, image_size, seed, precision,
                                   sample=x_train[np.random.default_rng(seed).permutation(len(x_train))[:64]])
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    backup = out.with_name(f".{out.name}.backup")
    timer = _EpochTimer.make(len(x_train))
    callbacks = [keras.callbacks.BackupAndRestore(str(backup)), timer, _progress_callback(epochs, progress)]
    history = model.fit(x_train.astype("float32"), y_train, batch_size=batch_size, epochs=epochs,
                        validation_data=(x_test.astype("float32"), y_test), shuffle=True,
                        callbacks=callbacks, verbose=verbose).history
    fit_seconds = float(sum(timer.seconds))
    probs = model.predict(x_test.astype("float32"), batch_size=256, verbose=0)
    pred = probs.argmax(axis=1)

    held_out = chromosome_metrics(y_test, pred)
    by_source = {}
    for name in sorted({r["source"] for r in test_rows}):
        mask = np.array([r["source"] == name for r in test_rows])
        by_source[name] = chromosome_metrics(y_test[mask], pred[mask])
    card = {
        "task": "chromosomes-24", "backbone": bb.name, "image_size": image_size,
        "karyogram_size": int(karyogram_size), "data": sources, "epochs": epochs,
        "batch_size": batch_size, "lr": lr, "seed": seed, "precision": precision,
        "seconds": round(time.perf_counter() - started, 1), "data_seconds": round(data_seconds, 1),
        "fit_seconds": round(fit_seconds, 1), "epoch_seconds": [round(s, 2) for s in timer.seconds],
        "images_per_second": round(len(x_train) * len(timer.seconds) / max(fit_seconds, 1e-9), 1),
        "n_train": int(len(y_train)), "accuracy": held_out["accuracy"], "macro_f1": held_out["macro_f1"],
        "per_class_f1": held_out["per_class_f1"], "n_held_out": held_out["n"],
        "held_out_by_source": by_source, "karyo_version": __version__,
        "weights": "backbone.weights.h5",
    }
    rows = [dict(r, label=CHROMOSOME_LABELS[t], pred_label=CHROMOSOME_LABELS[p], prob=f"{probs[i, p]:.6f}")
            for i, (r, t, p) in enumerate(zip(test_rows, y_test, pred))]
    with atomic_dir(out) as tmp:
        base.save_weights(str(tmp / "backbone.weights.h5"))
        model.save(str(tmp / "model.keras"))  # with its head, to score other crops (score_chromosomes)
        write_manifest(tmp / "predictions.csv", rows, list(PREDICTION_COLUMNS))
        keys = [k for k in history if k in ("loss", "accuracy", "val_loss", "val_accuracy", "seconds")]
        write_csv(tmp / "history.csv", [[e] + [f"{history[k][e]:.6g}" for k in keys]
                                        for e in range(len(history["loss"]))], ["epoch", *keys])
        (tmp / "figures").mkdir()
        figures.plot_confusion_matrix(y_test, pred, tmp / "figures" / "confusion_matrix.png",
                                      class_names=CHROMOSOME_LABELS,
                                      title=f"Held-out chromosomes, {bb.name} {image_size} px")
        _training_curves(history, tmp / "figures" / "training_curves.png",
                         f"Chromosome pretraining, {bb.name} {image_size} px (karyogram {karyogram_size} px)")
        (tmp / "card.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(backup, ignore_errors=True)
    return out


def score_chromosomes(pretrained, manifest, root=None, progress=True):
    """Score a pretraining run's classifier on every crop of a chromosome manifest.

    The crops are presented as in training: at their cell's scale in a karyogram of the run's
    ``karyogram_size``, centred on a crop of its ``image_size``.

    Returns:
        :func:`karyo.experiments.chromosomes.chromosome_metrics` of the manifest's crops.
    """

    pretrained = Path(pretrained)
    card = json.loads((pretrained / "card.json").read_text(encoding="utf-8"))
    model = load_model(pretrained / "model.keras")
    x, y, _ = real_chromosomes(manifest, card["image_size"], card["karyogram_size"], root=root,
                               progress=progress)
    pred = model.predict(x.astype("float32"), batch_size=256, verbose=0).argmax(axis=1)
    return chromosome_metrics(y, pred)


# ------------------------------------------------------------------------------ the cache


def pretrain_settings(backbone, image_size, karyogram_size=None):
    """The settings of the cached pretraining for a karyogram model of input side ``image_size``.

    Chromosomes are drawn at their scale in a karyogram of that side, but never below the
    renderer's smallest karyogram (``karyo.karyograms.layout.MIN_SIZE``): a model whose input is
    smaller (VGG16 at 32 px in the tests) starts from the weights for 64-px karyograms.
    """
    bb = get_backbone(backbone)
    karyogram_size = max(MIN_SIZE, int(image_size if karyogram_size is None else karyogram_size))
    return {"backbone": bb.name, "image_size": default_crop_size(karyogram_size, bb.min_size),
            "karyogram_size": karyogram_size, "epochs": DEFAULT_EPOCHS,
            "n_synthetic": DEFAULT_N_SYNTHETIC, "seed": 0, "stain": "both",
            "batch_size": DEFAULT_BATCH_SIZE, "lr": DEFAULT_LR, "precision": DEFAULT_PRECISION,
            "karyo_version": __version__}


def settings_key(settings):
    """Content hash of the settings (16 hex digits): the cache folder's name."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def pretrained_dir(backbone, image_size, karyogram_size=None, cache_dir=None):
    """``$KARYO_CACHE/pretrained/<key>/``: where :func:`chromosome_weights` keeps its run."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    settings = pretrain_settings(backbone, image_size, karyogram_size)
    return cache_dir / "pretrained" / f"{settings['backbone']}-{settings_key(settings)}"


#: Pretraining seconds per 1000 crops and epoch at the backbone's smallest input, for the one-line
#: notice. Measured in mixed_bfloat16 on 2 cores during the quick preset from a fresh install: VGG16
#: 116 s for its 6 epochs of 2400 crops (about 8 s per 1000), InceptionV3 51 s per epoch (about 21);
#: other backbones are guesses.
SECONDS_PER_KILO_EPOCH = {"vgg16": 8.0, "inceptionv3": 21.0}


def chromosome_weights(backbone, image_size, karyogram_size=None, progress=True, cache_dir=None):
    """The cached chromosome-pretrained weights of ``backbone`` for ``image_size`` karyograms.

    Built on first use (one printed line says so and about how long it takes), then reused.

    Args:
        backbone: a registered backbone name.
        image_size: input side of the karyogram model the weights are for.
        karyogram_size: the karyograms' side if it differs (default ``image_size``).
        cache_dir: default ``$KARYO_CACHE`` (``karyo.models.features.default_cache_dir``).

    Returns:
        Path of ``backbone.weights.h5``.
    """
    folder = pretrained_dir(backbone, image_size, karyogram_size, cache_dir)
    weights = folder / "backbone.weights.h5"
    if (folder / "card.json").is_file() and weights.is_file():
        return weights
    s = pretrain_settings(backbone, image_size, karyogram_size)
    pace = SECONDS_PER_KILO_EPOCH.get(s["backbone"], 30.0) * (s["image_size"] / get_backbone(backbone).min_size) ** 2
    minutes = max(1, math.ceil(pace * s["n_synthetic"] * 1.2 / 1000 * s["epochs"] / 60))
    print(f"karyo: pretraining {s['backbone']} on synthetic chromosomes once for {s['karyogram_size']}-px "
          f"karyograms (about {minutes} min on 2 CPU cores) into {folder}", flush=True)
    pretrain(s["backbone"], folder, image_size=s["image_size"], karyogram_size=s["karyogram_size"],
             epochs=s["epochs"], n_synthetic=s["n_synthetic"], seed=s["seed"], progress=progress,
             stain=s["stain"], batch_size=s["batch_size"], lr=s["lr"], precision=s["precision"])
    return weights


def starting_weights(weights, backbone, image_size):
    """The weights a karyogram model of input side ``image_size`` starts from.

    ``karyo.models.weights.resolve_weights`` with karyo's chromosome-pretrained weights for
    ``chromosome`` and an offline ``auto`` (:func:`chromosome_weights`, built on first use): the one
    place the training, tuning, transfer and chromosome commands ask.

    Returns:
        ``(weights_arg, used, note)`` as ``resolve_weights`` gives them.
    """
    weights_arg, used, note = resolve_weights(weights, backbone,
                                              chromosome=lambda: chromosome_weights(backbone, int(image_size)))
    if used == "chromosome":
        note += f" [{pretraining_quality(Path(weights_arg).parent)}]"
    return weights_arg, used, note


def pretraining_quality(folder):
    """How well a pretraining run classifies its held-out chromosomes, in words for a run's notes.

    Weights that never learnt the chromosome task are as good as random ones: the note says so
    rather than let "chromosome-pretrained" suggest otherwise.
    """
    try:
        card = json.loads((Path(folder) / "card.json").read_text(encoding="utf-8"))
        accuracy, macro_f1 = float(card["accuracy"]), float(card["macro_f1"])
    except (OSError, ValueError, KeyError, TypeError):
        return "pretraining card unreadable: its quality is unknown"
    chance = 1 / len(CHROMOSOME_LABELS)
    verdict = "no better than chance: these weights are as good as random" if accuracy < 1.5 * chance else \
        "better than chance"
    return (f"pretraining held-out accuracy {accuracy:.3f}, Macro-F1 {macro_f1:.3f} on 24 classes "
            f"(chance {chance:.3f}): {verdict}")
