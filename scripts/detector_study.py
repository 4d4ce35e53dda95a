"""Measure the karyotype detector on real G-band cells (gband612) assembled by ``karyo data assemble``.

Stages (each cached in $KARYO_CACHE/detector_study):

1. read every assembled karyogram of MANIFEST (``karyo.karyograms.slots.read_slots``);
2. build, from every normal cell, one abnormal karyogram of each kind in
   ``karyo.karyograms.abnormal_cells.KINDS`` (seeded by cell and kind) and read it;
3. for each seed: split the real cells by case (``karyo.data.splits.split_rows``); fit the detector on
   the training part (real cells + the abnormal karyograms made from training cells only); choose
   max vs noisy-OR on the validation part; report on the test part: aneuploid AUC and recall at
   FPR <= 0.05, and AUC per structural kind against the test part's normal cells.

Usage:
    python scripts/detector_study.py --manifest /work/tmp-det/g/manifest.csv \
        --cells /work/shared/data/gband612 --seeds 0 1 2 --out results.json
"""

import argparse
import csv
import json
import os
import pickle
import time
from pathlib import Path

import numpy as np

from karyo.karyograms.abnormal_cells import KINDS, abnormal_karyogram, slot_labels
from karyo.karyograms.assemble import prepare_cell
from karyo.atomic import atomic_write_bytes, atomic_write_text
from karyo.models.detector import (calibrate_decision, combine_slots, compact, fit_detector, predict_passes,
                                   save_detector)
from karyo.karyograms.slots import read_slots
from karyo.data.splits import split_rows


def cache_dir():
    root = Path(os.environ.get("KARYO_CACHE", Path.home() / ".cache" / "karyo")) / "detector_study"
    root.mkdir(parents=True, exist_ok=True)
    return root


def cached(name, build):
    path = cache_dir() / f"{name}.pkl"
    if path.is_file():
        return pickle.loads(path.read_bytes())
    value = build()
    atomic_write_bytes(path, pickle.dumps(value))
    return value


def real_readings(manifest):
    from tqdm import tqdm

    root = Path(manifest).parent
    rows = list(csv.DictReader(open(manifest)))
    out = {}
    for row in tqdm(rows, desc="read real", mininterval=10):
        out[row["cell"]] = compact(read_slots(root / row["path"]))
    return out


def synthetic_readings(cells_dir, cells, size, variants):
    from tqdm import tqdm

    out = {}
    for ci, cell in enumerate(tqdm(cells, desc="build abnormal", mininterval=10)):
        prepared = prepare_cell(cells_dir, cell)
        for ki, kind in enumerate(KINDS):
            for v in range(variants):
                rng = np.random.default_rng([int(ci), ki, v, 7])
                image, labels = abnormal_karyogram(cells_dir, cell, kind, size, rng, prepared=prepared)
                out[(cell, kind, v)] = (compact(read_slots(image)), labels)
    return out


def roc_numbers(y, score, max_fpr=0.05):
    from sklearn.metrics import roc_auc_score, roc_curve

    y = np.asarray(y)
    if y.min() == y.max():
        return {"auc": None, "recall_at_fpr": None}
    fpr, tpr, _ = roc_curve(y, score)
    return {"auc": float(roc_auc_score(y, score)), "recall_at_fpr": float(tpr[fpr <= max_fpr].max())}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--cells", required=True)
    ap.add_argument("--size", type=int, default=416)
    ap.add_argument("--variants", type=int, default=1)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--T", type=int, default=100)
    ap.add_argument("--stage", choices=["readings", "all"], default="all")
    ap.add_argument("--out", default="detector_study.json")
    ap.add_argument("--save-dir", help="save each seed's fitted detector in SAVE_DIR/seed<k>")
    ap.add_argument("--verbose", type=int, default=0)
    ap.add_argument("--balance", action="store_true", help="weight abnormal slots up (class balance)")
    args = ap.parse_args()

    rows = list(csv.DictReader(open(args.manifest)))
    rows = [r for r in rows if r["label"] in ("normal", "abnormal")]
    real = cached(f"real_{args.size}", lambda: real_readings(args.manifest))
    normal_cells = [r["cell"] for r in rows if r["label"] == "normal"]
    synth = cached(f"synth_{args.size}_v{args.variants}",
                   lambda: synthetic_readings(args.cells, normal_cells, args.size, args.variants))
    if args.stage == "readings":
        return
    real_labels = {}
    for r in rows:
        # slot labels of a real cell from its crop counts (count-based labels, as cells.csv's)
        real_labels[r["cell"]] = slot_labels({s: int(x) for s, x in _crop_counts(args.cells, r["cell"]).items()})
    results = {"size": args.size, "epochs": args.epochs, "T": args.T, "seeds": {}}
    for seed in args.seeds:
        parts = split_rows(rows, seed=seed)
        part = {r["cell"]: p for r, p in zip(rows, parts)}
        cases = {p: {r["group"] for r, q in zip(rows, parts) if q == p} for p in ("train", "val", "test")}
        assert not (cases["train"] & cases["test"]) and not (cases["val"] & cases["test"])
        train_r, train_y, train_n = [], [], []
        for r in rows:
            if part[r["cell"]] == "train":
                train_r.append(real[r["cell"]])
                train_y.append(real_labels[r["cell"]])
                train_n.append(r["label"] == "normal")
        for (cell, kind, v), (cr, lab) in synth.items():
            if part[cell] == "train":
                train_r.append(cr)
                train_y.append(lab)
                train_n.append(False)
        t0 = time.time()
        det = fit_detector(train_r, train_y, normal=train_n, epochs=args.epochs, seed=seed,
                           balance=args.balance, verbose=args.verbose)
        fit_s = time.time() - t0
        out = {"fit_seconds": fit_s, "n_train_karyograms": len(train_r)}

        def evaluate(which, how):
            real_part = [r for r in rows if part[r["cell"]] == which]
            sp, _ = predict_passes(det, [real[r["cell"]] for r in real_part], T=args.T, seed=seed)
            score = combine_slots(sp, how).mean(axis=0)
            y = np.array([int(r["label"] == "abnormal") for r in real_part])
            res = {"aneuploid": roc_numbers(y, score)}
            pred = score >= det.decision
            res["aneuploid"].update({
                "n_abnormal": int(y.sum()), "n_normal": int(len(y) - y.sum()),
                "decision": det.decision,
                "fpr_at_decision": float(pred[y == 0].mean()),
                "recall_at_decision": float(pred[y == 1].mean()) if y.sum() else None,
                "missed": [r["cell"] + " " + r["karyotype"] for r, p_, t in zip(real_part, pred, y) if t and not p_],
                "false_pos": [r["cell"] for r, p_, t in zip(real_part, pred, y) if p_ and not t]})
            normals = {r["cell"] for r in real_part if r["label"] == "normal"}
            normal_score = score[y == 0]
            for kind in KINDS:
                keys = [k for k in synth if k[1] == kind and k[0] in normals]
                ksp, _ = predict_passes(det, [synth[k][0] for k in keys], T=args.T, seed=seed)
                ks = combine_slots(ksp, how).mean(axis=0)
                yy = [0] * len(normal_score) + [1] * len(ks)
                res[kind] = roc_numbers(yy, np.concatenate([normal_score, ks]))
                res[kind]["recall_at_decision"] = float(np.mean(ks >= det.decision))
                res[kind]["n"] = len(ks)
            return res

        val = {h: evaluate("val", h) for h in ("max", "noisy_or")}

        def mean_auc(res):
            return float(np.mean([v["auc"] for v in res.values() if v.get("auc") is not None]))

        chosen = max(("max", "noisy_or"), key=lambda h: mean_auc(val[h]))
        out["val_mean_auc"] = {h: mean_auc(val[h]) for h in val}
        out["combine"] = chosen
        det.combine = chosen
        # the operating point: 5 % of the validation part's normal cells flagged (never the test part)
        calibrate_decision(det, [real[r["cell"]] for r in rows if part[r["cell"]] == "val" and r["label"] == "normal"],
                           fpr=0.05, T=args.T, seed=seed)
        out["decision"] = det.decision
        out["test"] = evaluate("test", chosen)
        if args.save_dir:
            save_detector(det, Path(args.save_dir) / f"seed{seed}")
            atomic_write_text(Path(args.save_dir) / f"seed{seed}" / "split.json", json.dumps(
                {p: sorted(c for c, q in part.items() if q == p) for p in ("train", "val", "test")}))
        results["seeds"][str(seed)] = out
        print(json.dumps({"seed": seed, **out}, indent=1), flush=True)
    atomic_write_text(args.out, json.dumps(results, indent=1))


_CROP_COUNTS = {}


def _crop_counts(cells_dir, cell):
    from karyo.karyograms.assemble import cell_crops

    if cell not in _CROP_COUNTS:
        _CROP_COUNTS[cell] = {s: len(v) for s, v in cell_crops(cells_dir, cell).items()}
    return _CROP_COUNTS[cell]


if __name__ == "__main__":
    main()
