"""The karyotype detector as a registered experiment: ``karyo train karyotype_detector``.

A cytogeneticist reads a karyogram slot by slot; :mod:`karyo.models.detector` does the same with
the measurements of :mod:`karyo.karyograms.slots`. This module runs it like any other experiment:

1. every karyogram of the manifest is read slot by slot, and the rows are split by ``group``
   (the case: no case is in two parts);
2. the training part is its real karyograms (their slot labels from the counts: a trisomy is a
   slot with three chromosomes) plus, for every normal training karyogram, one abnormal karyogram
   of each kind of :data:`karyo.karyograms.abnormal_cells.KINDS` (an extra or missing copy,
   deletions, duplication, inversion, translocation, Robertsonian fusion), built from the
   chromosomes the reader cut out of it and read back; ``karyotype_detector_degraded``
   (``augmented``) adds the same cell with its crops degraded as other laboratories cut them
   (:func:`degraded_variants`), and the abnormal karyograms built from that;
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

from karyo.atomic import atomic_write_text, write_csv
from karyo.data.imageio import decode_image, DEFAULT_SIZE
from karyo.data.manifest import check_run_data, KARYOGRAM_LABELS, write_manifest
from karyo.data.splits import split_rows
from karyo.errors import KaryoError, ImageError
from karyo.experiments import figures
from karyo.karyograms.abnormal_cells import KINDS, make_abnormal, slot_labels
from karyo.karyograms.assemble import assemble_folder, prepare_crops, safe_file_name
from karyo.karyograms.degrade import degrade_cell
from karyo.karyograms.layout import arrange_karyogram, SLOTS, WHITE
from karyo.karyograms.slots import as_gray, read_slots, slot_counts
from karyo.models.detector import (calibrate_decision, compact, fit_detector, karyogram_features, load_detector,
                                   predict_karyograms, save_detector, SLOT_PROBS_FILE, write_slot_probabilities)
from karyo.models.explain import MIN_PROB, slot_reasons
from karyo.uncertainty.confidence import write_predictions
from karyo.uncertainty.metrics import metrics_from_predictions

#: The file whose presence marks a detector run (beside ``detector.keras``).
DETECTOR_FILE = "detector.json"
#: Share of the validation part's normal karyograms the decision threshold flags.
CALIBRATION_FPR = 0.05
#: Strength of the crop degradation (:mod:`karyo.karyograms.degrade`) an ``augmented`` detector trains on.
DEGRADE_STRENGTH = 1.0
#: ``karyo predict --explain``: the pictures' folder and the reasons' table, beside the predictions.
EXPLAIN_DIR, EXPLANATIONS_FILE = "explain", "explanations.csv"
EXPLANATION_COLUMNS = ("path", "pred_label", "mean_prob", "confidence", "refer", "reasons", "picture")


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


def degraded_variants(reading, size, rng, strength=DEGRADE_STRENGTH, kinds=KINDS):
    """A normal karyogram's chromosomes degraded as another laboratory's crops, cleaned and laid out again.

    The crops the reader cut out are degraded (:func:`karyo.karyograms.degrade.degrade_cell`), cleaned
    as ``prepare_crops(clean=True)`` does for raw bounding boxes, laid out at ``size`` and read back:
    the degraded normal karyogram, and one abnormal karyogram of each kind built from it (as
    :func:`abnormal_variants` does). A degraded cell whose read counts differ from the clean one's
    (a fragment read as a chromosome) is left out: its slot labels would contradict what is seen.

    Returns:
        list of ``(compact reading, {slot: 0/1})``.
    """
    crops = {r.slot: [c.crop for c in r.chromosomes] for r in reading}
    prepared, background = prepare_crops(degrade_cell(crops, rng, WHITE, strength), clean=True)
    read = read_slots(arrange_karyogram(prepared, size, background=background).image)
    if slot_counts(read) != slot_counts(reading):
        return []
    return [(compact(read), {s: 0 for s in SLOTS})] + abnormal_variants(read, size, rng, kinds)


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
            variants = abnormal_variants(reading, side, rng)
            if experiment.augmented:  # other laboratories' crops: degraded copies, cleaned on assembly
                variants += degraded_variants(reading, side, rng)
            for variant, labels in variants:
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
        "degraded_copies": DEGRADE_STRENGTH if experiment.augmented else None,
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
    rows, mean_slots = predict_karyograms(detector, paths, labels=[r["label"] for r in test], T=passes,
                                          threshold=threshold, seed=seed)
    for row, source in zip(rows, test):
        # the manifest's relative path and the case, as the thesis runs' predictions.csv has them
        row["path"] = source["path"]
        row.update({c: source[c] for c in ("group", "karyotype") if c in source})
    write_predictions(run_dir / "predictions.csv", rows)
    write_slot_probabilities(run_dir / SLOT_PROBS_FILE, [r["path"] for r in test], mean_slots)
    metrics = metrics_from_predictions(rows)
    metrics.update({"mc_passes": int(passes), "threshold": float(threshold), "decision": detector.decision,
                    "n_test": len(test)})
    atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2, default=float) + "\n")
    return metrics


def _read_split(run_dir):
    with open(Path(run_dir) / "split.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _load_source(source, size, clean=False):
    """A karyogram to score: an image file, or a cell folder of crops assembled on the fly (gray uint8)."""
    if Path(source).is_dir():
        image, _, _ = assemble_folder(source, size, clean=clean)
        return as_gray(image, str(source))
    return as_gray(decode_image(source), str(source))


def _unique_stems(sources):
    """One picture name per source: its stem (a cell folder's name), numbered when two collide."""
    seen, out = {}, []
    for source in sources:
        stem = safe_file_name(Path(source).name if Path(source).is_dir() else Path(source).stem) or "karyogram"
        seen[stem] = seen.get(stem, 0) + 1
        out.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return out


def predict_detector_paths(run_dir, files, passes=100, threshold=0.8, seed=0, cells=(), explain=None,
                           size=DEFAULT_SIZE, clean_crops=False):
    """``karyo predict`` with a detector run: ``(rows, problems)`` as ``karyo.experiments.runs.predict_paths``.

    Args:
        run_dir: the detector run folder.
        files: karyogram image files.
        passes, threshold, seed: MC Dropout passes, referral threshold, dropout seed.
        cells: cell folders of chromosome crops (``<cell>/<k>/*.png``), each laid out as a karyogram
            at ``size`` (:func:`karyo.karyograms.assemble.assemble_folder`) and scored like a file.
        explain: a folder: write ``explain/<stem>.png`` (:func:`karyo.experiments.figures.plot_explanation`),
            ``explanations.csv`` (the reasons in words) and ``slot_probabilities.csv`` into it.
        clean_crops: the cell folders hold raw bounding boxes (another laboratory's export): erase
            neighbours' pieces and stretch pale chromosomes before the layout
            (``karyo.karyograms.assemble.prepare_crops(clean=True)``).

    Returns:
        ``(rows, problems)``: prediction rows for the inputs that could be read (``path`` names the
        file or the cell folder) and ``(path, reason)`` for those that could not.
    """
    detector = load_detector(run_dir)
    good, readings, problems = [], [], []
    for source in list(files) + list(cells):  # one bad input is named and skipped, as for the thesis models
        try:
            gray = _load_source(source, size, clean_crops)
            readings.append(compact(read_slots(gray, str(source))))
            good.append(source)
        except ImageError as exc:
            problems.append((str(source), exc.reason))
        except KaryoError as exc:
            problems.append((str(source), str(exc).removeprefix(f"{source}: ")))
    if not good:
        return [], problems
    rows, mean_slots = predict_karyograms(detector, good, T=passes, threshold=threshold, seed=seed,
                                          readings=readings)
    if explain is not None:
        write_explanations(detector, good, readings, rows, mean_slots, explain, size, clean_crops)
    return rows, problems


def write_explanations(detector, sources, readings, rows, mean_slots, folder, size=DEFAULT_SIZE, clean_crops=False):
    """Write ``explain/<stem>.png``, ``explanations.csv`` and ``slot_probabilities.csv`` into ``folder``.

    ``explanations.csv`` has one row per karyogram: ``path, pred_label, mean_prob, confidence, refer,
    reasons`` (the reasons of :func:`karyo.models.explain.slot_reasons`, joined by `` | ``) and
    ``picture`` (the PNG, relative to ``folder``).

    Returns:
        the path of ``explanations.csv``.
    """
    folder = Path(folder)
    table = []
    for source, reading, row, probs, stem in zip(sources, readings, rows, mean_slots, _unique_stems(sources)):
        features = karyogram_features(reading, detector.references)
        reasons = slot_reasons(features, probs, reading)
        if not reasons and (row["pred_label"] == "abnormal" or row["refer"]):
            # the passes' max over slots can flag a karyogram whose mean slot probabilities all stay
            # below MIN_PROB: name its most probable slot all the same
            reasons = slot_reasons(features, probs, reading, top=1, top_always=True)
        top = int(np.argmax(probs))
        shown = reasons or [f"no slot reaches P {MIN_PROB} (highest: slot {SLOTS[top]}, P {probs[top]:.2f})"]
        picture = Path(EXPLAIN_DIR) / f"{stem}.png"
        decision = "refer to manual review" if row["refer"] else "accept"
        title = (f"{Path(str(source)).name}: {row['pred_label']} (P {row['mean_prob']:.2f}), "
                 f"confidence {row['confidence']:.0%}, {decision}")
        figures.plot_explanation(_load_source(source, size, clean_crops), probs, shown, folder / picture, title=title)
        table.append({"path": str(source), "pred_label": row["pred_label"], "mean_prob": f"{row['mean_prob']:.6g}",
                      "confidence": f"{row['confidence']:.6g}", "refer": row["refer"],
                      "reasons": " | ".join(reasons), "picture": str(picture)})
    write_slot_probabilities(folder / SLOT_PROBS_FILE, [str(s) for s in sources], mean_slots)
    return write_csv(folder / EXPLANATIONS_FILE, table, EXPLANATION_COLUMNS)
