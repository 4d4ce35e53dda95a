"""``karyo reproduce``: the thesis' experiments end to end, under both split protocols.

Steps: (1) the data: the manifest given, or the synthetic alpha-dataset (105 normal + 41
abnormal karyograms, thesis 3.1.2) rendered from the cytoband table; (2) the Bayesian search
over learning rate and batch size (thesis 3.2); (3) the seven rows of Table 5.1 under the
``thesis`` protocol (augment, then split per image, as published) and the ``grouped`` one
(split by group, augment the training part only); (4) the report beside the published numbers.

Presets are declared once, here, as data. Everything lands under one output folder, and a
rerun on the same folder skips what already finished.
"""

import itertools
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from karyo.data.manifest import check_run_data
from karyo.data.splits import PROTOCOLS
from karyo.errors import KaryoError
from karyo.experiments.registry import get_experiment, THESIS_EXPERIMENTS
from karyo.experiments.report import write_report
from karyo.experiments.training import is_complete, print_warning, train_experiment
from karyo.experiments.tuning import tune
from karyo.karyograms.synth import synthesize


@dataclass(frozen=True)
class Preset:
    """Sizes and lengths of a reproduction.

    Attributes:
        synth_normal, synth_abnormal, synth_size: the synthetic dataset rendered when no
            ``--data`` is given (the thesis' alpha-dataset has 105 + 41 karyograms at 416 px).
        image_size: per backbone input side (the thesis: 416 for both).
        epochs, fine_tune_epochs, patience: training lengths.
        weights: ``imagenet`` (the thesis), ``auto`` (imagenet when obtainable) or ``none``.
        mc_passes: MC Dropout passes (thesis: 100).
        tune_trials, tune_epochs: the Bayesian search (0 trials skips it).
        protocols: split protocols to run.
    """

    name: str
    synth_normal: int = 105
    synth_abnormal: int = 41
    synth_size: int = 416
    image_size: tuple = (("vgg16", 416), ("inceptionv3", 416))
    epochs: int = 30
    fine_tune_epochs: int = 30
    patience: int = 10
    weights: str = "imagenet"
    mc_passes: int = 100
    tune_trials: int = 20
    tune_epochs: int = 10
    protocols: tuple = ("thesis", "grouped")
    experiments: tuple = tuple(e.name for e in THESIS_EXPERIMENTS)

    def size_for(self, backbone):
        return dict(self.image_size).get(backbone, max(dict(self.image_size).values()))


PRESETS = {
    # The published setting: a GPU run.
    "thesis": Preset("thesis"),
    # Minutes on a laptop CPU: small inputs, few epochs, ImageNet weights when obtainable.
    "quick": Preset("quick", synth_size=160, image_size=(("vgg16", 64), ("inceptionv3", 75)),
                    epochs=12, fine_tune_epochs=6, patience=4, weights="auto", mc_passes=100,
                    tune_trials=6, tune_epochs=4),
    # Seconds: for tests of the pipeline itself, not of the method.
    "tiny": Preset("tiny", synth_normal=16, synth_abnormal=12, synth_size=96,
                   image_size=(("vgg16", 32), ("inceptionv3", 75)), epochs=1, fine_tune_epochs=1,
                   patience=1, weights="none", mc_passes=10, tune_trials=2, tune_epochs=1),
}


def get_preset(name):
    try:
        return PRESETS[name]
    except KeyError:
        raise KaryoError(f"unknown preset '{name}' (choose from {', '.join(PRESETS)})") from None


def run_dir(out, protocol, name):
    return Path(out) / "runs" / protocol / name


def seed_dir(out, seed, first_seed):
    """Where the runs of ``seed`` go: ``out`` itself for the first seed, ``out/seeds/<seed>`` else.

    The first seed's runs keep the layout a one-seed reproduction has, so ``--seeds 3`` on a
    finished ``--out`` adds two seeds and retrains nothing."""
    return Path(out) if seed == first_seed else Path(out) / "seeds" / str(seed)


def reproduce(out, preset="quick", data=None, root=None, seed=0, experiments=None,
              protocols=None, tune=True, weights=None, seeds=1, verbose=0, log=print):
    """Run the thesis' experiments and write ``out/report.md`` (and ``report.html``).

    Args:
        out: output folder (created; reused on a rerun, finished runs are skipped).
        preset: ``quick``, ``thesis`` or ``tiny`` (see :data:`PRESETS`).
        data: a karyogram manifest; ``None`` renders the synthetic alpha-dataset.
        seed: seeds data, splits, augmentation, weights and dropout.
        seeds: run every row with ``seeds`` seeds (``seed``, ``seed + 1``, ...), each its own
            split, augmentation, weights and dropout (the synthetic data and the search are drawn
            once, with ``seed``); the report gives each row's mean and standard deviation.
        experiments, protocols: subsets (default: the seven Table 5.1 rows, both protocols).
        tune: run the Bayesian search first (thesis 3.2).
        weights: ``imagenet``, ``auto`` or ``none`` instead of the preset's.
        verbose: 0 quiet; 1 per-epoch output, download messages and every warning in full.

    Returns:
        path of ``report.md``.
    """

    p = get_preset(preset) if isinstance(preset, str) else preset
    if experiments:
        p = replace(p, experiments=tuple(experiments))
    if protocols:
        p = replace(p, protocols=tuple(protocols))
    if weights:
        p = replace(p, weights=str(weights))
    for name in p.experiments:
        get_experiment(name)  # unknown names fail before any work
    if int(seeds) < 1:
        raise KaryoError(f"--seeds {seeds}: give at least 1")
    seed_list = [seed + i for i in range(int(seeds))]

    for protocol in p.protocols:
        if protocol not in PROTOCOLS:
            raise KaryoError(f"unknown split protocol '{protocol}' (choose from {', '.join(PROTOCOLS)})")
    if Path(out).exists() and not Path(out).is_dir():
        raise KaryoError(f"{out}: exists and is not a folder; choose another --out")
    if data:

        # So does bad data: every row (labels, both classes, files, sha256, decoding) and the
        # splits the runs will draw are checked before the output folder is made.
        for run_seed in seed_list:
            check_run_data(data, p.protocols, run_seed, all(get_experiment(n).augmented for n in p.experiments),
                           root, progress=verbose > 0)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    manifest = Path(data) if data else _synthetic_data(out, p, seed, log)

    if tune and p.tune_trials > 0:
        _tune(out, p, manifest, root, seed, log)

    cache = out / "cache"
    # The same warning (the thesis protocol's leakage, weights falling back) comes from run after
    # run on the same data: quiet, each is printed once, with the runs it concerns.
    warnings = defaultdict(list)
    try:
        for run_seed, protocol, name in itertools.product(seed_list, p.protocols, p.experiments):
            target = run_dir(seed_dir(out, run_seed, seed), protocol, name)
            run = f"[{protocol}] {name}" + (f" seed {run_seed}" if len(seed_list) > 1 else "")
            if is_complete(target):
                log(f"{run}: finished earlier, skipped")
                continue
            exp = get_experiment(name)
            exp = replace(exp, image_size=p.size_for(exp.backbone), epochs=p.epochs,
                          fine_tune_epochs=p.fine_tune_epochs, patience=p.patience,
                          weights=p.weights, mc_passes=p.mc_passes)
            t0 = time.time()
            log(f"{run}: training ({exp.backbone} {exp.image_size} px)")
            warn = ((lambda text, run=run: print_warning(f"{run}: {text}")) if verbose
                    else (lambda text, run=run: warnings[text].append(run)))
            train_experiment(exp, manifest, target, protocol=protocol, seed=run_seed,
                             resume=target.exists(), root=root, cache_dir=cache,
                             data_dir=out / "data" / "prepared", verbose=verbose,
                             progress=verbose > 0, warn=warn)
            log(f"{run}: done in {time.time() - t0:.0f} s")
    finally:
        for text, runs in warnings.items():
            print_warning(f"{text} [in {len(runs)} run{'s' * (len(runs) != 1)}; --verbose names each]")
    report = write_report(out, preset=asdict(p), seconds=time.time() - started)
    log(f"wrote {report} ({time.time() - started:.0f} s)")
    return report


def _synthetic_data(out, p, seed, log):

    folder = out / "data" / "synthetic"
    manifest = folder / "manifest.csv"
    if not manifest.is_file():
        log(f"rendering the synthetic alpha-dataset: {p.synth_normal} normal + {p.synth_abnormal} "
            f"abnormal karyograms at {p.synth_size} px")
        synthesize(folder, normal=p.synth_normal, abnormal=p.synth_abnormal, size=p.synth_size,
                   seed=seed, progress=False)
    return manifest


def _tune(out, p, manifest, root, seed, log):
    folder = out / "tuning"
    if (folder / "best.json").is_file():
        log("Bayesian search: finished earlier, skipped")
        return
    log(f"Bayesian search over learning rate and batch size: {p.tune_trials} trials")
    tune(manifest, folder, backbone="vgg16", max_trials=p.tune_trials, epochs=p.tune_epochs,
         image_size=p.size_for("vgg16"), weights=p.weights, seed=seed, root=root,
         cache_dir=out / "cache", data_dir=out / "data" / "prepared", verbose=0)
