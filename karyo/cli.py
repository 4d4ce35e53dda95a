"""The ``karyo`` command line: it parses arguments and calls the library, nothing more.

Every command explains itself with ``--help``. A mistake in the input (a missing file, a bad
value, an unreadable image) ends with one line on standard error naming the file or value and
a non-zero exit status; ``--debug`` shows the full traceback instead.
"""

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

from karyo import __version__
from karyo.errors import KaryoError

EPILOG = "Run 'karyo COMMAND --help' for the options of a command."


class Parser(argparse.ArgumentParser):
    """argparse with karyo's error format: one ``karyo: error:`` line naming the value, exit 2.

    argparse's own format (the usage, then ``karyo train: error: ...``) takes several lines;
    every other bad input prints one.
    """

    def error(self, message):
        self.exit(2, f"karyo: error: {message} (see '{self.prog} --help')\n")


def _add_distribute_argument(p):
    # The choices are karyo.experiments.fit.DISTRIBUTE_CHOICES, repeated here so that --help
    # does not import TensorFlow.
    p.add_argument("--distribute", choices=("none", "mirrored", "multi-worker"), default="none",
                   help="train on several devices with TensorFlow's own strategies: mirrored (the GPUs of "
                   "this machine) or multi-worker (several machines, each run with its TF_CONFIG); "
                   "see README, Scaling out")


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be positive")
    return value


def _non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must not be negative")
    return value


def _fraction(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} must lie between 0 and 1")
    return value


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} must be positive")
    return value


def _quiet_tensorflow(debug=False, import_now=True):
    """Keep TensorFlow's C++ start-up chatter (CUDA stubs, CPU features, oneDNN notices) off the
    terminal, where it would hide the progress bars and the one-line errors users should see.

    ``TF_CPP_MIN_LOG_LEVEL`` silences the messages logged once TensorFlow runs, but the shared
    libraries print a few lines while they load, before any setting is read; so TensorFlow is
    imported here with the standard-error descriptor pointed at ``/dev/null`` for the duration
    of the import (Python's own exceptions are raised after it is restored). ``--debug`` keeps
    everything visible.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if import_now and not debug and "tensorflow" not in sys.modules:
        saved = os.dup(2)
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            sys.stderr.flush()
            os.dup2(null, 2)
            import tensorflow  # noqa: F401
        except ImportError:
            pass  # the command that needs it says so, with the real message
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(null)
    import logging

    # tf.function retracing notices are about Keras internals, not about the user's data.
    logging.getLogger("tensorflow").setLevel(logging.ERROR)


def _quiet_opencv(debug=False):
    """Keep OpenCV's C++ log off the terminal: it reports a failed decode in several lines
    ("[ERROR:0@0.007] global grfmt_tiff.cpp:117 TIFF_Error ..."), and karyo names the same file
    in one line of its own. Read when ``cv2`` is first imported; ``--debug`` keeps the log."""
    if not debug:
        os.environ.setdefault("OPENCV_LOG_LEVEL", "OFF")


# ---------------------------------------------------------------------------------- data


def cmd_data_import(args):
    from karyo.data.manifest import import_folder, read_manifest

    out = import_folder(args.folder, args.out, with_sha256=not args.no_sha256)
    manifest = read_manifest(out)
    counts = Counter(row["label"] for row in manifest.rows)
    summary = ", ".join(f"{counts[label]} {label}" for label in manifest.labels)
    print(f"wrote {out}: {len(manifest)} images ({summary})")
    return 0


def cmd_data_verify(args):
    from karyo.data.manifest import verify_manifest

    labels = tuple(args.labels.split(",")) if args.labels else None
    problems = verify_manifest(
        args.manifest, root=args.root, labels=labels, check_images=not args.no_decode,
        progress=not args.quiet,
    )
    for name, reason in problems:
        print(f"{name}: {reason}")
    if problems:
        print(f"karyo: error: {args.manifest}: {len(problems)} bad row(s), listed above", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"{args.manifest}: every row is sound")
    return 0


def add_data_commands(sub):
    data = sub.add_parser(
        "data", help="make, import, check and augment datasets (manifests)",
        description="Datasets are CSV manifests (path,label,group[,karyotype,sha256,split,...]) "
        "whose paths are relative to the manifest's folder.", epilog=EPILOG,
    )
    dsub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)

    p = dsub.add_parser(
        "import", help="turn class sub-folders into a manifest",
        description="Turn class sub-folders (normal/, abnormal/ or any class names) of FOLDER into "
        "a manifest with sha256 of every file. Each image becomes its own group: edit the group "
        "column if several images come from one patient.",
    )
    p.add_argument("--folder", required=True, type=Path, help="folder with one sub-folder per class")
    p.add_argument("--out", required=True, type=Path, help="manifest CSV to write (inside FOLDER)")
    p.add_argument("--no-sha256", action="store_true", help="skip hashing (faster, less provable)")
    p.set_defaults(func=cmd_data_import)

    p = dsub.add_parser(
        "verify", help="check every row of a manifest",
        description="Check every row: the file exists inside the root, decodes as an image, matches "
        "its sha256 and has a known label; no duplicate paths. Prints one line per bad row and exits "
        "0 only if every row is sound.",
    )
    p.add_argument("manifest", type=Path, help="manifest CSV")
    p.add_argument("--root", type=Path, help="folder the paths are relative to (default: the manifest's)")
    p.add_argument("--labels", help="comma-separated allowed labels (default: normal,abnormal, or the "
                   "24 chromosome classes when every label is one)")
    p.add_argument("--no-decode", action="store_true",
                   help="do not decode images (existence and sha256 only)")
    p.add_argument("--quiet", action="store_true", help="print bad rows only")
    p.set_defaults(func=cmd_data_verify)
    add_data_generators(dsub)
    return data


def cmd_data_synth(args):
    from karyo.karyograms.synth import synthesize

    out = synthesize(args.out, normal=args.normal, abnormal=args.abnormal, size=args.size,
                     seed=args.seed, stain=args.stain, variants=args.variants, progress=True,
                     layout=args.layout)
    print(f"wrote {out}")
    return 0


def cmd_data_assemble(args):
    from karyo.karyograms.assemble import assemble_cells

    out = assemble_cells(args.cells, args.out, size=args.size,
                         include_uncertain=args.include_uncertain, progress=True, layout=args.layout,
                         clean=args.clean_crops)
    print(f"wrote {out}")
    return 0


def cmd_data_chromosomes(args):
    from karyo.karyograms.assemble import chromosome_manifest

    out = chromosome_manifest(args.cells, args.out, size=args.size, progress=True)
    print(f"wrote {out}")
    return 0


def cmd_data_augment(args):
    from karyo.data.augment import augment_manifest
    from karyo.karyograms.pair_augment import augment_pairs

    out = augment_manifest(args.manifest, args.out, normal=args.normal, abnormal=args.abnormal,
                           brightness=args.brightness, noise=args.noise, blur=args.blur,
                           seed=args.seed, root=args.root, progress=True,
                           transform=augment_pairs if args.per_pair else None)
    print(f"wrote {out}")
    return 0


def add_data_generators(dsub):
    p = dsub.add_parser(
        "synth", help="render synthetic G-banded karyograms (the embedded default dataset)",
        description="Render karyograms from the UCSC hg38 cytoband table shipped with karyo: 22 "
        "autosome pairs and the sex chromosomes in the standard layout, with pair numbers. Normal "
        "cells are 46,XX or 46,XY; abnormal ones carry trisomies, sex-chromosome aneuploidies, "
        "cri-du-chat del(5)(p14) or the Philadelphia t(9;22). The defaults are the thesis' "
        "alpha-dataset: 105 normal and 41 abnormal karyograms at 416x416.",
    )
    p.add_argument("--out", required=True, type=Path, help="folder to create (manifest.csv + images)")
    p.add_argument("--normal", type=_non_negative_int, default=105, help="normal karyograms (105)")
    p.add_argument("--abnormal", type=_non_negative_int, default=41, help="abnormal karyograms (41)")
    p.add_argument("--size", type=_positive_int, default=416, help="image side in pixels (416)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    p.add_argument("--stain", choices=("g", "q"), default="g",
                   help="g: G-banding (dark bands on white); q: Q-banding (bright on dark)")
    p.add_argument("--layout", choices=("standard", "compact"), default="standard",
                   help="standard: pair numbers under the slots, as printed (default); compact: thin margins and "
                   "gaps, no numbers, so chromosomes are drawn larger at the same size (the thesis' future work, 5.3)")
    p.add_argument("--variants", action="store_true",
                   help="add inv(9)(p12q13), a common normal variant, among the normal cells")
    p.set_defaults(func=cmd_data_synth)

    p = dsub.add_parser(
        "assemble", help="lay each cell's chromosome crops out as an ordered karyogram",
        description="Assemble real karyograms from segmented chromosome crops "
        "(CELLS/cells/<cell>/<k>/<i>.png with k = 1..22, 23 = X, 24 = Y, and CELLS/cells.csv), in "
        "the standard layout (rows 1-5 / 6-12 / 13-18 / 19-22,X,Y). group = case, so splits never "
        "share a patient.",
    )
    p.add_argument("--cells", required=True, type=Path, help="the set's folder (holds cells/ and cells.csv)")
    p.add_argument("--out", required=True, type=Path, help="folder to create (manifest.csv + images)")
    p.add_argument("--size", type=_positive_int, default=416, help="image side in pixels (416)")
    p.add_argument("--include-uncertain", action="store_true",
                   help="keep cells labelled 'uncertain' (irregular chromosome counts)")
    p.add_argument("--layout", choices=("standard", "compact"), default="standard",
                   help="standard: pair numbers under the slots (default); compact: thin margins and gaps, no "
                   "numbers, chromosomes drawn larger (the thesis' future work, 5.3)")
    p.add_argument("--clean-crops", action="store_true",
                   help="the crops are raw bounding boxes cut from the metaphase (another laboratory's export): "
                   "erase pieces of neighbouring chromosomes and stretch pale chromosomes before the layout")
    p.set_defaults(func=cmd_data_assemble)

    p = dsub.add_parser(
        "chromosomes", help="single-chromosome manifest (24 classes) for two-step transfer",
        description="Write a manifest of single chromosome crops labelled 1..22, X, Y (group = "
        "case): the intermediate task of two-step transfer learning.",
    )
    p.add_argument("--cells", required=True, type=Path, help="the set's folder (holds cells/ and cells.csv)")
    p.add_argument("--out", required=True, type=Path, help="folder to create (manifest.csv + crops)")
    p.add_argument("--size", type=_positive_int, default=None, help="pad to square and resize to this side")
    p.set_defaults(func=cmd_data_chromosomes)

    p = dsub.add_parser(
        "augment", help="the thesis' augmentation: brightness, noise, blur; never geometry",
        description="Offline, order-preserving augmentation (thesis 3.1.2): brightness within "
        "+-25 %, noise on up to 5 % of the pixels, optional blur; never flips, rotations, crops "
        "or shears, because a karyogram's layout is its meaning. Classes are balanced as the thesis "
        "did (105/41 -> 376/316, scaled to the input's size). Copies keep their source's group.",
    )
    p.add_argument("manifest", type=Path, help="manifest CSV to augment")
    p.add_argument("--out", required=True, type=Path, help="folder to create (manifest.csv + images)")
    p.add_argument("--normal", type=_non_negative_int, help="normal images wanted (originals included)")
    p.add_argument("--abnormal", type=_non_negative_int, help="abnormal images wanted (originals included)")
    p.add_argument("--brightness", type=_fraction, default=0.25, help="largest brightness change (0.25)")
    p.add_argument("--noise", type=_fraction, default=0.05, help="largest share of noisy pixels (0.05)")
    p.add_argument("--blur", type=float, default=0.0, help="largest Gaussian blur sigma in pixels (0: off)")
    p.add_argument("--per-pair", action="store_true",
                   help="also rotate (up to 8 degrees), mirror and shift each chromosome pair inside its slot, "
                   "keeping the layout (the thesis' future work, 5.3; karyograms in karyo's layout)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    p.add_argument("--root", type=Path, help="folder the manifest's paths are relative to")
    p.set_defaults(func=cmd_data_augment)


# ---------------------------------------------------------------------------------- models


def cmd_list(args):
    from karyo.experiments.registry import list_experiments

    experiments = list_experiments(args.family)
    width = max(len(e.name) for e in experiments)
    current = None
    for e in experiments:
        if e.family != current:
            current = e.family
            print("Thesis Table 5.1 rows:" if current == "thesis" else "\nBeyond the thesis:")
        if e.kind == "detector":
            print(f"  {e.name:<{width}}  {e.title} (grouped protocol)")
            continue
        unfreeze = {0: "frozen backbone", "all": "entire network trained"}.get(
            e.unfreeze, f"last {e.unfreeze} block(s) trained")
        data = "augmented" if e.augmented else "original"
        ref = ""
        if e.thesis:
            t = e.thesis
            ref = f"  [thesis: acc {t.accuracy:.2f} prec {t.precision:.2f} rec {t.recall:.2f} AUC {t.auc:.2f}]"
        print(f"  {e.name:<{width}}  {e.backbone}, {data} data, {unfreeze}, {e.weights} weights, "
              f"{e.uncertainty}{ref}")
    return 0


def _load_hyperparameters(path):
    import json

    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise KaryoError(f"{path}: hyperparameter file not found") from None
    except json.JSONDecodeError as exc:
        raise KaryoError(f"{path}: not valid JSON ({exc.msg})") from None
    values = data.get("hyperparameters", data)
    allowed = {"lr", "batch_size", "dropout", "unfreeze", "dense_units"}
    return {k: v for k, v in values.items() if k in allowed}


def cmd_train(args):
    from karyo.experiments.fit import distribution_strategy
    from karyo.experiments.registry import get_experiment
    from karyo.experiments.training import train_experiment

    strategy = distribution_strategy(args.distribute)  # first: a multi-worker one must precede other TF work
    overrides = _load_hyperparameters(args.hyperparameters)
    fine_tune_epochs = args.fine_tune_epochs if args.fine_tune_epochs is not None else args.epochs
    overrides.update({k: v for k, v in {
        "epochs": args.epochs, "fine_tune_epochs": fine_tune_epochs,
        "image_size": args.image_size, "batch_size": args.batch_size, "lr": args.lr,
        "weights": args.weights, "ensemble": args.ensemble, "mc_passes": args.mc,
        "threshold": args.threshold, "per_pair": args.per_pair,
    }.items() if v is not None})
    experiment = get_experiment(args.experiment, **overrides)
    run = train_experiment(experiment, args.data, args.out, protocol=args.split, seed=args.seed,
                           resume=args.resume, root=args.root, cache_dir=args.cache,
                           class_weight=args.class_weight, verbose=1 if args.verbose else 2,
                           strategy=strategy)
    _print_metrics(run)
    return 0


def _print_metrics(run):
    import json

    metrics = json.loads((Path(run) / "metrics.json").read_text())
    keys = ("accuracy", "precision", "recall", "auc", "referral_rate", "retained_accuracy")
    shown = "  ".join(f"{k} {metrics[k]:.3f}" for k in keys if metrics.get(k) is not None)
    print(f"{run}: {shown}")


def cmd_evaluate(args):
    from karyo.experiments.runs import evaluate_run

    evaluate_run(args.run, passes=args.mc, threshold=args.threshold, seed=args.seed)
    _print_metrics(args.run)
    if args.by_group:
        from karyo.experiments.cases import CASE_METRICS_FILE, evaluate_by_group

        cases = evaluate_by_group(args.run, min_repeats=args.min_repeats, structural_cells=args.structural_cells)
        keys = ("accuracy", "recall", "false_positive_rate", "auc", "referral_rate")
        shown = "  ".join(f"{k} {cases[k]:.3f}" for k in keys if cases.get(k) is not None)
        print(f"{args.run} by case ({cases['n_cases']} cases, {cases['abnormal_cases']} abnormal): {shown}")
        print(f"wrote {Path(args.run) / CASE_METRICS_FILE}")
    return 0


def cmd_predict(args):
    from karyo.experiments.runs import predict_paths
    from karyo.uncertainty.confidence import write_predictions

    explain = None
    if args.explain:
        explain = args.out.parent if args.out else Path(".")
    rows, problems = predict_paths(args.model, args.paths, passes=args.mc, threshold=args.threshold,
                                   seed=args.seed, explain=explain, clean_crops=args.clean_crops)
    for path, reason in problems:
        print(f"karyo: skipped {path}: {reason}", file=sys.stderr)
    if rows:
        width = min(60, max(len(r["path"]) for r in rows))
        print(f"{'karyogram':<{width}}  {'prediction':<10}  confidence  mean_prob  decision")
        for r in rows:
            decision = "refer to manual review" if r["refer"] else "accept"
            print(f"{r['path'][-width:]:<{width}}  {r['pred_label']:<10}  {r['confidence']:>10.0%}  "
                  f"{r['mean_prob']:>9.3f}  {decision}")
        if args.out:
            write_predictions(args.out, rows)
            print(f"wrote {args.out}")
        if explain is not None:
            print(f"wrote {explain / 'explanations.csv'} and {len(rows)} picture(s) in {explain / 'explain'}")
    return 1 if problems else 0


def add_model_commands(sub):
    p = sub.add_parser("list", help="the experiment registry",
                       description="List every registered experiment: the seven rows of the "
                       "thesis' Table 5.1 (with its published numbers) and the runs beyond it.")
    p.add_argument("--family", choices=("thesis", "beyond"), help="only one family")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser(
        "train", help="train an experiment into a run folder",
        description="Train a registered experiment (see 'karyo list') on a manifest, then evaluate "
        "its test split with MC Dropout. Defaults are the thesis': 416x416 input, Adam lr 1e-3, "
        "batch 16, 64/16/20 split, 100 MC passes, 80 % referral threshold. The run folder gets "
        "config.json, history.csv, model.keras, predictions.csv, metrics.json, figures/ and "
        "TensorBoard logs.",
    )
    p.add_argument("experiment", help="experiment name, e.g. vgg16_augmented")
    p.add_argument("--data", required=True, type=Path, help="manifest CSV (labels normal/abnormal)")
    p.add_argument("--out", required=True, type=Path, help="run folder to create")
    p.add_argument("--root", type=Path, help="folder the manifest's paths are relative to")
    p.add_argument("--split", choices=("grouped", "thesis"), default="grouped",
                   help="grouped: split by group, augment the training part only (default); "
                   "thesis: augment then split per image, as published (leaky)")
    p.add_argument("--epochs", type=_positive_int,
                   help="epochs of each phase: head training, and fine-tuning unless --fine-tune-epochs (30)")
    p.add_argument("--fine-tune-epochs", type=_non_negative_int, help="epochs after unfreezing (30)")
    p.add_argument("--image-size", type=_positive_int, help="input side in pixels (416)")
    p.add_argument("--batch-size", type=_positive_int, help="batch size (16)")
    p.add_argument("--lr", type=_positive_float, help="learning rate (1e-3)")
    p.add_argument("--weights", help="imagenet | none | auto | chromosome | path to a weights file "
                   "(auto: ImageNet when obtainable, else chromosome)")
    p.add_argument("--hyperparameters", type=Path, help="best.json from 'karyo tune'")
    p.add_argument("--ensemble", type=_positive_int, help="train a deep ensemble of this many members")
    p.add_argument("--per-pair", action="store_true", default=None,
                   help="also rotate, mirror and shift each chromosome pair inside its slot in the augmented "
                   "copies (the thesis' future work, 5.3; karyograms in karyo's layout; augmented experiments)")
    p.add_argument("--class-weight", choices=("none", "balanced"), default=None,
                   help="weigh classes by inverse frequency")
    p.add_argument("--mc", type=_positive_int, help="MC Dropout passes at evaluation (100)")
    p.add_argument("--threshold", type=_fraction, help="referral threshold on the confidence (0.8)")
    p.add_argument("--seed", type=int, default=0, help="seed of split, augmentation and weights")
    p.add_argument("--cache", type=Path, help="feature cache folder ($KARYO_CACHE or ~/.cache/karyo)")
    p.add_argument("--resume", action="store_true", help="continue a killed run in --out")
    _add_distribute_argument(p)
    p.add_argument("--verbose", action="store_true", help="per-batch progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "evaluate", help="re-evaluate a run's test split with MC Dropout",
        description="Evaluate a trained run's test split again (e.g. with another number of MC "
        "passes or another referral threshold) and rewrite its predictions, metrics and figures.",
    )
    p.add_argument("run", type=Path, help="run folder written by 'karyo train'")
    p.add_argument("--mc", type=_positive_int, default=100, help="MC Dropout passes (100)")
    p.add_argument("--threshold", type=_fraction, default=0.8, help="referral threshold (0.8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the dropout masks")
    p.add_argument("--by-group", action="store_true",
                   help="also combine the cells of each case (the manifest's group) into one call: abnormal "
                   "when a count change repeats in --min-repeats accepted abnormal cells (every cell of a "
                   "smaller case) or a structural change (abnormal call without a count change) is seen in "
                   "--structural-cells cells; writes predictions_by_group.csv and metrics_by_group.json "
                   "beside the per-cell files")
    p.add_argument("--min-repeats", type=_positive_int, default=2,
                   help="cells that must share a count change for --by-group (2)")
    p.add_argument("--structural-cells", type=_positive_int, default=1,
                   help="cells that must show a structural change for --by-group (1)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "predict", help="score new karyograms with a trained run",
        description="Score karyogram files or folders with a trained run: majority label of the MC "
        "passes, confidence (share of votes), mean probability of abnormal, and whether to refer the "
        "case to manual review. With a karyotype_detector run, a cell folder of chromosome crops "
        "(CELL/<k>/*.png, k = 1..22, 23 = X, 24 = Y), or a folder of such cells, is laid out as a "
        "karyogram on the fly (as 'karyo data assemble' does, 416 px) and scored. Unreadable files and "
        "malformed cell folders are reported and skipped; the exit status is 1 if any input was bad.",
    )
    p.add_argument("--model", required=True, type=Path, help="run folder written by 'karyo train'")
    p.add_argument("paths", nargs="+", type=Path, help="image files, folders of images, or cell folders of crops")
    p.add_argument("--mc", type=_positive_int, default=100, help="MC Dropout passes (100)")
    p.add_argument("--threshold", type=_fraction, default=0.8, help="referral threshold (0.8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the dropout masks")
    p.add_argument("--out", type=Path, help="write the predictions as CSV")
    p.add_argument("--explain", action="store_true",
                   help="karyotype_detector runs: beside --out (or in the current folder) write "
                   "explain/<name>.png, each karyogram with its slots coloured by P(slot abnormal) and the "
                   "top reasons in words ('slot 21: 3 chromosomes (expected 2)'), explanations.csv (the "
                   "reasons as text) and slot_probabilities.csv")
    p.add_argument("--clean-crops", action="store_true",
                   help="cell folders hold raw bounding boxes cut from the metaphase (another laboratory's export): "
                   "erase pieces of neighbouring chromosomes and stretch pale chromosomes before the layout")
    p.set_defaults(func=cmd_predict)


def cmd_tune(args):
    from karyo.experiments.tuning import tune

    best = tune(args.data, args.out, backbone=args.backbone, max_trials=args.max_trials,
                epochs=args.epochs, image_size=args.image_size, weights=args.weights,
                space=args.space, seed=args.seed, root=args.root, cache_dir=args.cache,
                overwrite=args.overwrite, protocol=args.split, verbose=1 if args.verbose else 0,
                oracle=args.oracle)
    if best.get("role") == "worker":
        print(f"worker {best.get('tuner_id')} ran {best.get('completed_trials', 0)} trial(s) "
              f"({best.get('failed_trials', 0)} failed); the chief writes {Path(args.out) / 'best.json'}")
        return 0
    hp = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                   for k, v in best["hyperparameters"].items())
    if args.space == "biotune":
        hp = ", ".join(f"{b} at {r:.2g}" for b, r in best["block_rates"].items()) or "no block (the head only)"
    print(f"best of {best.get('completed_trials', '?')} trials: {hp} (val loss {best['val_loss']:.4f})")
    print(f"wrote {Path(args.out) / 'best.json'}; use it with: karyo train EXPERIMENT --hyperparameters "
          f"{Path(args.out) / 'best.json'} ...")
    return 0


def add_tune_command(sub):
    p = sub.add_parser(
        "tune", help="Bayesian search over learning rate and batch size (keras-tuner)",
        description="Bayesian optimisation (keras-tuner) of the learning rate (log-uniform) and the "
        "batch size, objective validation loss, as in thesis section 3.2 (which chose lr 1e-3 and "
        "batch 16). Trials on a frozen backbone train the head on cached features. Rerunning the "
        "same command resumes the search; --overwrite starts afresh. Writes DIR/trials.csv, "
        "DIR/best.json and the thesis' figures in DIR/figures. --space biotune searches which blocks to "
        "fine-tune and at which rates, as BioTune does (docs/biotune.md). For a distributed search, see the "
        "README (keras-tuner's chief/worker environment variables).",
    )
    p.add_argument("--data", required=True, type=Path, help="manifest CSV (labels normal/abnormal)")
    p.add_argument("--out", required=True, type=Path, help="search folder")
    p.add_argument("--root", type=Path, help="folder the manifest's paths are relative to")
    p.add_argument("--backbone", default="vgg16", help="backbone (vgg16)")
    p.add_argument("--max-trials", type=_positive_int, default=20, help="trials (20)")
    p.add_argument("--epochs", type=_positive_int, default=10, help="epochs per trial (10)")
    p.add_argument("--image-size", type=_positive_int, default=416, help="input side in pixels (416)")
    p.add_argument("--weights", default="imagenet", help="imagenet | none | auto | chromosome | weights file")
    p.add_argument("--space", choices=("thesis", "extended", "biotune"), default="thesis",
                   help="thesis: lr and batch size; extended: also unfrozen blocks and dropout; biotune: "
                   "BioTune's genome, one gene per backbone block and a threshold gene: any subset of "
                   "blocks fine-tunes (gene > threshold), each at 1e-5 * 10^(2(gene - 0.5)), after the head")
    p.add_argument("--oracle", choices=("bayesian", "evolution"),
                   help="how trials are chosen: bayesian (keras-tuner's Gaussian process) or evolution (a "
                   "genetic algorithm, as BioTune: 6 random trials, then children of the best 6 by "
                   "crossover and mutation). Default: evolution for --space biotune, bayesian otherwise")
    p.add_argument("--split", choices=("grouped", "thesis"), default="grouped", help="split protocol")
    p.add_argument("--seed", type=int, default=0, help="seed")
    p.add_argument("--cache", type=Path, help="feature cache folder")
    p.add_argument("--overwrite", action="store_true", help="start the search afresh")
    p.add_argument("--verbose", action="store_true", help="per-epoch output")
    p.set_defaults(func=cmd_tune)


# ---------------------------------------------------------------------------------- reproduce


def cmd_reproduce(args):
    from karyo.experiments.reproduce import reproduce

    experiments = args.experiments.split(",") if args.experiments else None
    protocols = args.protocols.split(",") if args.protocols else None
    reproduce(args.out, preset=args.preset, data=args.data, root=args.root, seed=args.seed,
              experiments=experiments, protocols=protocols, tune=not args.no_tune,
              weights=args.weights, seeds=args.seeds, verbose=1 if args.verbose else 0)
    return 0


def cmd_report(args):
    from karyo.experiments.report import write_report

    print(f"wrote {write_report(args.dir)}")
    return 0


def add_reproduce_commands(sub):
    p = sub.add_parser(
        "reproduce", help="run the thesis' experiments end to end and write a report",
        description="Reproduce the thesis: with no --data, render the synthetic alpha-dataset "
        "(105 normal + 41 abnormal karyograms); run the Bayesian search over learning rate and "
        "batch size; train and evaluate the seven rows of Table 5.1 under both split protocols "
        "(thesis: augment then split, as published; grouped: split by group, augment the training "
        "part only); write DIR/report.md and report.html beside the published numbers. A rerun on "
        "the same --out skips what already finished.",
    )
    p.add_argument("--preset", choices=("quick", "thesis", "tiny"), default="quick",
                   help="quick: small inputs and few epochs, minutes on a CPU (default); thesis: "
                   "416x416, the thesis' epochs, ImageNet weights (a GPU run); tiny: seconds, for tests")
    p.add_argument("--data", type=Path, help="karyogram manifest (default: synthetic alpha-dataset)")
    p.add_argument("--root", type=Path, help="folder the manifest's paths are relative to")
    p.add_argument("--out", type=Path, default=Path("karyo-reproduce"), help="output folder (karyo-reproduce)")
    p.add_argument("--experiments", help="comma-separated subset of experiments (default: the seven rows)")
    p.add_argument("--protocols", help="comma-separated subset of thesis,grouped (default: both)")
    p.add_argument("--no-tune", action="store_true", help="skip the Bayesian search")
    p.add_argument("--weights", choices=("imagenet", "chromosome", "auto", "none"),
                   help="starting weights instead of the preset's: imagenet (downloaded), chromosome "
                   "(karyo's chromosome-pretrained backbone, built on first use), auto (imagenet when "
                   "obtainable, else chromosome) or none (random, said so in the report)")
    p.add_argument("--seed", type=int, default=0, help="seed of data, splits, weights and dropout")
    p.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="run every row with N seeds (--seed, --seed+1, ...), each its own split; the "
                   "report adds each row's mean ± sd (default 1). Seeds after the first go to DIR/seeds/")
    p.add_argument("--verbose", action="store_true",
                   help="per-epoch training output, download messages and every warning in full")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("report", help="rebuild the report from run folders without training",
                       description="Rebuild DIR/report.md and report.html from the run folders "
                       "under DIR/runs (written by 'karyo reproduce').")
    p.add_argument("dir", type=Path, help="output folder of 'karyo reproduce'")
    p.set_defaults(func=cmd_report)


# ---------------------------------------------------------------------------------- real data


def cmd_transfer(args):
    from karyo.experiments.fit import distribution_strategy
    from karyo.experiments.transfer import two_step

    strategy = distribution_strategy(args.distribute)  # first: a multi-worker one must precede other TF work
    comparison = two_step(args.intermediate, args.target, args.out, experiment=args.experiment,
                          weights=args.weights, intermediate_size=args.intermediate_size,
                          image_size=args.image_size, epochs=args.epochs,
                          fine_tune_epochs=args.fine_tune_epochs, intermediate_epochs=args.intermediate_epochs,
                          intermediate_unfreeze=args.intermediate_unfreeze, mc_passes=args.mc, seed=args.seed,
                          protocol=args.split, verbose=1 if args.verbose else 0, strategy=strategy)
    print(f"wrote {comparison}")
    return 0


def cmd_cross_stain(args):
    import json

    from karyo.experiments.transfer import cross_stain

    result = cross_stain(args.run, args.manifest, root=args.root, passes=args.mc, threshold=args.threshold,
                         seed=args.seed)
    print(json.dumps(result, indent=2))
    return 0


def cmd_bench(args):
    from karyo.bench.suite import format_bench, run_bench

    result = run_bench(quick=args.quick, out=args.out, progress=True, sections=args.section)
    print(format_bench(result))
    if args.out:
        print(f"wrote {args.out}")
    return 0


def add_real_data_commands(sub):
    p = sub.add_parser(
        "transfer", help="two-step vs one-step transfer learning on a karyogram target",
        description="Two-step transfer (ImageNet -> a 24-class single-chromosome task -> the karyogram task) "
        "against one-step transfer, with the same experiment, seed and split. The intermediate manifest "
        "comes from 'karyo data chromosomes', the target from 'karyo data assemble'. Writes "
        "DIR/comparison.json and comparison.md.",
    )
    p.add_argument("--intermediate", required=True, type=Path, help="chromosome manifest (24 classes)")
    p.add_argument("--target", required=True, type=Path, help="karyogram manifest (normal/abnormal)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--experiment", default="vgg16_augmented", help="karyogram experiment of both arms")
    p.add_argument("--weights", default="auto", help="starting weights: imagenet | none | auto")
    p.add_argument("--intermediate-size", type=_positive_int, default=32, help="chromosome image side (32)")
    p.add_argument("--intermediate-epochs", type=_positive_int, default=3, help="epochs of the intermediate task")
    p.add_argument("--intermediate-unfreeze", default="all", help="blocks fine-tuned on chromosomes (all)")
    p.add_argument("--image-size", type=_positive_int, help="karyogram image side")
    p.add_argument("--epochs", type=_positive_int, help="karyogram head epochs")
    p.add_argument("--fine-tune-epochs", type=_non_negative_int, help="karyogram fine-tuning epochs")
    p.add_argument("--mc", type=_positive_int, help="MC Dropout passes (100)")
    p.add_argument("--split", choices=("grouped", "thesis"), default="grouped", help="split protocol")
    p.add_argument("--seed", type=int, default=0, help="seed of both arms")
    _add_distribute_argument(p)
    p.add_argument("--verbose", action="store_true", help="per-epoch output")
    p.set_defaults(func=cmd_transfer)

    p = sub.add_parser(
        "cross-stain", help="score a trained run on another set (e.g. Q-band karyograms)",
        description="Score a trained karyogram run on another set and print its false-positive rate, referral "
        "rate and, when both labels are present, recall and AUC. For an all-normal set (BioImLab Q-band) every "
        "abnormal call is a false positive.",
    )
    p.add_argument("run", type=Path, help="run folder written by 'karyo train'")
    p.add_argument("manifest", type=Path, help="karyogram manifest to score")
    p.add_argument("--root", type=Path, help="folder the manifest's paths are relative to")
    p.add_argument("--mc", type=_positive_int, default=100, help="MC Dropout passes (100)")
    p.add_argument("--threshold", type=_fraction, default=0.8, help="referral threshold (0.8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the dropout masks")
    p.set_defaults(func=cmd_cross_stain)

    p = sub.add_parser(
        "bench", help="measure speed against the naive implementation",
        description="Benchmark on synthetic karyograms with random weights (offline): MC Dropout (T=100) vs "
        "one prediction and vs the naive loop, head training on cached features vs end to end, VGG16 with its "
        "last block unfrozen on cached block-4 output vs the full network, a tuning trial on cached features "
        "vs on images, backbone throughput at 416x416 against the machine's matmul GFLOP/s, chromosome "
        "pretraining's throughput in float32 and mixed_bfloat16 side by side, the karyotype detector's seconds "
        "per karyogram with T=100 MC passes (goal <= 1 s), the memory of predicting thousands of karyograms (full "
        "run only), the share of 'karyo reproduce' spent outside training, and the time to render the "
        "alpha-dataset. Ratios are medians of repeats with their spread.",
    )
    p.add_argument("--quick", action="store_true", help="fewer images and repeats (minutes on a CPU)")
    p.add_argument("--section", action="append",
                   help="measure only this section (repeatable): synth_render, backbone_throughput, mc_dropout, "
                   "head_training, unfreeze_last_block, tuner_trial, pretraining, detector, predict_memory, "
                   "reproduce_overhead")
    p.add_argument("--out", type=Path, help="write the figures as JSON")
    p.set_defaults(func=cmd_bench)


# ---------------------------------------------------------------------------------- main


# ---------------------------------------------------------------------------------- pretraining


def cmd_pretrain(args):
    from karyo.models.backbones import get_backbone
    from karyo.experiments.pretrain import pretrain

    backbone = get_backbone(args.backbone).name
    out = args.out or Path(f"pretrained-{backbone}")
    kwargs = {"n_synthetic": args.n_synthetic} if args.n_synthetic is not None else {}
    if args.epochs is not None:
        kwargs["epochs"] = args.epochs
    pretrain(backbone, out, image_size=args.image_size, karyogram_size=args.karyogram_size,
             data=args.data, seed=args.seed, stain=args.stain, precision=args.precision,
             verbose=1 if args.verbose else 0, **kwargs)
    card = json.loads((Path(out) / "card.json").read_text(encoding="utf-8"))
    print(f"held-out accuracy {card['accuracy']:.3f}, Macro-F1 {card['macro_f1']:.3f} "
          f"({card['n_held_out']} crops, {card['seconds']:.0f} s)")
    print(f"wrote {out}; use it with: karyo train EXPERIMENT --weights {Path(out) / 'backbone.weights.h5'} "
          f"--image-size {card['karyogram_size']}")
    return 0


def add_pretrain_command(sub):
    p = sub.add_parser(
        "pretrain", help="pretrain a backbone on the 24-class chromosome task (offline)",
        description="Train a backbone from random weights to classify single chromosomes (1..22, X, Y): "
        "synthetic chromosomes rendered from the cytoband table, drawn at the scale they have in a "
        "karyogram of --karyogram-size pixels, plus real crops from 'karyo data chromosomes' manifests "
        "(split by case). Writes DIR/backbone.weights.h5 (for --weights FILE), card.json, "
        "predictions.csv and figures/. 'karyo train --weights chromosome' does this once by itself.",
    )
    p.add_argument("--backbone", required=True, help="registered backbone, e.g. vgg16 or inceptionv3")
    p.add_argument("--data", type=Path, nargs="+", metavar="MANIFEST",
                   help="chromosome manifests (karyo data chromosomes, best without --size)")
    p.add_argument("--out", type=Path, help="folder to create (pretrained-BACKBONE)")
    p.add_argument("--image-size", type=_positive_int,
                   help="crop side = backbone input (smallest that holds a chromosome 1)")
    p.add_argument("--karyogram-size", type=_positive_int, default=64,
                   help="side of the karyograms the weights are for; sets the drawing scale (64)")
    p.add_argument("--epochs", type=_positive_int, help="training epochs (6)")
    p.add_argument("--n-synthetic", type=_non_negative_int, help="synthetic training crops (2400)")
    p.add_argument("--stain", choices=("g", "q", "both"), default="both", help="synthetic stain (both)")
    p.add_argument("--precision", choices=("float32", "mixed_bfloat16"), default="mixed_bfloat16",
                   help="compute precision: mixed_bfloat16 (default) computes the convolutions in bfloat16, "
                        "about 1.5-2x faster on CPUs with bf16 units; float32 everywhere else")
    p.add_argument("--seed", type=int, default=0, help="seed of crops, split and weights")
    p.add_argument("--verbose", action="store_true", help="per-batch progress bars")
    p.set_defaults(func=cmd_pretrain)


def build_parser():
    parser = Parser(
        prog="karyo",
        description="Chromosome abnormality detection on karyograms: transfer learning (VGG16, "
        "InceptionV3, ...) decides normal or abnormal, Monte Carlo Dropout says how confident, and "
        "cases below the confidence threshold (80 %) are referred to manual review.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"karyo {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_data_commands(sub)
    add_model_commands(sub)
    add_tune_command(sub)
    add_reproduce_commands(sub)
    add_real_data_commands(sub)
    add_pretrain_command(sub)
    return parser


#: Commands that build or run networks, so import TensorFlow (the others start in a blink).
TENSORFLOW_COMMANDS = (cmd_train, cmd_evaluate, cmd_predict, cmd_tune, cmd_reproduce,
                       cmd_transfer, cmd_cross_stain, cmd_bench, cmd_pretrain)


def main(argv=None):
    """Entry point of the ``karyo`` console command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug is accepted anywhere on the line, not only before the command.
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args = parser.parse_args(argv)
    args.debug = debug
    _quiet_tensorflow(debug, import_now=getattr(args, "func", None) in TENSORFLOW_COMMANDS)
    _quiet_opencv(debug)
    try:
        return int(args.func(args) or 0)
    except KaryoError as exc:
        if args.debug:
            raise
        print(f"karyo: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("karyo: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`karyo list | head`): not an error of ours. Point stdout at
        # /dev/null so that Python's flush at exit does not complain a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:
        if args.debug:
            raise
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"karyo: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the last line of defence for a clean message
        if args.debug:
            raise
        print(
            f"karyo: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
