"""Robustness and speed of a saved detector: Q-band cells (all normal) and seconds per karyogram.

Usage:
    python scripts/detector_extra.py RUN --qband /work/tmp-det/q/manifest.csv \
        --gband /work/tmp-det/g/manifest.csv --out /work/tmp-det/extra
"""

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np

from karyo.models.detector import load_detector, predict_karyograms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--qband", required=True)
    ap.add_argument("--gband", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n-speed", type=int, default=40)
    args = ap.parse_args()
    det = load_detector(args.run)
    out = Path(args.out)
    rows = list(csv.DictReader(open(args.qband)))
    paths = [Path(args.qband).parent / r["path"] for r in rows]
    pred, _ = predict_karyograms(det, paths, [r["label"] for r in rows], out=out / "qband" / "predictions.csv",
                                 seed=0)
    abnormal = np.array([p["pred_label"] == "abnormal" for p in pred])
    refer = np.array([p["refer"] for p in pred])
    result = {"qband": {"n": len(pred), "fpr": float(abnormal.mean()), "referral_rate": float(refer.mean()),
                        "flagged": [p["path"].split("/")[-1] + " " + p["count_deviations"] for p in pred
                                    if p["pred_label"] == "abnormal"]}}
    split = json.loads((Path(args.run) / "split.json").read_text())
    g = [r for r in csv.DictReader(open(args.gband)) if r["cell"] in set(split["test"])][:args.n_speed]
    gp = [Path(args.gband).parent / r["path"] for r in g]
    predict_karyograms(det, gp[:2], T=100)  # warm-up: graph tracing
    t0 = time.perf_counter()
    predict_karyograms(det, gp, T=100)
    batch = (time.perf_counter() - t0) / len(gp)
    t0 = time.perf_counter()
    for p in gp[:10]:
        predict_karyograms(det, [p], T=100)
    single = (time.perf_counter() - t0) / 10
    result["speed"] = {"seconds_per_karyogram_batch": batch, "seconds_per_karyogram_one_by_one": single,
                       "T": 100, "n": len(gp)}
    (out / "extra.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
