"""Run folders: evaluating a trained run's test split, and scoring new karyograms with it.

Evaluation follows thesis section 4.4: 100 MC Dropout passes per image, the majority label as
the prediction, the share of votes as the confidence score, the mean probability as the "mean
softmax", and referral to manual review below 80 % confidence. A deep ensemble is evaluated the
same way, its members' mean probabilities taking the place of the passes, so MC Dropout and
ensembles compare side by side.
"""

import itertools
import json
from pathlib import Path

import numpy as np

from karyo.atomic import atomic_write_text
from karyo.data.imageio import is_image_path
from karyo.data.manifest import KARYOGRAM_LABELS, read_manifest
from karyo.data.pipeline import label_indices, stream_paths, stream_rows
from karyo.errors import KaryoError
from karyo.experiments import figures
from karyo.experiments.detection import evaluate_detector_run, is_detector_run, predict_detector_paths
from karyo.karyograms.assemble import find_cell_folders
from karyo.models.saving import load_model
from karyo.uncertainty.confidence import predictions_table, summarize_passes, write_predictions
from karyo.uncertainty.mc_dropout import mc_predict
from karyo.uncertainty.metrics import (compute_metrics, per_group_recall, write_wrong_predictions,
                                       wrong_predictions_markdown)

#: Columns of the test rows copied into predictions.csv when the manifest has them.
CONTEXT_COLUMNS = ("group", "karyotype", "abnormality", "sex", "source")


def model_paths(run_dir):
    """The model files of a run: ``model.keras``, or one per ensemble member."""
    run_dir = Path(run_dir)
    single = run_dir / "model.keras"
    if single.is_file():
        return [single]
    members = sorted(run_dir.glob("member*/model.keras"), key=lambda p: int(p.parent.name[6:]))
    if not members:
        raise KaryoError(f"{run_dir}: no model.keras (is this a finished karyo run folder?)")
    return members


def load_models(run_dir):
    """Load a run's model(s) with Keras' safe mode on (no arbitrary code is deserialised)."""

    return [load_model(path) for path in model_paths(run_dir)]


def read_config(run_dir):
    """A karyogram run's ``config.json``, checked for what evaluation and prediction read.

    Raises:
        KaryoError: the folder has no config, the config is not JSON, or it is not a
            karyogram run's (for example the chromosome task's run of two-step transfer).
    """
    path = Path(run_dir) / "config.json"
    if not Path(run_dir).is_dir():
        raise KaryoError(f"{run_dir}: run folder not found")
    if not path.is_file():
        raise KaryoError(f"{run_dir}: no config.json (is this a karyo run folder?)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise KaryoError(f"{path}: cannot be read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise KaryoError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if isinstance(config, dict) and config.get("task") == "chromosomes":
        raise KaryoError(f"{run_dir}: a single-chromosome run, not a karyogram run (it cannot score karyograms)")
    experiment = config.get("experiment") if isinstance(config, dict) else None
    data = config.get("data") if isinstance(config, dict) else None
    if not isinstance(experiment, dict) or "image_size" not in experiment \
            or not isinstance(data, dict) or "split_root" not in data:
        raise KaryoError(f"{path}: not a karyo run config (no experiment.image_size or data.split_root)")
    size = experiment["image_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise KaryoError(f"{path}: image_size {size!r} is not a positive whole number")
    return config


def pooled_passes(models, images, passes=100, seed=0, batch_size=32):
    """Per-pass abnormal probabilities, shape (T, N).

    One model: ``passes`` MC Dropout passes (the backbone runs once, the head T times). An
    ensemble: each member's MC mean probability is one "pass" (T = number of members).

    Args:
        images: one array (N, H, W, 3), or an iterable of such arrays read one after the other
            (:func:`karyo.pipeline.stream_rows`); every chunk but the last must hold a multiple
            of ``batch_size`` images, so that the dropout masks are those of one array.
    """

    chunks = [images] if isinstance(images, np.ndarray) else images
    out = []
    for chunk in chunks:
        if not len(chunk):
            continue
        # The masks are rewound once, before the first image; later chunks continue the stream.
        first = not out
        if len(models) == 1:
            out.append(mc_predict(models[0], chunk, T=passes, batch_size=batch_size,
                                  seed=seed if first else None))
        else:
            out.append(np.stack([
                mc_predict(m, chunk, T=passes, batch_size=batch_size, seed=seed + i if first else None).mean(axis=0)
                for i, m in enumerate(models)
            ]))
    if not out:
        return np.empty((passes if len(models) == 1 else len(models), 0), np.float32)
    return np.concatenate(out, axis=1)


def _split_rows(run_dir, config):
    root = config["data"]["split_root"]
    if not Path(root).is_dir():
        raise KaryoError(f"{run_dir}: the data it was trained on is gone ({root} does not exist)")
    manifest = read_manifest(Path(run_dir) / "split.csv", root=root)
    parts = {p: [r for r in manifest.rows if r.get("split") == p] for p in ("train", "val", "test")}
    return manifest, parts


def evaluate_run(run_dir, members=None, images=None, labels=None, rows=None, passes=100,
                 threshold=0.8, seed=0, progress=True):
    """Evaluate a run's test split; write predictions, metrics, tables and figures.

    Called at the end of training with everything in memory, or by ``karyo evaluate`` with
    only ``run_dir`` (the models and the split are read back from the folder).

    Returns:
        the metrics dict (also written to ``metrics.json``, last).
    """

    run_dir = Path(run_dir)
    if is_detector_run(run_dir):
        return evaluate_detector_run(run_dir, passes=passes, threshold=threshold, seed=seed)
    config = read_config(run_dir)
    size = config["experiment"]["image_size"]
    if members is None:
        members = load_models(run_dir)
    if rows is None:
        split_manifest, rows = _split_rows(run_dir, config)
        # Streamed: the test and training images are read chunk by chunk, never all at once.
        images = {p: stream_rows(split_manifest, rows[p], size) for p in ("test", "train")}
        labels = {p: label_indices(r, KARYOGRAM_LABELS) for p, r in rows.items()}

    probs = pooled_passes(members, images["test"], passes, seed)
    # Before anything is written: a damaged training image must leave the run folder unchanged.
    train_probs = pooled_passes(members, images["train"], min(passes, 20), seed).mean(axis=0)
    summary = summarize_passes(probs, threshold=threshold)
    test_rows = rows["test"]
    extra = {c: [r.get(c, "") for r in test_rows] for c in CONTEXT_COLUMNS if any(c in r for r in test_rows)}
    table = predictions_table([r["path"] for r in test_rows], labels["test"], summary,
                              class_names=KARYOGRAM_LABELS, extra=extra)
    write_predictions(run_dir / "predictions.csv", table)

    metrics = compute_metrics(labels["test"], summary["mean_prob"], summary["pred"],
                              summary["confidence"], summary["refer"])
    from sklearn.metrics import roc_auc_score

    metrics["train_auc"] = (float(roc_auc_score(labels["train"], train_probs))
                            if len(set(labels["train"].tolist())) == 2 else None)
    metrics["mc_passes"] = int(probs.shape[0])
    metrics["threshold"] = threshold
    metrics["uncertainty"] = "deep ensemble" if len(members) > 1 else "MC Dropout"
    for key in ("abnormality", "karyotype"):
        if key in extra:
            metrics[f"recall_by_{key}"] = per_group_recall(table, key)

    write_wrong_predictions(run_dir / "wrong_predictions.csv", table)
    title = f"Wrongly predicted test images ({metrics['uncertainty']}, {metrics['mc_passes']} passes)"
    atomic_write_text(run_dir / "wrong_predictions.md", wrong_predictions_markdown(table, title) + "\n")

    fig = run_dir / "figures"
    correct = summary["pred"] == labels["test"]
    history = run_dir / "history.csv"
    if not history.is_file():
        history = run_dir / "member0" / "history.csv"
    if history.is_file():
        figures.plot_training_curves(history, fig / "training_curves.png",
                                     title=f"Training metrics: {config['experiment']['title']}")
    figures.plot_confusion_matrix(labels["test"], summary["pred"], fig / "confusion_matrix.png",
                                  class_names=KARYOGRAM_LABELS)
    curves = {"test": (labels["test"], summary["mean_prob"])}
    if metrics["train_auc"] is not None:
        curves = {"train": (labels["train"], train_probs), **curves}
    figures.plot_roc_curves(curves, fig / "roc.png", title=f"ROC: {config['experiment']['title']}")
    figures.plot_reliability_diagram(labels["test"], summary["mean_prob"], fig / "reliability.png")
    figures.plot_risk_coverage(summary["confidence"], correct, fig / "risk_coverage.png", threshold=threshold)
    figures.plot_confidence_histogram(summary["confidence"], correct, fig / "confidence_histogram.png",
                                      threshold=threshold)
    atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def predict_paths(run_dir, paths, passes=100, threshold=0.8, seed=0, explain=None, clean_crops=False):
    """Score new karyograms (files or folders) with a trained run.

    A folder is searched for images; a cell folder of chromosome crops (``<cell>/<k>/*.png``,
    k = 1..24), or a folder of such cells, is laid out as karyograms on the fly and scored by a
    karyotype detector run (see :func:`karyo.experiments.detection.predict_detector_paths`).

    Args:
        explain: a folder for the detector's explanations (``explain/<stem>.png``,
            ``explanations.csv``); a thesis CNN run has no slot evidence to explain (KaryoError).
        clean_crops: cell folders hold raw bounding boxes: erase neighbours' pieces, stretch pale chromosomes.

    Returns:
        ``(rows, problems)``: prediction rows (SPEC columns, ``label`` empty) for the files that
        could be read, and ``(path, reason)`` for those that could not.

    Raises:
        KaryoError: ``explain`` with a run that is not a karyotype detector.
    """

    config = read_config(run_dir)
    detector = is_detector_run(run_dir)
    if explain is not None and not detector:
        raise KaryoError(f"{run_dir}: --explain draws the karyotype detector's slot evidence; this is a thesis "
                         "CNN run, which sees the whole picture only (train one with 'karyo train karyotype_detector')")
    files, cells, problems = [], [], []
    for path in map(Path, paths):
        if path.is_dir():
            found_cells = find_cell_folders(path)
            found = sorted(p for p in path.rglob("*") if p.is_file() and is_image_path(p)
                           and not any(c in p.parents for c in found_cells))
            if found_cells and not detector:
                problems.append((str(path), "holds cell folders of chromosome crops, which a karyotype_detector run "
                                 "scores; for this run assemble them first with 'karyo data assemble'"))
            elif found_cells:
                cells += found_cells
            if not found and not found_cells:
                problems.append((str(path), "folder holds no image files"))
            files += found
        elif path.exists():
            files.append(path)
        else:
            problems.append((str(path), "file not found"))
    if detector:
        rows, bad = predict_detector_paths(run_dir, files, passes=passes, threshold=threshold, seed=seed,
                                           cells=cells, explain=explain, clean_crops=clean_crops)
        return rows, problems + bad
    # Streamed: STREAM_CHUNK images in memory at a time, whatever the number of files.
    chunks = stream_paths(files, config["experiment"]["image_size"], problems)
    first = next(chunks, None)
    if first is None:
        return [], problems
    good = []

    def images():
        for chunk, paths in itertools.chain([first], chunks):
            good.extend(paths)
            yield chunk

    models = load_models(run_dir)
    summary = summarize_passes(pooled_passes(models, images(), passes, seed), threshold=threshold)
    return predictions_table([str(p) for p in good], None, summary, class_names=KARYOGRAM_LABELS), problems
