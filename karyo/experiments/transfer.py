"""Two-step transfer learning and cross-stain evaluation on real karyograms.

Two-step transfer (the Scientific Reports paper in ``../shared/seeds/000_...txt``): a network
starts from ImageNet (here ``auto``: ImageNet when obtainable), is trained on an intermediate
task close to the target, the 24-class classification of single chromosomes
(:mod:`karyo.experiments.chromosomes`), and only then on the target, the karyogram task. :func:`two_step`
runs both arms with the same experiment, seed and split:

* one-step: ``train_experiment(get_experiment(name, weights=<plain weights>), target)``;
* two-step: the same, with ``weights=<intermediate run>/model.keras`` (its backbone is copied).

Directions that make sense with the shared data: a Q-band (BioImLab) intermediate for the G-band
(gband612) karyogram target, and a G-band intermediate for the same G-band target (then the
intermediate task only sees the cases of the target's training part). A Q-band karyogram *target*
is impossible: BioImLab's 119 cells are all normal, so there is nothing to detect.

:func:`cross_stain` scores a trained karyogram run on other sets: assembled Q-band karyograms
(all normal: every positive call is a false positive) and synthetic ones (``karyo.karyograms.synth``).
"""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from karyo.atomic import atomic_write_text
from karyo.data.manifest import check_manifest, check_run_data, CHROMOSOME_LABELS, KARYOGRAM_LABELS, read_manifest
from karyo.data.splits import split_rows
from karyo.errors import KaryoError
from karyo.experiments.chromosomes import train_chromosome_classifier
from karyo.experiments.registry import get_experiment
from karyo.experiments.runs import predict_paths
from karyo.experiments.training import is_complete, train_experiment
from karyo.models.backbones import check_image_size
from karyo.uncertainty.metrics import markdown_table

#: Karyogram metrics set side by side for one-step and two-step runs.
COMPARED = ("accuracy", "precision", "recall", "auc", "f1", "specificity", "mcc", "ece",
            "referral_rate", "retained_accuracy", "tp", "fp", "tn", "fn")


def target_holdout_groups(target, protocol="grouped", seed=0, root=None):
    """Cases of the karyogram target's validation and test parts (by ``karyo.data.splits``).

    ``train_experiment`` splits the target the same way, so an intermediate task drawn from the
    same patients can leave these cases out and never see a test karyogram's chromosomes.
    Under the ``thesis`` protocol (per-image split after augmentation) every case may be held
    out somewhere, so all of them are returned.
    """

    rows = read_manifest(target, root).rows
    if protocol != "grouped":
        return sorted({r["group"] for r in rows})
    parts = split_rows(rows, "grouped", seed)
    return sorted({r["group"] for r, p in zip(rows, parts) if p != "train"})


def two_step(intermediate, target, out, experiment="vgg16_augmented", weights="auto",
             intermediate_size=32, image_size=None, epochs=None, fine_tune_epochs=None,
             intermediate_epochs=3, intermediate_unfreeze="all", patience=None, mc_passes=None,
             seed=0, protocol="grouped", cache_dir=None, target_root=None, intermediate_root=None,
             verbose=0, progress=True, log=print, strategy=None):
    """Two-step vs one-step transfer on a karyogram target; return ``out/comparison.json``.

    Args:
        intermediate: chromosome manifest of the intermediate task (``karyo data chromosomes``).
        target: karyogram manifest (``karyo data assemble``; normal / abnormal, group = case).
        out: folder for ``intermediate/``, ``one_step/``, ``two_step/`` and the comparison
            (reused on a rerun: finished runs are skipped).
        experiment: the registered karyogram experiment both arms train.
        weights: the plain starting weights (``imagenet``, ``none``, ``auto``) of the
            intermediate task and of the one-step arm.
        intermediate_size: chromosome image side (crops are small; VGG16 accepts 32).
        image_size, epochs, fine_tune_epochs, patience, mc_passes: overrides of the experiment.
        intermediate_epochs: head and fine-tuning epochs of the intermediate task.
        intermediate_unfreeze: blocks fine-tuned on chromosomes (``"all"`` by default: with a
            frozen backbone the hand-over would copy the starting weights unchanged).
        seed, protocol: the same for both arms (same split, same initial head).
        cache_dir: backbone feature cache (default ``out/cache``).
        strategy: a ``tf.distribute`` strategy every model is built and trained in (``None``: one device).

    Returns:
        path of ``comparison.json`` (also ``comparison.md``).
    """

    out = Path(out)
    exp = get_experiment(experiment, image_size=image_size, epochs=epochs,
                         fine_tune_epochs=fine_tune_epochs, patience=patience, mc_passes=mc_passes)
    check_inputs(intermediate, target, exp, intermediate_size, protocol, seed, target_root,
                 intermediate_root, progress)
    if out.exists() and not out.is_dir():
        raise KaryoError(f"{out}: exists and is not a folder; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cache_dir) if cache_dir else out / "cache"
    holdout = set(target_holdout_groups(target, protocol, seed, target_root))
    chrom_groups = {r["group"] for r in read_manifest(intermediate, intermediate_root).rows}
    excluded = sorted(holdout & chrom_groups)
    if excluded:
        log(f"intermediate task: leaving out {len(excluded)} case(s) of the target's val/test parts")

    log(f"intermediate task: 24 chromosome classes, {exp.backbone} {intermediate_size} px")
    inter = train_chromosome_classifier(
        intermediate, out / "intermediate", backbone=exp.backbone, image_size=intermediate_size,
        weights=weights, epochs=intermediate_epochs, unfreeze=intermediate_unfreeze, seed=seed,
        cache_dir=cache_dir, root=intermediate_root, exclude_groups=excluded, verbose=verbose,
        progress=progress, strategy=strategy)
    arms = {"one_step": replace(exp, weights=weights),
            "two_step": replace(exp, weights=str((inter / "model.keras").resolve()))}
    for arm, arm_exp in arms.items():
        run = out / arm
        if is_complete(run):
            log(f"{arm}: finished earlier, skipped")
            continue
        log(f"{arm}: {arm_exp.name} from weights {arm_exp.weights}")
        train_experiment(arm_exp, target, run, protocol=protocol, seed=seed, resume=run.exists(),
                         root=target_root, cache_dir=cache_dir, data_dir=out / "data",
                         verbose=verbose, progress=progress, strategy=strategy)
    return write_comparison(out)


def check_inputs(intermediate, target, exp, intermediate_size=32, protocol="grouped", seed=0,
                 target_root=None, intermediate_root=None, progress=False):
    """Refuse what two-step transfer cannot use before it trains (and writes) anything.

    Both manifests are checked row by row (labels, files, sha256, decoding; the karyogram
    target needs both classes), the target's split is drawn, and both image sizes are checked
    against the backbone, so that a bad target does not surface only after the intermediate
    task has trained.

    Raises:
        KaryoError: naming the manifest, file or value.
    """

    check_image_size(exp.backbone, intermediate_size)
    check_image_size(exp.backbone, exp.image_size)
    check_run_data(target, (protocol,), seed, exp.augmented, target_root, progress=progress)
    check_manifest(read_manifest(intermediate, intermediate_root), CHROMOSOME_LABELS, every_class=False,
                   progress=progress)


def write_comparison(out):
    """Write ``comparison.json`` and ``comparison.md`` from the runs in a two-step folder."""
    out = Path(out)
    inter = json.loads((out / "intermediate" / "metrics.json").read_text())
    inter_cfg = json.loads((out / "intermediate" / "config.json").read_text())
    result = {"intermediate": {"manifest": inter_cfg["manifest"], "accuracy": inter["accuracy"],
                               "macro_f1": inter["macro_f1"], "n_test": inter["n"],
                               "weights_used": inter_cfg["weights_used"],
                               "image_size": inter_cfg["image_size"],
                               "excluded_cases": inter_cfg["excluded_cases"]}}
    for arm in ("one_step", "two_step"):
        metrics = json.loads((out / arm / "metrics.json").read_text())
        config = json.loads((out / arm / "config.json").read_text())
        result[arm] = {k: metrics.get(k) for k in COMPARED}
        result[arm]["weights_used"] = config["weights_used"]
        result[arm]["recall_by_karyotype"] = metrics.get("recall_by_karyotype")
    atomic_write_text(out / "comparison.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "comparison.md", comparison_markdown(result) + "\n")
    return out / "comparison.json"


def comparison_markdown(result):
    """A two-step vs one-step table (markdown) from a ``comparison.json`` dict."""

    inter = result["intermediate"]
    lines = [f"Intermediate task (24 chromosome classes, {inter['image_size']} px, "
             f"{inter['n_test']} test crops): accuracy {inter['accuracy']:.3f}, "
             f"Macro-F1 {inter['macro_f1']:.3f}", ""]
    keys = [k for k in COMPARED if k not in ("tp", "fp", "tn", "fn")]
    rows = []
    for arm in ("one_step", "two_step"):
        r = result[arm]
        rows.append([arm.replace("_", "-")] + [_fmt(r.get(k)) for k in keys]
                    + [f"{r['tp']}/{r['fp']}/{r['tn']}/{r['fn']}"])
    lines.append(markdown_table(["arm"] + keys + ["TP/FP/TN/FN"], rows))
    return "\n".join(lines)


def _fmt(value):
    return "n/a" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))


def cross_stain(run_dir, manifest, root=None, passes=100, threshold=0.8, seed=0):
    """Score a trained karyogram run on another set; return its metrics dict.

    For an all-normal set (BioImLab Q-band) the numbers that matter are the false-positive rate
    (share called abnormal) and the referral rate (share below the confidence threshold). With
    both labels present (synthetic karyograms) recall and AUC are added.

    Args:
        run_dir: a finished run folder (``karyo train``).
        manifest: karyogram manifest of the set to score (labels normal / abnormal).
        passes, threshold: MC Dropout passes and referral threshold (thesis: 100, 0.8).

    Raises:
        KaryoError: a missing, changed (sha256) or unreadable image, or labels other than normal /
            abnormal.
    """
    from sklearn.metrics import roc_auc_score

    # Every row (label, file, sha256, decoding) before the model is loaded: a bad file fails in
    # a second, not after the others were scored.
    data = check_manifest(read_manifest(manifest, root), KARYOGRAM_LABELS, every_class=False)
    labels = [r["label"] for r in data.rows]
    paths = [data.resolve(r) for r in data.rows]
    rows, problems = predict_paths(run_dir, paths, passes=passes, threshold=threshold, seed=seed)
    if problems:
        raise KaryoError(f"{problems[0][0]}: {problems[0][1]}")
    y = np.array([lab == "abnormal" for lab in labels])
    called = np.array([r["pred_label"] == "abnormal" for r in rows])
    refer = np.array([bool(r["refer"]) for r in rows])
    prob = np.array([float(r["mean_prob"]) for r in rows])
    result = {"manifest": str(Path(manifest).resolve()), "n": len(rows),
              "n_normal": int((~y).sum()), "n_abnormal": int(y.sum()),
              "false_positive_rate": float(called[~y].mean()) if (~y).any() else None,
              "referral_rate": float(refer.mean()),
              "mean_prob_abnormal": float(prob.mean())}
    if y.any():
        result["recall"] = float(called[y].mean())
        result["accuracy"] = float((called == y).mean())
        result["auc"] = float(roc_auc_score(y, prob)) if (~y).any() else None
    return result
