"""Measure a trained karyotype detector run on its held-out cells, clean and with degraded crops.

For each run folder (``karyo train karyotype_detector``: its ``split.csv`` names the test cells),
the test part's cells are laid out from their crops (``karyo.karyograms.assemble.prepare_crops``)
in five conditions:

- ``clean``: as ``karyo data assemble`` does;
- ``clean+cleaning``: the same crops through ``prepare_crops(clean=True)`` (neighbour pieces erased,
  pale chromosomes stretched): does the cleaning cost anything on clean crops?
- ``degraded S`` / ``degraded S+cleaning``: every crop degraded by ``karyo.karyograms.degrade.degrade_cell``
  at strength S (rotation, bending, thinning, contrast, neighbour fragments; seeded by cell), then laid
  out without / with the cleaning.

and scored with 100 MC passes. Reported per condition: cells whose slot counts equal their crop counts,
aneuploid AUC (abnormal vs normal cells), recall and false-positive rate at the run's decision, and the
referral rate. With ``--kinds``, also the AUC of each structural kind built from the clean test normal
cells (``karyo.experiments.detection.abnormal_variants``, one per cell and kind) against those cells, and
its recall at the decision: does training on degraded crops cost sensitivity on clean ones?

Usage:
    python scripts/detector_degraded.py --runs RUN [RUN ...] --cells /work/shared/data/gband612 \
        --strengths 0.5 1.0 --out degraded.json
"""

import argparse
import csv
import json
import time
import zlib
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from karyo.atomic import atomic_write_text
from karyo.experiments.detection import abnormal_variants
from karyo.karyograms.abnormal_cells import KINDS
from karyo.karyograms.assemble import folder_crops, load_crop, prepare_crops
from karyo.karyograms.degrade import degrade_cell
from karyo.karyograms.layout import arrange_karyogram
from karyo.karyograms.slots import read_slots, slot_counts
from karyo.models.detector import compact, load_detector, predict_passes
from karyo.uncertainty.confidence import summarize_passes


def karyogram(crops, clean, size=416):
    prepared, background = prepare_crops(crops, clean=clean)
    return arrange_karyogram(prepared, size, background=background).image


def measure(detector, images, truth_counts, labels, seed):
    readings = [read_slots(im) for im in images]
    exact = float(np.mean([slot_counts(r) == t for r, t in zip(readings, truth_counts)]))
    _, probs = predict_passes(detector, [compact(r) for r in readings], T=100, seed=seed)
    summary = summarize_passes(probs, threshold=0.8, decision=detector.decision)
    y = np.array([lab == "abnormal" for lab in labels])
    called = np.asarray(summary["pred"]) == 1
    return {"cells": len(labels), "abnormal": int(y.sum()), "exact_counts": exact,
            "auc": float(roc_auc_score(y, summary["mean_prob"])) if 0 < y.sum() < len(y) else None,
            "recall": float(called[y].mean()) if y.any() else None,
            "fpr": float(called[~y].mean()) if (~y).any() else None,
            "referral_rate": float(np.mean(summary["refer"]))}


def kind_aucs(detector, normal_images, seed):
    """AUC, and share with mean P(abnormal) >= the decision, of each structural kind built from these cells."""
    rng = np.random.default_rng([seed, 99])
    normal, built = [], {}
    for image in normal_images:
        reading = read_slots(image)
        normal.append(compact(reading))
        for kind in KINDS:
            for variant, _ in abnormal_variants(reading, image.shape[0], rng, kinds=(kind,)):
                built.setdefault(kind, []).append(variant)
    _, base = predict_passes(detector, normal, T=100, seed=seed)
    base = base.mean(axis=0)
    out = {}
    for kind, readings in built.items():
        _, probs = predict_passes(detector, readings, T=100, seed=seed)
        p = probs.mean(axis=0)
        y = np.r_[np.zeros(len(base)), np.ones(len(p))]
        out[kind] = {"n": len(p), "auc": float(roc_auc_score(y, np.r_[base, p])),
                     "share_at_decision": float(np.mean(p >= detector.decision))}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", type=Path, required=True)
    parser.add_argument("--cells", type=Path, required=True, help="the set folder (cells/, cells.csv)")
    parser.add_argument("--strengths", nargs="+", type=float, default=[0.5, 1.0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--kinds", action="store_true", help="also the AUC per structural kind (clean cells)")
    args = parser.parse_args()
    results = {}
    for run in args.runs:
        started = time.time()
        detector = load_detector(run)
        seed = json.loads((run / "config.json").read_text()).get("seed", 0)
        test = [r for r in csv.DictReader(open(run / "split.csv")) if r["split"] == "test"]
        crops = {}
        for r in test:
            paths = folder_crops(args.cells / "cells" / r["cell"])
            crops[r["cell"]] = {s: [load_crop(p) for p in ps] for s, ps in paths.items()}
        truth = [{s: len(v) for s, v in crops[r["cell"]].items()} for r in test]
        labels = [r["label"] for r in test]
        conditions = {"clean": [karyogram(crops[r["cell"]], False) for r in test],
                      "clean+cleaning": [karyogram(crops[r["cell"]], True) for r in test]}
        for strength in args.strengths:
            degraded = [degrade_cell(crops[r["cell"]], np.random.default_rng(zlib.crc32(r["cell"].encode())),
                                     strength=strength) for r in test]
            conditions[f"degraded {strength:g}"] = [karyogram(d, False) for d in degraded]
            conditions[f"degraded {strength:g}+cleaning"] = [karyogram(d, True) for d in degraded]
        results[str(run)] = {name: measure(detector, images, truth, labels, seed)
                             for name, images in conditions.items()}
        if args.kinds:
            results[str(run)]["kinds"] = kind_aucs(detector, [im for im, lab in zip(conditions["clean"], labels)
                                                              if lab == "normal"], seed)
        results[str(run)]["seconds"] = round(time.time() - started, 1)
        print(run, json.dumps(results[str(run)], indent=1), flush=True)
    atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
