"""Compare BioTune's selective fine-tuning with the thesis' fixed recipes and ``--space extended`` (issue #20).

Runs (or resumes) two searches on one karyogram manifest, ``--space biotune`` (evolutionary oracle)
and ``--space extended`` (Bayesian oracle), with the same trial budget, and times them. Then it
retrains, for each training seed, on the same grouped split: the head alone (frozen backbone), the
thesis' fixed recipes (VGG16: the last one and two blocks at 1e-5 after the head), the best
extended trial and the best biotune trial, each for the search's epochs per phase, and scores the
test split (never seen by the searches) with the MC Dropout mean of ``--mc`` passes: ROC AUC.

    python scripts/biotune_compare.py --data alpha96/manifest.csv --work /tmp/biotune \\
        --image-size 64 --weights chromosome --trials 6 --epochs 2 --seeds 0 1 2

Writes ``WORK/compare.json`` (every AUC, the searches' wall times and their best recipes) and
``WORK/block_rates.png`` (the recipes side by side), and prints a table.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from karyo.atomic import atomic_write_text  # noqa: E402


def load_split(manifest, image_size, work, weights, cache_dir, seed=0, augmented=False):
    """Images, labels and pooled features of the grouped split the searches used."""
    from karyo.data.manifest import check_run_data, KARYOGRAM_LABELS
    from karyo.data.pipeline import label_indices, load_images
    from karyo.experiments.pretrain import starting_weights
    from karyo.experiments.training import prepare_data
    from karyo.models.features import cached_features
    from karyo.models.network import build_model, split_model
    from karyo.models.weights import weights_identity

    checked = check_run_data(manifest, ("grouped",), seed, augmented, None, progress=False)
    prepared = prepare_data(checked, augmented, "grouped", seed, Path(work) / "data", progress=False)
    parts = {p: [r for r in prepared.rows if r["split"] == p] for p in ("train", "val", "test")}
    weights_arg, used, _ = starting_weights(weights, "vgg16", image_size)
    key = ["vgg16", weights_identity(used, weights_arg, seed), image_size]
    images = {p: load_images(prepared, rows, image_size, False, p) for p, rows in parts.items()}
    frozen, _ = split_model(build_model("vgg16", image_size, weights=weights_arg, seed=seed), 0)
    pooled = {p: cached_features(frozen, images[p], key + ["pooled"], cache_dir, progress=False) for p in parts}
    labels = {p: label_indices(rows, KARYOGRAM_LABELS) for p, rows in parts.items()}
    return {"images": images, "labels": labels, "pooled": pooled}, weights_arg, key


def retrain(space, values, data, weights_arg, key, image_size, epochs, seed, cache_dir, mc):
    """Train one recipe as a search trial would (seeded by ``seed``) and return its test AUC."""
    import keras_tuner
    from sklearn.metrics import roc_auc_score

    from karyo.experiments.hypermodel import KaryogramHyperModel
    from karyo.models.unfreeze import FINE_TUNE_LEARNING_RATE
    from karyo.uncertainty.mc_dropout import mc_predict

    hypermodel = KaryogramHyperModel("vgg16", image_size, weights_arg, key, space, (1e-5, 1e-1), [8, 16, 32, 64],
                                     epochs, seed, data["pooled"]["train"].shape[-1], cache_dir, 256, 0.5,
                                     FINE_TUNE_LEARNING_RATE)
    hp = keras_tuner.HyperParameters()
    hypermodel.declare_hyperparameters(hp)
    hp.values.update(values)
    model = hypermodel.build(hp)
    result = hypermodel.fit(hp, model, data=data)
    # No block trained: the trial's model is the head alone, on pooled features.
    x = data["pooled"]["test"] if model.name == "head" else data["images"]["test"].astype("float32")
    prob = mc_predict(model, x, T=mc, seed=seed).mean(axis=0)
    return float(roc_auc_score(data["labels"]["test"], prob)), float(result["val_loss"])


def genes_for(configuration, base_lr):
    """Biotune hyperparameter values that give ``configuration`` ({block: rate or None})."""
    values = {"threshold": 0.0}
    for block, rate in configuration.items():
        values[f"gene_{block}"] = 0.0 if rate is None else float(np.clip(0.5 + np.log10(rate / base_lr) / 2, 0, 1))
    return values


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, type=Path, help="karyogram manifest")
    parser.add_argument("--work", required=True, type=Path, help="folder for the searches and results")
    parser.add_argument("--image-size", type=int, default=64, help="input side (64)")
    parser.add_argument("--weights", default="chromosome", help="starting weights (chromosome)")
    parser.add_argument("--trials", type=int, default=6, help="trials per search (6)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per phase (2)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds of the retrained recipes")
    parser.add_argument("--mc", type=int, default=30, help="MC Dropout passes for the test AUC (30)")
    parser.add_argument("--cache", type=Path, help="feature cache (default $KARYO_CACHE)")
    parser.add_argument("--bayesian-biotune", action="store_true",
                        help="also search the biotune space with the Bayesian oracle (same budget)")
    args = parser.parse_args()

    from karyo.experiments.figures import plot_block_rates
    from karyo.experiments.tuning import thesis_recipes, tune
    from karyo.models.features import default_cache_dir
    from karyo.models.selective import fixed_recipe
    from karyo.models.unfreeze import FINE_TUNE_LEARNING_RATE as BASE
    from karyo import thesis

    cache = args.cache or default_cache_dir()
    results = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "searches": {}}
    best = {}
    searches = [("biotune", "biotune", "evolution"), ("extended", "extended", "bayesian")]
    if args.bayesian_biotune:
        searches.append(("biotune-bayesian", "biotune", "bayesian"))
    for name, space, oracle in searches:
        started = time.time()
        best[name] = tune(args.data, args.work / name, backbone="vgg16", max_trials=args.trials,
                          epochs=args.epochs, image_size=args.image_size, weights=args.weights, space=space,
                          seed=0, cache_dir=cache, augmented=False, progress=False, oracle=oracle)
        trials = json.loads((args.work / name / "best.json").read_text())
        results["searches"][name] = {
            "wall_seconds_this_call": round(time.time() - started, 1), "oracle": trials["oracle"],
            "best": {k: trials[k] for k in ("hyperparameters", "block_rates", "val_loss", "trial_id")}}
        print(f"{name}: {results['searches'][name]}", flush=True)

    ext = best["extended"]["hyperparameters"]
    recipes = {
        "head only (frozen backbone)": ("extended", {"lr": thesis.LEARNING_RATE, "batch_size": 16, "unfreeze": 0,
                                                     "dropout": 0.5}),
        "thesis: last 1 block": ("extended", {"lr": thesis.LEARNING_RATE, "batch_size": 16, "unfreeze": 1,
                                              "dropout": 0.5}),
        "thesis: last 2 blocks": ("extended", {"lr": thesis.LEARNING_RATE, "batch_size": 16, "unfreeze": 2,
                                               "dropout": 0.5}),
        "best extended": ("extended", {k: ext[k] for k in ("lr", "batch_size", "unfreeze", "dropout")}),
        "best biotune": ("biotune", genes_for(
            fixed_recipe("vgg16", 0, BASE) | best["biotune"]["block_rates"], BASE)),
    }
    if args.bayesian_biotune:
        recipes["best biotune (bayesian oracle)"] = ("biotune", genes_for(
            fixed_recipe("vgg16", 0, BASE) | best["biotune-bayesian"]["block_rates"], BASE))
    data, weights_arg, key = load_split(args.data, args.image_size, args.work, args.weights, cache)
    results["test"] = {name: {} for name in recipes}
    for name, (space, values) in recipes.items():
        for seed in args.seeds:
            started = time.time()
            auc, val_loss = retrain(space, values, data, weights_arg, key, args.image_size, args.epochs, seed,
                                    cache, args.mc)
            results["test"][name][str(seed)] = {"auc": auc, "val_loss": val_loss,
                                                "seconds": round(time.time() - started, 1)}
            print(f"{name:<30} seed {seed}: test AUC {auc:.3f} (val loss {val_loss:.3f})", flush=True)
    for name, runs in results["test"].items():
        aucs = [r["auc"] for r in runs.values()]
        results["test"][name]["mean_auc"], results["test"][name]["sd_auc"] = float(np.mean(aucs)), float(np.std(aucs))
        print(f"{name:<30} test AUC {np.mean(aucs):.3f} +- {np.std(aucs):.3f} over {len(aucs)} seed(s)")
    extended_best = fixed_recipe("vgg16", ext["unfreeze"], BASE)
    biotune_best = fixed_recipe("vgg16", 0, BASE) | best["biotune"]["block_rates"]
    plot_block_rates(thesis_recipes("vgg16", BASE) + [("best extended", extended_best),
                                                      ("best biotune", biotune_best)],
                     ["block1", "block2", "block3", "block4", "block5"], args.work / "block_rates.png", base_lr=BASE)
    atomic_write_text(args.work / "compare.json", json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.work / 'compare.json'}")


if __name__ == "__main__":
    main()
