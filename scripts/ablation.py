"""Ablation of what makes the thesis' VGG16 row learn offline: weights, per-pair augmentation, layout, size.

Every configuration trains ``vgg16_augmented`` (or ``--experiment``) under the grouped protocol on a
synthetic alpha-dataset rendered at the input size in the configuration's layout, and reads the test
AUC and recall with their 95 % intervals resampled by group (the report's). Finished runs are reused,
so the script can be stopped and rerun. Writes ``OUT/ablation.csv`` and ``OUT/ablation.md``.

Usage:
    python scripts/ablation.py --out /tmp/ablation --sizes 96,128 --weights none,chromosome \
        --per-pair off,on --layouts standard,compact --seeds 1
    # weights: none | chromosome | imagenet | auto | a backbone.weights.h5 (e.g. pretrained on real crops)
"""

import argparse
import csv
import itertools
import json
import time
from pathlib import Path

from karyo.atomic import atomic_write_text, write_csv
from karyo.experiments.registry import get_experiment
from karyo.experiments.training import is_complete, train_experiment
from karyo.karyograms.synth import synthesize
from karyo.uncertainty.metrics import metric_intervals

COLUMNS = ("experiment", "weights", "per_pair", "layout", "image_size", "seed", "n_test", "auc", "auc_low",
           "auc_high", "recall", "recall_low", "recall_high", "accuracy", "weights_used", "seconds")


def _words(text):
    return [w.strip() for w in text.split(",") if w.strip()]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--experiment", default="vgg16_augmented")
    ap.add_argument("--sizes", default="96")
    ap.add_argument("--weights", default="none,chromosome")
    ap.add_argument("--per-pair", default="off,on")
    ap.add_argument("--layouts", default="standard,compact")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--normal", type=int, default=105)
    ap.add_argument("--abnormal", type=int, default=41)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--fine-tune-epochs", type=int, default=6)
    ap.add_argument("--mc", type=int, default=100)
    args = ap.parse_args()

    rows = []
    grid = itertools.product([int(s) for s in _words(args.sizes)], _words(args.layouts), _words(args.weights),
                             _words(args.per_pair), range(args.seeds))
    for size, layout, weights, per_pair, seed in grid:
        data = args.out / "data" / f"{layout}-{size}"
        if not (data / "manifest.csv").is_file():
            synthesize(data, normal=args.normal, abnormal=args.abnormal, size=size, layout=layout, progress=False)
        tag = Path(weights).stem if weights.endswith(".h5") else weights
        run = args.out / "runs" / f"{args.experiment}-{size}-{layout}-{tag}-pairs_{per_pair}-seed{seed}"
        experiment = get_experiment(args.experiment, image_size=size, epochs=args.epochs,
                                    fine_tune_epochs=args.fine_tune_epochs, patience=4, weights=weights,
                                    per_pair=per_pair == "on", mc_passes=args.mc)
        start = time.time()
        if not is_complete(run):
            train_experiment(experiment, data / "manifest.csv", run, protocol="grouped", seed=seed,
                             resume=run.exists(), cache_dir=args.out / "cache", data_dir=args.out / "prepared",
                             verbose=0, progress=False)
        metrics = json.loads((run / "metrics.json").read_text())
        config = json.loads((run / "config.json").read_text())
        with open(run / "predictions.csv", newline="") as fh:
            ci = metric_intervals(list(csv.DictReader(fh)))
        rows.append({"experiment": args.experiment, "weights": tag, "per_pair": per_pair, "layout": layout,
                     "image_size": size, "seed": seed, "n_test": metrics["n"], "auc": metrics["auc"],
                     "auc_low": ci["auc"][0], "auc_high": ci["auc"][1], "recall": metrics["recall"],
                     "recall_low": ci["recall"][0], "recall_high": ci["recall"][1],
                     "accuracy": metrics["accuracy"], "weights_used": config.get("weights_used"),
                     "seconds": round(time.time() - start)})
        print(json.dumps(rows[-1]), flush=True)
    write_csv(args.out / "ablation.csv", rows, COLUMNS)

    def fmt(v):
        return "–" if v is None else f"{v:.2f}"

    lines = ["| size | layout | weights | per-pair | test AUC [95 % CI] | recall [95 % CI] | n test |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['image_size']} | {r['layout']} | {r['weights']} | {r['per_pair']} | "
                     f"{fmt(r['auc'])} [{fmt(r['auc_low'])}, {fmt(r['auc_high'])}] | "
                     f"{fmt(r['recall'])} [{fmt(r['recall_low'])}, {fmt(r['recall_high'])}] | {r['n_test']} |")
    atomic_write_text(args.out / "ablation.md", "\n".join(lines) + "\n")
    print(f"wrote {args.out / 'ablation.md'}")


if __name__ == "__main__":
    main()
