"""Bayesian search over the learning rate and the batch size with keras-tuner (thesis 3.2).

The thesis ran a Bayesian optimisation of two hyperparameters, the learning rate and the batch
size, with the validation loss as objective, and plotted each against the validation loss,
coloured by validation accuracy (Figs. 3.3 and 3.4). It found learning rates in [7e-4, 3e-2]
to work, batch sizes of 16 or 32 to be best and 512 or more to run out of GPU memory, and chose
1e-3 and 16 for every later experiment. :func:`tune` repeats that search:

* keras-tuner's Bayesian optimisation (a Gaussian process over the completed trials;
  ``BayesianOptimization`` is ``keras_tuner.Tuner`` with ``BayesianOptimizationOracle``, which
  is how it is assembled here) over a :class:`KaryogramHyperModel`: the learning rate
  log-uniform in ``lr_range`` (default 1e-5 .. 1e-1), the batch size a choice of powers of two
  from 8 to 512 (those larger than the training set are left out), applied in
  ``HyperModel.fit``; objective ``val_loss``.
* ``space="extended"`` also searches how many of the backbone's last blocks to fine-tune
  (:func:`unfreeze_choices`) and the head's dropout rate: choosing what to fine-tune by search,
  as BioTune argues, instead of fixing it by hand as the thesis did in 4.3.
* ``space="biotune"`` searches BioTune's genome: a gene per block and a threshold gene choose
  which blocks fine-tune (any subset) and each one's learning rate
  (:mod:`karyo.models.selective`); its default oracle is a genetic algorithm
  (``oracle="evolution"``, :class:`karyo.experiments.tuner.EvolutionOracle`), which shares the
  Bayesian oracle's resume, failed-trial and distributed machinery. docs/biotune.md.
* A trial trains what ``karyo train`` would train with its hyperparameters, on the training
  split, and scores it on the validation split (the test split is never touched): the head on
  the frozen backbone's pooled features, which are computed once and cached on disk
  (:func:`karyo.models.features.cached_features`, shared with ``karyo train``), so a trial costs a head
  fit, not a backbone pass; with ``unfreeze`` = k > 0 the head is trained first and then the
  last k blocks with the head at ``FINE_TUNE_LEARNING_RATE`` on the cached output of the still
  frozen part. Each trial starts from the same seeded initialisation, so trials differ only by
  their hyperparameters. Models are not kept: retrain the best with ``karyo train``.

Outputs in ``out_dir``: ``trials.csv`` (one row per trial: its hyperparameters, the blocks it
fine-tuned and their rates, best-epoch validation loss and accuracy, status, seconds, the worker
that ran it and, for a failed trial, its error), ``best.json`` (the hyperparameters as ``karyo
train --hyperparameters`` reads them, under ``"hyperparameters"``; the best trial's blocks and
rates), ``figures/val_loss_vs_lr.png`` and ``figures/val_loss_vs_batch_size.png`` (and, for the
extended space, ``val_loss_vs_dropout.png`` and ``val_loss_vs_unfreeze.png``; for the biotune
space ``val_loss_vs_n_trained.png`` instead; for both, ``block_rates.png``: the best trials'
blocks and rates beside the thesis' fixed recipes), ``search.json`` (the settings the search was started with)
and keras-tuner's own project in ``out_dir/keras_tuner``.

Resuming. Rerunning :func:`tune` with the same arguments continues the search (keras-tuner's
``overwrite=False``): finished trials are kept, a trial interrupted by a kill is run again, and a
finished search adds no trials (a larger ``max_trials`` extends it). keras-tuner would silently
keep the old search space if the settings changed, so a rerun with other settings is refused
(``overwrite=True`` starts afresh). keras-tuner writes its state files in place; here they are
written atomically, and a trial that a kill left half-recorded is run again rather than lost.

Failures. A trial that raises (for example running out of memory at batch size 512, as in the
thesis) is recorded as failed with its error, and the search goes on; keras-tuner's own rule
of stopping after 3 consecutive failures is replaced by stopping when the first 3 trials have
all failed, which is a broken setup, not a bad hyperparameter. A search without a completed
trial raises :class:`~karyo.errors.KaryoError`: "best" hyperparameters never come from failed
trials. Memory does not grow from trial to trial: keras-tuner calls
``keras.backend.clear_session()`` before building each trial's model.

Distributed search (keras-tuner's own mode: one chief runs the oracle, workers run trials):
start the same call (or the same ``karyo tune`` command) once per process, with::

    KERASTUNER_ORACLE_IP=10.0.0.1  KERASTUNER_ORACLE_PORT=8000  KERASTUNER_TUNER_ID=chief
    KERASTUNER_ORACLE_IP=10.0.0.1  KERASTUNER_ORACLE_PORT=8000  KERASTUNER_TUNER_ID=tuner0
    KERASTUNER_ORACLE_IP=10.0.0.1  KERASTUNER_ORACLE_PORT=8000  KERASTUNER_TUNER_ID=tuner1  ...

The chief serves the oracle (gRPC at that address and port) and runs no trial; it does not load
images. Workers ask it for hyperparameters, train and report back, until ``max_trials`` trials
were handed out. Only the chief sees every trial, so only the chief writes ``trials.csv``,
``best.json`` and the figures, once all workers have finished (keras-tuner's chief polls for
that every 20 s); a worker's :func:`tune` returns a summary of the trials it ran, with
``"role": "worker"``. keras-tuner does not send a failed trial's error message to the chief,
so each worker writes it to ``keras_tuner/trial_<id>/karyo_trial.json`` in its ``out_dir``; the
chief reads it when ``out_dir`` is a shared folder and otherwise names the worker whose output
holds it. Give every process the same arguments; ``overwrite`` is honoured by the chief only.
Concurrent data preparation in one ``out_dir`` is serialised by a file lock, and the feature
cache is safe to share. A killed worker restarted with the same ``KERASTUNER_TUNER_ID`` reruns
its unfinished trial; a restarted chief resumes the search from ``out_dir``.

Example:
    >>> best = tune("data/manifest.csv", "runs/tuning", max_trials=20, epochs=10)  # doctest: +SKIP
    >>> best["hyperparameters"]                                                    # doctest: +SKIP
    {'lr': 0.0011, 'batch_size': 16, 'dropout': 0.5, 'unfreeze': 0, 'dense_units': 256}
"""

import contextlib
import csv
import functools
import io
import json
import math
import shutil
import sys
from pathlib import Path

import keras
import keras_tuner
import numpy as np

from karyo.atomic import atomic_write_text, write_csv
from karyo.data.manifest import check_run_data, KARYOGRAM_LABELS, sha256_file
from karyo.data.pipeline import label_indices, load_images
from karyo.errors import KaryoError
from karyo.experiments.figures import plot_block_rates, plot_tuning_scatter
from karyo.experiments.hypermodel import (batch_size_choices, DROPOUT_RANGE, gene_name, KaryogramHyperModel, LR_RANGE,
                                          SPACES, THESIS_BATCH_SIZE, THESIS_LR, THRESHOLD_GENE, trial_configuration,
                                          unfreeze_choices, unfreeze_value)
from karyo.experiments.pretrain import starting_weights
from karyo.experiments.training import prepare_data
from karyo.experiments.tuner import (check_search_extras, EvolutionOracle, one_line, search_role, SearchFailed,
                                     SearchOracle, SearchTuner, trial_order, trial_record_path)
from karyo.models.backbones import check_image_size, get_backbone
from karyo.models.features import cached_features, default_cache_dir
from karyo.models.network import build_backbone, build_model, DEFAULT_DENSE_UNITS, DEFAULT_DROPOUT, split_model
from karyo.models.selective import fixed_recipe
from karyo.models.unfreeze import FINE_TUNE_LEARNING_RATE
from karyo.models.weights import weights_identity
from karyo.data.leakage import check_leakage

#: keras-tuner's project folder inside ``out_dir``.
PROJECT_NAME = "keras_tuner"
#: trials.csv columns; hyperparameters not searched hold their fixed value.
TRIAL_COLUMNS = ("trial_id", "lr", "batch_size", "dropout", "unfreeze", "dense_units", "trained_blocks",
                 "block_rates", "val_loss", "val_accuracy", "status", "seconds", "tuner", "error")
#: ``--oracle`` choices: keras-tuner's Bayesian optimisation, or the genetic algorithm BioTune uses.
ORACLES = ("bayesian", "evolution")
#: Trials of the evolutionary oracle's population (and of its random first generation).
POPULATION_SIZE = 6
#: Settings a resumed search must share with the one it continues (``search.json``).
_SETTING_KEYS = ("manifest_sha256", "backbone", "image_size", "weights", "space", "lr_range",
                 "batch_sizes", "unfreeze_choices", "dropout_range", "dense_units", "epochs",
                 "fine_tune_lr", "seed", "protocol", "augmented", "oracle")


# ------------------------------------------------------------------------------ results


def default_oracle(space):
    """The oracle a space is searched with unless one is named: evolution for ``biotune`` (BioTune's
    genetic algorithm, whose genome has a gene per block), Bayesian for the thesis' spaces."""
    return "evolution" if space == "biotune" else "bayesian"


def trial_blocks(values, space, backbone, fine_tune_lr):
    """A trial's fine-tuning recipe ``{block: rate or None}``: its genome's (biotune), its last
    ``unfreeze`` blocks at ``fine_tune_lr`` (extended), or nothing trained (thesis)."""
    if space == "biotune":
        return trial_configuration(values, backbone, fine_tune_lr)
    return fixed_recipe(backbone, values.get("unfreeze") or 0, fine_tune_lr)


def trial_phenotype(values, backbone, fine_tune_lr):
    """What a biotune trial trains, as a hashable value: its blocks and their rates (3 digits)."""
    configuration = trial_configuration(values, backbone, fine_tune_lr)
    return tuple((b, float(f"{r:.3g}")) for b, r in configuration.items() if r is not None)


def describe_blocks(configuration):
    """``(trained_blocks, block_rates)`` as trials.csv writes them: ``block4+block5`` and
    ``block4=2.51e-05 block5=1e-05`` (empty when nothing trains)."""
    trained = [(b, r) for b, r in configuration.items() if r is not None]
    return "+".join(b for b, _ in trained), " ".join(f"{b}={r:.3g}" for b, r in trained)


def _trial_rows(oracle, project_dir, fixed, settings):
    """One dict per trial the oracle knows, for trials.csv and best.json."""
    rows = []
    for trial_id in sorted(oracle.trials, key=trial_order):
        trial = oracle.trials[trial_id]
        values = dict(fixed, **trial.hyperparameters.values)
        status = str(trial.status or "").lower()

        def metric(name):
            if status != "completed" or not trial.metrics.exists(name):
                return None
            value = trial.metrics.get_last_value(name)
            return float(value) if value is not None else None

        record = {}
        path = trial_record_path(project_dir, trial_id)
        with contextlib.suppress(OSError, ValueError):
            record = json.loads(path.read_text())
        tuner = oracle.karyo["tuner"].get(trial_id, record.get("tuner", ""))
        error = ""
        if status == "failed":
            error = record.get("error") or one_line(trial.message) or (
                f"failed on worker {tuner or '?'} (its error is in that worker's output)")
        seconds = oracle.karyo["seconds"].get(trial_id, record.get("seconds"))
        trained, rates = describe_blocks(trial_blocks(values, settings["space"], settings["backbone"],
                                                      settings["fine_tune_lr"]))
        rows.append({
            "trial_id": trial_id, "lr": values.get("lr"), "batch_size": values.get("batch_size"),
            "dropout": values.get("dropout"), "unfreeze": values.get("unfreeze"),
            "dense_units": values.get("dense_units"), "trained_blocks": trained, "block_rates": rates,
            "configuration": trial_blocks(values, settings["space"], settings["backbone"], settings["fine_tune_lr"]),
            "val_loss": metric("val_loss"),
            "val_accuracy": metric("val_accuracy"), "status": status, "seconds": seconds,
            "tuner": tuner, "error": error,
        })
    return rows


def read_trials(path):
    """Rows of a ``trials.csv`` as dicts (numbers stay strings; empty = missing)."""
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _write_figures(out_dir, rows, settings):
    """The thesis' Figs. 3.3 / 3.4 (and the extended space's two more), from every trial; for the
    spaces that choose blocks, the best trials' blocks and rates beside the thesis' fixed recipes."""

    space = settings["space"]
    loss = [r["val_loss"] for r in rows]
    acc = [r["val_accuracy"] for r in rows]
    figures = out_dir / "figures"
    plots = [("lr", "Learning rate", True), ("batch_size", "Batch size", False)]
    if space == "extended":
        plots += [("dropout", "Dropout rate", False), ("unfreeze", "Unfrozen blocks", False)]
    if space == "biotune":
        plots = [("n_trained", "Trained blocks", False)]
        for r in rows:
            r["n_trained"] = len(r["trained_blocks"].split("+")) if r["trained_blocks"] else 0
    paths = []
    for key, label, log in plots:
        values = [_numeric(r[key]) for r in rows]
        paths.append(plot_tuning_scatter(values, loss, acc, figures / f"val_loss_vs_{key}.png",
                                         label, log=log))
    if space in ("extended", "biotune"):
        backbone, lr = settings["backbone"], settings["fine_tune_lr"]
        ranked = sorted((r for r in rows if r["val_loss"] is not None), key=lambda r: r["val_loss"])[:5]
        recipes = thesis_recipes(backbone, lr) + [
            (f"trial {r['trial_id']} (val loss {r['val_loss']:.3f})", r["configuration"]) for r in ranked]
        paths.append(plot_block_rates(recipes, list(get_backbone(backbone).block_names()),
                                      figures / "block_rates.png", base_lr=lr,
                                      title=f"{backbone}: thesis recipes and the best {space} trials"))
    return paths


def thesis_recipes(backbone, lr):
    """The thesis' fixed fine-tuning recipes (4.3) for ``backbone``, as ``[(label, configuration)]``:
    VGG16's last one and two blocks, InceptionV3 entirely; other backbones get the last one and
    two blocks and all of them."""
    name = get_backbone(backbone).name
    depths = {"vgg16": [1, 2], "inceptionv3": ["all"]}.get(name, [1, 2, "all"])
    return [(f"thesis: last {k} block{'s' if k != 1 else ''}" if k != "all" else "thesis: all blocks",
             fixed_recipe(name, k, lr)) for k in depths]


def _numeric(value):
    if value == "all":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# ------------------------------------------------------------------------------ the search


@contextlib.contextmanager
def _file_lock(path):
    """An exclusive lock on ``path`` (POSIX ``flock``), so that a chief and workers sharing
    ``out_dir`` prepare the augmented data once instead of overwriting each other's."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no distributed search across processes there
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _check_arguments(backbone, max_trials, epochs, image_size, space, lr_range, protocol, oracle):

    name = get_backbone(backbone).name
    check_image_size(name, image_size)
    for label, value in (("max_trials", max_trials), ("epochs", epochs)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise KaryoError(f"{label} must be a positive whole number, not {value!r}")
    if space not in SPACES:
        raise KaryoError(f"unknown search space '{space}' (choose {', '.join(SPACES)})")
    if oracle not in ORACLES:
        raise KaryoError(f"unknown oracle '{oracle}' (choose {' or '.join(ORACLES)})")
    if protocol not in ("grouped", "thesis"):
        raise KaryoError(f"unknown split protocol '{protocol}' (choose grouped or thesis)")
    try:
        low, high = (float(v) for v in lr_range)
    except (TypeError, ValueError):
        raise KaryoError(f"lr_range must be two numbers, not {lr_range!r}") from None
    if not (0 < low < high and math.isfinite(high)):
        raise KaryoError(f"lr_range must satisfy 0 < low < high, not {lr_range!r}")
    return name, (low, high)


def _check_settings(out_dir, settings, max_trials):
    """Refuse to resume a search started with other settings; record them otherwise."""
    path = out_dir / "search.json"
    if (out_dir / PROJECT_NAME).is_dir() and path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
        changed = [f"{k}: {old.get(k)!r} -> {settings[k]!r}" for k in _SETTING_KEYS
                   if k in old and _jsonable(old.get(k)) != _jsonable(settings[k])]
        if changed:
            raise KaryoError(
                f"{out_dir}: holds a search started with other settings ({'; '.join(changed)}); "
                f"keras-tuner would keep the old search. Pass --overwrite (overwrite=True) to "
                f"start afresh, or choose another --out")
    atomic_write_text(path, json.dumps(dict(settings, max_trials=max_trials), indent=2) + "\n")


def _jsonable(value):
    return json.loads(json.dumps(value))


def _clear(out_dir):
    for name in (PROJECT_NAME, "figures"):
        if (out_dir / name).is_dir():
            shutil.rmtree(out_dir / name)
    for name in ("trials.csv", "best.json", "search.json"):
        with contextlib.suppress(FileNotFoundError):
            (out_dir / name).unlink()


def _pooled_dim(backbone, image_size):
    """Length of the backbone's pooled feature vector (built without weights: shapes only)."""

    return int(build_backbone(backbone, image_size, "none").output.shape[-1])


def tune(manifest_path, out_dir, backbone="vgg16", max_trials=20, epochs=10, image_size=416,
         weights="imagenet", space="thesis", seed=0, root=None, cache_dir=None, data_dir=None,
         overwrite=False, protocol="grouped", augmented=True, lr_range=LR_RANGE, verbose=0,
         progress=True, oracle=None):
    """Bayesian search over learning rate and batch size (thesis 3.2); return best.json's content.

    Args:
        manifest_path: karyogram manifest CSV (labels normal / abnormal, ``group`` = case).
        out_dir: the search folder (created; rerunning with it resumes the search).
        backbone: a registered backbone (thesis: ``vgg16``; it also searched InceptionV3's).
        max_trials: number of trials (hyperparameter sets) in all.
        epochs: epochs per trial (per phase when blocks are unfrozen).
        image_size: input side in pixels (thesis: 416).
        weights: ``imagenet``, ``none``, ``auto`` or a weights file.
        space: ``thesis`` (learning rate, batch size), ``extended`` (also the number of
            unfrozen blocks and the dropout rate) or ``biotune`` (BioTune's genome: a gene per
            block and a threshold gene choose which blocks fine-tune and at which rate, the head
            phase at the thesis' rate and batch size; see ``karyo.models.selective``).
        seed: seeds the split, the augmentation, every trial's initialisation and the oracle.
        root: folder the manifest's paths are relative to (default: the manifest's folder).
        cache_dir: feature cache (default ``karyo.models.features.default_cache_dir()``, shared with
            ``karyo train`` so a search's features serve the training runs and vice versa).
        data_dir: where augmented data is written (default ``out_dir/data``).
        overwrite: discard an earlier search in ``out_dir`` and start afresh.
        protocol: ``grouped`` (split by case, augment the training part only) or ``thesis``.
        augmented: search on the thesis' augmented data (as it did) or on the original images.
        lr_range: (low, high) of the log-uniform learning rate.
        verbose: 0 quiet; 1 keras-tuner's trial tables and Keras progress bars; 2 one line
            per epoch.
        progress: with ``verbose=0``, a progress bar over the trials.
        oracle: ``bayesian`` (keras-tuner's Gaussian process) or ``evolution`` (a genetic
            algorithm, :class:`karyo.experiments.tuner.EvolutionOracle`, population
            :data:`POPULATION_SIZE`); default :func:`default_oracle` of the space.

    Returns:
        The content of ``out_dir/best.json``: ``hyperparameters`` (``lr``, ``batch_size``,
        ``dropout``, ``unfreeze``, ``dense_units``, as ``karyo train --hyperparameters`` reads
        them), ``val_loss``, ``val_accuracy``, ``trial_id``, ``completed_trials``,
        ``failed_trials`` and the search's settings. In a distributed worker: a summary of the
        trials it ran (``"role": "worker"``; the chief writes the files).

    Raises:
        KaryoError: bad arguments or data, settings that differ from the search being
            resumed, missing keras-tuner extras, or a search in which no trial completed.
    """
    check_search_extras()
    role = search_role()
    oracle = default_oracle(space) if oracle is None else oracle
    backbone, lr_range = _check_arguments(backbone, max_trials, epochs, image_size, space,
                                          lr_range, protocol, oracle)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise KaryoError(f"{out_dir}: exists and is not a folder; choose another --out")
    # Validate first, then write: labels, both classes, files, sha256 and decoding of every row,
    # and the split, are checked before the search folder exists.

    manifest = check_run_data(manifest_path, (protocol,), seed, augmented, root,
                              progress=progress and verbose == 0)
    if overwrite and role != "worker" and out_dir.exists():
        _clear(out_dir)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    data_dir = Path(data_dir) if data_dir else out_dir / "data"

    with _file_lock(data_dir / ".prepare.lock"):
        prepared = prepare_data(manifest, augmented, protocol, seed, data_dir,
                                progress=progress and verbose == 0)
    # The same guard as train's: a near-copy of a validation image in the training part makes
    # the search pick what memorises best. Refused under grouped (nothing is left behind).
    try:
        leakage = check_leakage(prepared, protocol, progress=progress and verbose == 0)
    except KaryoError:
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    if leakage["warning"] and role != "worker":
        print(f"karyo: warning: {leakage['warning']}", file=sys.stderr)
    parts = {p: [r for r in prepared.rows if r["split"] == p] for p in ("train", "val")}
    for part, members in parts.items():
        if not members:
            raise KaryoError(f"{manifest_path}: the {part} split is empty (too few karyograms)")
    labels = {p: _label_array(rows) for p, rows in parts.items()}
    batch_sizes = batch_size_choices(len(parts["train"]))
    settings = {
        "manifest": str(Path(manifest_path).resolve()),
        "manifest_sha256": sha256_file(manifest_path), "backbone": backbone,
        "image_size": int(image_size), "weights": str(weights), "space": space,
        "lr_range": list(lr_range), "batch_sizes": batch_sizes,
        "unfreeze_choices": unfreeze_choices(backbone) if space == "extended" else [0],
        "dropout_range": list(DROPOUT_RANGE) if space == "extended" else [DEFAULT_DROPOUT],
        "dense_units": DEFAULT_DENSE_UNITS, "epochs": int(epochs),
        "fine_tune_lr": FINE_TUNE_LEARNING_RATE, "seed": int(seed), "protocol": protocol,
        "augmented": bool(augmented), "oracle": oracle,
    }
    if space == "biotune":
        settings["blocks"] = list(get_backbone(backbone).block_names())
    if role != "worker":
        _check_settings(out_dir, settings, max_trials)

    weights_arg = weights_used = None
    cache_key = []
    if role != "chief":
        weights_arg, weights_used, _ = starting_weights(weights, backbone, int(image_size))
        cache_key = [backbone, weights_identity(weights_used, weights_arg, seed), int(image_size)]

    extra = {}
    if oracle == "evolution":
        extra = {"population_size": POPULATION_SIZE}
        if space == "biotune":
            extra["phenotype"] = functools.partial(trial_phenotype, backbone=backbone,
                                                   fine_tune_lr=FINE_TUNE_LEARNING_RATE)
    searcher = (EvolutionOracle if oracle == "evolution" else SearchOracle)(
        objective=keras_tuner.Objective("val_loss", direction="min"), max_trials=int(max_trials),
        # keras-tuner reads seed 0 as "no seed": shift it.
        seed=int(seed) + 1,
        # Its own stop after 3 consecutive failures would end a search on a run of
        # out-of-memory batch sizes and, in a chief, leave its lock held (a deadlock).
        max_consecutive_failed_trials=10 ** 9, **extra)
    hypermodel = KaryogramHyperModel(backbone, int(image_size), weights_arg, cache_key, space, lr_range,
                                     batch_sizes, epochs, seed, 0, cache_dir, DEFAULT_DENSE_UNITS,
                                     DEFAULT_DROPOUT, FINE_TUNE_LEARNING_RATE,
                                     progress=progress and verbose == 0)
    data = None
    if role == "chief" or _finished(out_dir, max_trials):
        # No trial will run here: the chief only serves the oracle, and a finished search
        # only rewrites its results. The head's input width is all that is needed.
        hypermodel.input_dim = _pooled_dim(backbone, int(image_size))
    else:
        data = _load_data(prepared, parts, labels, backbone, image_size, weights_arg, cache_key,
                          cache_dir, seed, progress and verbose == 0)
        hypermodel.input_dim = int(data["pooled"]["train"].shape[-1])

    bar = None
    if progress and verbose == 0 and role != "chief":
        from tqdm.auto import tqdm

        bar = tqdm(total=int(max_trials), desc="trials", unit="trial", leave=False)
    # keras-tuner prints "Reloading Tuner from ..." whatever its verbosity.
    with contextlib.redirect_stdout(io.StringIO()) if verbose == 0 else contextlib.nullcontext():
        tuner = SearchTuner(searcher, hypermodel, directory=str(out_dir), project_name=PROJECT_NAME,
                            overwrite=False, progress=bar, quiet=verbose == 0)
    if bar is not None and role == "standalone":
        bar.update(sum(t.status in ("COMPLETED", "FAILED") for t in tuner.oracle.trials.values()))
    stopped = None
    try:
        tuner.search(data=data, verbose=verbose)
    except SearchFailed as exc:
        stopped = exc
    finally:
        tuner.release_stderr()
        if bar is not None:
            bar.close()
        keras.backend.clear_session()

    if role == "worker":
        return {"role": "worker", "tuner_id": tuner.tuner_id,
                "trials": [r["trial_id"] for r in tuner.ran],
                "completed_trials": sum(not r["error"] for r in tuner.ran),
                "failed_trials": sum(bool(r["error"]) for r in tuner.ran)}
    return _finish(out_dir, tuner.oracle, tuner.project_dir, settings, weights_used, parts, labels,
                   max_trials, stopped)


def _label_array(rows):

    return label_indices(rows, KARYOGRAM_LABELS)


def _finished(out_dir, max_trials):
    """True if ``out_dir``'s search already ended ``max_trials`` trials (nothing left to run)."""
    project = out_dir / PROJECT_NAME
    ended = 0
    for path in project.glob("trial_*/trial.json"):
        with contextlib.suppress(OSError, ValueError):
            ended += json.loads(path.read_text()).get("status") in ("COMPLETED", "FAILED")
    return ended >= max_trials


def _load_data(prepared, parts, labels, backbone, image_size, weights_arg, cache_key, cache_dir,
               seed, progress):
    """A trial's data: images, labels and cached pooled features of the training and validation
    splits, as ``{"images": ..., "labels": ..., "pooled": ...}``."""
    images = {p: load_images(prepared, rows, int(image_size), progress, p) for p, rows in parts.items()}
    # The same network (and seed) as karyo train builds, so the cached features are shared.
    frozen, _ = split_model(build_model(backbone, int(image_size), weights=weights_arg, seed=seed), 0)
    pooled = {p: cached_features(frozen, images[p], cache_key + ["pooled"], cache_dir,
                                 progress=progress) for p in parts}
    return {"images": images, "labels": labels, "pooled": pooled}


def _finish(out_dir, oracle, project_dir, settings, weights_used, parts, labels, max_trials,
            stopped):
    """Write trials.csv, the figures and best.json; raise if no trial completed."""

    fixed = {"dropout": DEFAULT_DROPOUT, "unfreeze": 0, "dense_units": DEFAULT_DENSE_UNITS}
    if settings["space"] == "biotune":  # the head phase's rate and batch size are the thesis'
        batch = settings["batch_sizes"]
        fixed.update(lr=THESIS_LR, batch_size=THESIS_BATCH_SIZE if THESIS_BATCH_SIZE in batch else batch[0])
    rows = _trial_rows(oracle, project_dir, fixed, settings)
    for row in rows:
        row["unfreeze"] = ("" if settings["space"] == "biotune"
                           else unfreeze_value(row["unfreeze"] or 0, settings["backbone"]))
    write_csv(out_dir / "trials.csv", [{k: r[k] for k in TRIAL_COLUMNS} for r in rows], TRIAL_COLUMNS)
    completed = [r for r in rows if r["status"] == "completed" and r["val_loss"] is not None]
    failed = [r for r in rows if r["status"] == "failed"]
    if not completed:
        with contextlib.suppress(FileNotFoundError):
            (out_dir / "best.json").unlink()
        first = failed[0]["error"] if failed else "no trial ran"
        why = f"{stopped}; " if stopped else ""
        raise KaryoError(f"no trial of the search completed ({why}{len(failed)} failed; the first "
                         f"error: {first}); see {out_dir / 'trials.csv'}")
    _write_figures(out_dir, rows, settings)
    # keras-tuner's own ranking of the trials by the objective (the validation loss).
    best_id = oracle.get_best_trials(1)[0].trial_id
    best = next(r for r in completed if r["trial_id"] == best_id)
    keys = ("lr", "batch_size", "dropout", "unfreeze", "dense_units")
    if settings["space"] == "biotune":
        # karyo train fine-tunes the last k blocks at one rate; a biotune recipe is not that,
        # so best.json gives no "unfreeze" (the head's values only) and the recipe beside it.
        keys = ("lr", "batch_size", "dropout", "dense_units")
    result = {
        "hyperparameters": {k: best[k] for k in keys},
        "trained_blocks": best["trained_blocks"].split("+") if best["trained_blocks"] else [],
        "block_rates": {b: r for b, r in best["configuration"].items() if r is not None},
        "val_loss": best["val_loss"], "val_accuracy": best["val_accuracy"],
        "trial_id": best["trial_id"], "completed_trials": len(completed),
        "failed_trials": len(failed), "max_trials": int(max_trials), "objective": "val_loss",
        "searched": _searched(settings),
        "oracle": settings["oracle"],
        "weights_used": weights_used,
        "counts": {p: {lab: int((labels[p] == i).sum()) for i, lab in enumerate(KARYOGRAM_LABELS)}
                   for p in parts},
        "settings": settings,
        "thesis": {"lr": THESIS_LR, "batch_size": THESIS_BATCH_SIZE,
                   "note": "thesis 3.2: lr in [7e-4, 3e-2] works; batch 16 or 32; 512+ ran out "
                           "of GPU memory"},
    }
    atomic_write_text(out_dir / "best.json", json.dumps(result, indent=2) + "\n")
    return result


def _searched(settings):
    """The hyperparameters a search chose (best.json's ``searched``)."""
    if settings["space"] == "biotune":
        return [gene_name(b) for b in settings["blocks"]] + [THRESHOLD_GENE]
    return ["lr", "batch_size"] + (["unfreeze", "dropout"] if settings["space"] == "extended" else [])
