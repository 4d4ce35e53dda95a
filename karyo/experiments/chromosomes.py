"""The intermediate task of two-step transfer: classifying single chromosomes into 24 classes.

The two-step transfer paper (``../shared/seeds/000_...txt``) trains an ImageNet network first on
an intermediate domain close to the target, single chromosomes, then on the target task. Here the
intermediate task is the 24-class classification (``1``..``22``, ``X``, ``Y``) of the crops that
``karyo data chromosomes`` writes from ``gband612`` or BioImLab's Q-band set; its ``model.keras``
is handed to the karyogram task with ``--weights FILE`` (``karyo.models.weights.resolve_weights``
copies its backbone).

Training is the karyogram task's two-phase fit (``karyo.experiments.fit.two_phase_fit``): the head trains on
cached features of the frozen backbone, then, if asked, the last ``unfreeze`` blocks (or all of
them) are fine-tuned. Early stopping follows validation accuracy, since Keras' AUC does not take
sparse 24-class labels. The split is by case (``group``): no patient's chromosomes are on both
sides.

A run folder holds ``config.json``, ``split.csv``, ``history.csv``, ``model.keras``,
``metrics.json`` (accuracy, Macro-F1, per-class F1; written last, so its presence means the run
finished) and ``confusion_matrix.png``.
"""

import json
import time
from pathlib import Path


from karyo.atomic import atomic_path, atomic_write_text
from karyo.data.manifest import check_manifest, CHROMOSOME_LABELS, read_manifest, sha256_file, write_manifest
from karyo.data.pipeline import label_indices, load_images
from karyo.data.splits import split_by_case
from karyo.errors import KaryoError
from karyo.experiments import figures
from karyo.experiments.fit import FitConfig, strategy_scope, two_phase_fit, write_history
from karyo.experiments.pretrain import starting_weights
from karyo.experiments.training import environment
from karyo.models.features import default_cache_dir
from karyo.uncertainty.metrics import chromosome_metrics
from karyo.models.backbones import check_image_size
from karyo.models.network import backbone_blocks, build_model, n_blocks_arg
from karyo.models.weights import weights_identity
from karyo.uncertainty.mc_dropout import mc_predict

#: Fine-tuning learning rate: the karyogram experiments' 1e-5 (1e-3 / 100) is too slow for a
#: randomly initialised backbone in a few epochs; 1e-4 is the registry's ``vgg16_scratch`` rate.
DEFAULT_FINE_TUNE_LR = 1e-4


def train_chromosome_classifier(manifest, out, backbone="vgg16", image_size=64, weights="auto",
                                epochs=5, batch_size=32, lr=1e-3, seed=0, cache_dir=None,
                                unfreeze="all", fine_tune_epochs=None,
                                fine_tune_lr=DEFAULT_FINE_TUNE_LR, patience=3, root=None,
                                exclude_groups=(), mc_passes=20, verbose=0, progress=True, strategy=None):
    """Train the 24-class single-chromosome classifier into a run folder; return the folder.

    Args:
        manifest: chromosome manifest (``karyo data chromosomes``; labels ``1``..``22``, X, Y;
            ``group`` = case).
        out: run folder to create (a finished one, with ``metrics.json``, is returned as is).
        backbone, image_size: the network (VGG16's minimum is 32 px).
        weights: ``imagenet``, ``chromosome``, ``auto``, ``none`` or a weights file (see
            ``karyo.experiments.pretrain.starting_weights``).
        epochs: head epochs on cached features; fine_tune_epochs: after unfreezing (default
            ``epochs``).
        batch_size, lr: head training (Adam).
        seed: seeds the split by case, the initial weights and dropout.
        cache_dir: backbone feature cache (default ``karyo.models.features.default_cache_dir()``).
        unfreeze: ``0`` (frozen backbone: its weights are handed over unchanged, so two-step
            equals one-step), ``k`` last blocks, or ``"all"``.
        fine_tune_lr: learning rate after unfreezing.
        patience: early-stopping patience (epochs without a better validation accuracy).
        root: folder the manifest's paths are relative to.
        exclude_groups: cases to leave out (e.g. the karyogram task's validation and test cases
            when both tasks come from the same patients).
        mc_passes: MC Dropout passes averaged for the test predictions.
        verbose: Keras' fit verbosity.
        strategy: a ``tf.distribute`` strategy to build and train the model in (``None``: one device).

    Raises:
        KaryoError: unknown labels, an empty split, a bad backbone or image size.
    """
    import keras

    out = Path(out)
    if (out / "metrics.json").is_file():
        return out
    image_size = check_image_size(backbone, image_size)

    # Validate first, then write: every row's label, file, sha256 and image before out exists.
    data = check_manifest(read_manifest(manifest, root), CHROMOSOME_LABELS, every_class=False,
                          progress=progress)
    excluded = {str(g) for g in exclude_groups}
    rows = [dict(r) for r in data.rows if r["group"] not in excluded]
    if not rows:
        raise KaryoError(f"{manifest}: no chromosomes left after excluding {len(excluded)} case(s)")
    for row, part in zip(rows, split_by_case(rows, seed)):
        row["split"] = part
    parts = {p: [r for r in rows if r["split"] == p] for p in ("train", "val", "test")}
    for part, members in parts.items():
        if not members:
            raise KaryoError(f"{manifest}: the {part} split is empty (too few cases)")
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(out / "split.csv", rows)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    weights_arg, weights_used, weights_note = starting_weights(weights, backbone, image_size)
    started = time.time()
    images = {p: load_images(data, r, image_size, progress, p) for p, r in parts.items()}
    labels = {p: label_indices(r, CHROMOSOME_LABELS) for p, r in parts.items()}

    keras.utils.set_random_seed(seed)
    key = [backbone, weights_identity(weights_used, weights_arg, seed), image_size, "chromosomes"]
    fine_tune_epochs = epochs if fine_tune_epochs is None else int(fine_tune_epochs)
    config = FitConfig(epochs=epochs, batch_size=batch_size, lr=lr, unfreeze=unfreeze,
                       fine_tune_epochs=fine_tune_epochs, fine_tune_lr=fine_tune_lr, patience=patience,
                       seed=seed, monitor="val_accuracy", verbose=verbose, progress=progress)
    with strategy_scope(strategy):
        model = build_model(backbone, image_size, weights=weights_arg, n_outputs=len(CHROMOSOME_LABELS),
                            seed=seed)
        n_blocks_arg(unfreeze, len(backbone_blocks(model)))  # a bad depth fails before training
        history = two_phase_fit(model, images, labels, config, out, cache_dir, key)
    with atomic_path(out / "model.keras") as tmp:
        model.save(tmp)
    write_history(out / "history.csv", history)

    probs = mc_predict(model, images["test"], T=mc_passes, seed=seed).mean(axis=0)
    pred = probs.argmax(axis=1)
    metrics = chromosome_metrics(labels["test"], pred)
    metrics.update({"mc_passes": int(mc_passes), "counts": {p: len(r) for p, r in parts.items()},
                    "cases": {p: len({r["group"] for r in m}) for p, m in parts.items()}})
    figures.plot_confusion_matrix(labels["test"], pred, out / "confusion_matrix.png",
                                  class_names=CHROMOSOME_LABELS,
                                  title=f"Chromosome classes, {backbone} {image_size} px")
    config = {
        "task": "chromosomes", "manifest": str(Path(manifest).resolve()),
        "sha256": sha256_file(manifest), "root": str(data.root.resolve()), "backbone": backbone,
        "image_size": image_size, "weights_requested": str(weights), "weights_used": weights_used,
        "weights_note": weights_note, "epochs": epochs, "fine_tune_epochs": fine_tune_epochs,
        "batch_size": batch_size, "lr": lr, "fine_tune_lr": fine_tune_lr, "unfreeze": unfreeze,
        "patience": patience, "seed": seed, "excluded_cases": len(excluded),
        "monitor": "val_accuracy", "train_seconds": round(time.time() - started, 1),
        "environment": environment(),
    }
    atomic_write_text(out / "config.json", json.dumps(config, indent=2, default=str) + "\n")
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return out
