"""The karyotype detector as a registered experiment: ``karyo train karyotype_detector``.

A cytogeneticist reads a karyogram slot by slot; :mod:`karyo.models.detector` does the same with
the measurements of :mod:`karyo.karyograms.slots`. This module runs it like any other experiment:

1. every karyogram of the manifest is read slot by slot, and the rows are split by ``group``
   (the case: no case is in two parts);
2. the training part is its real karyograms (their slot labels from the counts: a trisomy is a
   slot with three chromosomes) plus, for every normal training karyogram, one abnormal karyogram
   of each kind of :data:`karyo.karyograms.abnormal_cells.KINDS` (an extra or missing copy,
   deletions, duplication, inversion, translocation, Robertsonian fusion), built from the
   chromosomes the reader cut out of it and read back;
3. the detector is fitted, and its decision threshold set so that 5 % of the validation part's
   normal karyograms are flagged (the test part is never used to tune);
4. the test part is scored with 100 MC Dropout passes: ``predictions.csv`` keeps the thesis
   models' columns (``confidence``, ``refer`` ...), ``slot_probabilities.csv`` gives every slot's
   probability, and ``metrics.json`` (written last) the same metrics as every run.

The run folder holds ``config.json``, ``split.csv``, ``detector.keras`` + ``detector.json`` (see
:func:`karyo.models.detector.save_detector`), ``predictions.csv``, ``slot_probabilities.csv`` and
``metrics.json``; ``karyo predict --model RUN`` and ``karyo evaluate RUN`` read it.
"""

import csv
import json
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from karyo.atomic import atomic_write_text
from karyo.data.imageio import decode_image
from karyo.data.manifest import check_run_data, KARYOGRAM_LABELS, write_manifest
from karyo.data.splits import split_rows
from karyo.errors import KaryoError, ImageError
from karyo.karyograms.abnormal_cells import KINDS, make_abnormal, slot_labels
from karyo.karyograms.layout import arrange_karyogram, WHITE
from karyo.karyograms.slots import read_slots, slot_counts
from karyo.models.detector import (calibrate_decision, compact, fit_detector, load_detector, predict_karyograms,
                                   save_detector)
from karyo.uncertainty.metrics import metrics_from_predictions

#: The file whose presence marks a detector run (beside ``detector.keras``).
DETECTOR_FILE = "detector.json"
#: Share of the validation part's normal karyograms the decision threshold flags.
CALIBRATION_FPR = 0.05


def is_detector_run(run_dir):
    """True if ``run_dir`` holds a fitted karyotype detector."""
    return (Path(run_dir) / DETECTOR_FILE).is_file()


def abnormal_variants(reading, size, rng, kinds=KINDS):
    """One abnormal karyogram of each kind, built from a normal karyogram's slot reading.

    The chromosomes the reader cut out (dark on white) are changed by
    :func:`karyo.karyograms.abnormal_cells.make_abnormal`, laid out again at ``size`` and read back.

    Returns:
        list of ``(compact reading, {slot: 0/1})``; a kind no chromosome fits is left out.
    """
    crops = {r.slot: [c.crop for c in r.chromosomes] for r in reading}
    out = []
    for kind in kinds:
        try:
            changed, labels = make_abnormal(crops, kind, rng, background=WHITE)
        except KaryoError:
            continue
        image = arrange_karyogram(changed, size, background=WHITE).image
        out.append((compact(read_slots(image)), labels))
    return out


def _read_all(manifest, rows, progress):
    """Every row's slot reading and image side, each image decoded once."""
    readings, sides = [], []
    for row in tqdm(rows, desc="read slots", unit="karyogram", leave=False, disable=not progress):
        image = decode_image(manifest.resolve(row))
        readings.append(read_slots(image, name=row["path"]))
        sides.append(max(image.shape[:2]))
    return readings, sides


def train_detector(experiment, data, out, seed=0, root=None, progress=True):
    """Fit the karyotype detector on a karyogram manifest and score its test part.

    Args:
        experiment: the registry's ``karyotype_detector`` (``epochs``, ``mc_passes``, ``threshold``).
        data: karyogram manifest (karyo's layout: ``karyo data assemble`` or ``karyo data synth``).
        out: the run folder to create.
        seed: seeds the split, the abnormal karyograms, the head and the MC passes.

    Returns:
        ``out``.

    Raises:
        KaryoError: bad data (one line naming it), or a split without normal karyograms to learn from.
    """
    out = Path(out)
    manifest = check_run_data(data, ("grouped",), seed, False, root, progress=progress)
    rows = [dict(r) for r in manifest.rows]
    for row, part in zip(rows, split_rows(rows, "grouped", seed)):
        row["split"] = part
    started = time.time()
    readings, sides = _read_all(manifest, rows, progress)
    rng = np.random.default_rng([int(seed), 17])
    train_r, train_y, train_n = [], [], []
    for row, reading, side in zip(rows, readings, sides):
        if row["split"] != "train":
            continue
        train_r.append(compact(reading))
        train_y.append(slot_labels(slot_counts(reading)))
        train_n.append(row["label"] == "normal")
        if row["label"] == "normal":
            for variant, labels in abnormal_variants(reading, side, rng):
                train_r.append(variant)
                train_y.append(labels)
                train_n.append(False)
    if not any(train_n):
        raise KaryoError(f"{data}: the training part holds no normal karyogram to learn from")
    detector = fit_detector(train_r, train_y, normal=train_n, epochs=experiment.epochs, seed=seed)
    val_normal = [compact(r) for row, r in zip(rows, readings) if row["split"] == "val" and row["label"] == "normal"]
    if val_normal:
        calibrate_decision(detector, val_normal, fpr=CALIBRATION_FPR, T=experiment.mc_passes, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(out / "split.csv", rows)
    save_detector(detector, out)
    config = {
        "experiment": experiment.to_dict(), "kind": "detector",
        "data": {"manifest": str(Path(data).resolve()), "root": str(manifest.root.resolve()),
                 "split_root": str(manifest.root.resolve()), "protocol": "grouped",
                 "counts": {p: {lab: sum(r["split"] == p and r["label"] == lab for r in rows)
                                for lab in KARYOGRAM_LABELS} for p in ("train", "val", "test")}},
        "seed": seed, "training_karyograms": len(train_r), "abnormal_kinds_built": list(KINDS),
        "decision": detector.decision, "combine": detector.combine,
        "calibration": f"{CALIBRATION_FPR:.0%} of the validation part's normal karyograms flagged",
        "train_seconds": round(time.time() - started, 1),
    }
    atomic_write_text(out / "config.json", json.dumps(config, indent=2, default=str) + "\n")
    evaluate_detector_run(out, passes=experiment.mc_passes, threshold=experiment.threshold, seed=seed)
    return out


def evaluate_detector_run(run_dir, passes=100, threshold=0.8, seed=0):
    """Score a detector run's test part: ``predictions.csv``, ``slot_probabilities.csv``, ``metrics.json``.

    Returns:
        the metrics dict (also written to ``metrics.json``, last).
    """
    run_dir = Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    root = Path(config["data"]["root"])
    test = [r for r in _read_split(run_dir) if r["split"] == "test"]
    detector = load_detector(run_dir)
    paths = [root / r["path"] for r in test]
    rows, _ = predict_karyograms(detector, paths, labels=[r["label"] for r in test],
                                 out=run_dir / "predictions.csv", T=passes, threshold=threshold, seed=seed)
    for row, source in zip(rows, test):
        row["path"] = source["path"]
    metrics = metrics_from_predictions(rows)
    metrics.update({"mc_passes": int(passes), "threshold": float(threshold), "decision": detector.decision,
                    "n_test": len(test)})
    atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2, default=float) + "\n")
    return metrics


def _read_split(run_dir):
    with open(Path(run_dir) / "split.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def predict_detector_paths(run_dir, files, passes=100, threshold=0.8, seed=0):
    """``karyo predict`` with a detector run: ``(rows, problems)`` as ``karyo.experiments.runs.predict_paths``."""
    detector = load_detector(run_dir)
    good, problems = [], []
    for path in files:  # one bad file is named and skipped, as for the thesis models
        try:
            decode_image(path)
            good.append(path)
        except ImageError as exc:
            problems.append((str(path), exc.reason))
    if not good:
        return [], problems
    rows, _ = predict_karyograms(detector, good, T=passes, threshold=threshold, seed=seed)
    return rows, problems
