"""``karyo bench``: the speed of karyo's shortcuts, measured against the naive way (SPEC 6).

Three shortcuts make the thesis' experiments cheap, and this module measures each as a ratio
in one process on one machine, so the figures compare like with like:

* MC Dropout (thesis 3.4: 100 passes per image) runs the backbone once per image and only the
  head T times (``karyo.uncertainty.mc_dropout.mc_predict``). Measured against one ordinary prediction of
  the same images (goal: at most 1.2 times its cost) and against the naive loop that calls the
  whole network T times (``naive_mc_predict``, about T times the cost).
* The head trains on cached backbone features (``karyo.models.features.cached_features``) instead of
  running the frozen backbone every epoch (goal: an epoch at least 50 times faster), at the
  price of one extraction pass, also reported.
* Fine-tuning VGG16's last block (thesis 4.3.2) trains on the cached output of blocks 1-4
  (goal: an epoch at least 2.5 times faster than training the whole network with block 5
  unfrozen).

Also measured: the karyotype detector's seconds per karyogram with T = 100 MC passes (reading the
slots, features and the passes of its slot head; goal: at most 1 s), one keras-tuner trial on
cached features vs on images, the backbones' feature
extraction throughput at the thesis' 416 x 416 with their multiply-accumulate counts and the
machine's dense matrix-multiply speed (the share of the machine's limit a backbone reaches),
and the time to render the synthetic alpha-dataset (146 karyograms, thesis 3.1.2).

Every figure is the median of repeated measurements with its spread (min and max); the two
sides of a ratio are measured in alternation (a, b, a, b, ...) so that load from other
processes hits both alike, and the ratio's spread is that of the per-repeat ratios. The first
call of every function is a warm-up (TensorFlow traces and compiles it) and is not timed.
Random weights (``weights="none"``): the speed of a network does not depend on its weights,
and the benchmark runs offline.

Presets: ``quick`` (a few minutes on a 2-core CPU, under 7 on a busy shared one; smaller
images for the ratios, see :data:`PRESETS`), ``full`` (the default; larger images and more
repeats, several times longer) and ``tiny`` (seconds; the smallest inputs Keras accepts, for
the tests: its figures are not meaningful). The image sizes used are recorded in the JSON:
small images make the backbone cheaper, and so the MC Dropout and head-training ratios less
favourable than at the thesis' 416 pixels (the unfreezing ratio hardly depends on size).

On a GPU, set ``KARYO_MIXED_PRECISION=1`` (or pass ``mixed_precision=True``) to run under
``keras.mixed_precision.set_global_policy("mixed_float16")``.

Example:
    >>> result = run_bench(quick=True, out="bench.json")      # doctest: +SKIP
    >>> print(format_bench(result))                           # doctest: +SKIP
"""

import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import keras
import numpy as np

from karyo import __version__, thesis
from karyo.atomic import atomic_write_text
from karyo.data.imageio import encode_png, resize
from karyo.data.manifest import read_manifest
from karyo.data.pipeline import load_images, make_dataset
from karyo.errors import KaryoError
from karyo.experiments import hypermodel as hypermodel_module
from karyo.experiments import runs as runs_module
from karyo.experiments import training as training_module
from karyo.experiments.fit import compile_model
from karyo.experiments.pretrain import PRECISIONS, build_classifier
from karyo.experiments.reproduce import reproduce
from karyo.karyograms.chromosome_synth import synthetic_chromosomes
from karyo.karyograms.abnormal_cells import slot_labels
from karyo.karyograms.karyotype import counts as karyotype_counts, get as get_karyotype
from karyo.karyograms.slots import read_slots
from karyo.karyograms.synth import render_karyogram, synthesize
from karyo.models.detector import compact, fit_detector, predict_karyograms
from karyo.models.features import cached_features
from karyo.models.network import build_backbone, build_head, build_model, split_model
from karyo.models.unfreeze import FINE_TUNE_LEARNING_RATE, unfreeze_blocks
from karyo.uncertainty.mc_dropout import mc_predict, naive_mc_predict

#: Version of the JSON layout written by :func:`run_bench`.
SCHEMA_VERSION = 1

#: T of the thesis (section 3.4: "100 times predictions for every image").
MC_PASSES = thesis.MC_PASSES

#: The thesis' alpha-dataset (section 3.1.2): 105 normal + 41 abnormal karyograms at 416 px.
ALPHA_NORMAL, ALPHA_ABNORMAL, THESIS_SIZE = thesis.ALPHA_NORMAL, thesis.ALPHA_ABNORMAL, thesis.IMAGE_SIZE

#: The thesis' batch size (section 3.2, chosen by its Bayesian search).
THESIS_BATCH = thesis.BATCH_SIZE

#: Environment variable that turns on mixed precision (for GPUs).
MIXED_PRECISION_ENV = "KARYO_MIXED_PRECISION"

#: SPEC 6 goals: (section, key, comparison, bound).
GOALS = (
    ("mc_dropout", "ratio_vs_single_predict", "<=", 1.2),
    ("head_training", "speedup_vs_end_to_end", ">=", 50.0),
    ("unfreeze_last_block", "speedup", ">=", 2.5),
    ("detector", "seconds_per_karyogram", "<=", 1.0),
)

#: Goals of sections that not every preset measures (``predict_memory``): judged only when measured.
MEASURED_ONLY_GOALS = (
    ("predict_memory", "peak_rss_mb_at_most_images", "<=", 2000.0),
    ("predict_memory", "throughput_vs_in_memory", ">=", 0.9),
)

#: The order in which :func:`run_bench` measures (and reports) its sections.
SECTIONS = ("synth_render", "backbone_throughput", "mc_dropout", "head_training",
            "unfreeze_last_block", "tuner_trial", "pretraining", "detector", "predict_memory",
            "reproduce_overhead")

#: What each preset measures. ``size``: image side in pixels, ``images``: how many,
#: ``repeats``: timed repeats after the warm-up. ``quick`` uses 128 px for the ratios (the
#: smallest realistic input; VGG16's cost grows with the pixel count, so larger images only
#: raise the speedups) and 416 px, the thesis' size, for the throughput; ``full`` uses 224 px
#: (VGG16's ImageNet size) and the thesis' training-set size (64 % of its 692 augmented
#: karyograms = 443) for the head.
PRESETS = {
    "full": {
        "synth_render": {"normal": ALPHA_NORMAL, "abnormal": ALPHA_ABNORMAL, "size": THESIS_SIZE,
                         "repeats": 5},
        "backbone_throughput": {"backbones": ("vgg16", "inceptionv3"), "size": THESIS_SIZE,
                                "images": 32, "batch_size": 8, "repeats": 5,
                                "matmul_n": 2048},
        "mc_dropout": {"backbone": "vgg16", "size": 224, "images": 64, "batch_size": 32,
                       "T": MC_PASSES, "repeats": 7, "naive_images": 16, "naive_repeats": 2},
        "head_training": {"backbone": "vgg16", "size": 224, "images": 443,
                          "batch_size": THESIS_BATCH, "repeats": 5},
        "unfreeze_last_block": {"backbone": "vgg16", "size": 224, "images": 128,
                                "batch_size": THESIS_BATCH, "repeats": 5},
        "tuner_trial": {"backbone": "vgg16", "size": 224, "images": 128, "epochs": 2,
                        "repeats": 3},
        "pretraining": {"backbone": "vgg16", "size": 64, "karyogram_size": 416, "images": 256,
                        "batch_size": 32, "repeats": 5, "matmul_n": 2048},
        "detector": {"size": THESIS_SIZE, "karyograms": 40, "T": MC_PASSES, "epochs": 2, "repeats": 5},
        # Not in ``quick``: decoding 7,500 files of 416 px takes minutes.
        "predict_memory": {"size": THESIS_SIZE, "counts": (500, 2000, 5000), "T": MC_PASSES,
                           "repeats": 3},
        "reproduce_overhead": {"preset": "tiny"},
    },
    "quick": {
        "synth_render": {"normal": ALPHA_NORMAL, "abnormal": ALPHA_ABNORMAL, "size": THESIS_SIZE,
                         "repeats": 3},
        "backbone_throughput": {"backbones": ("vgg16", "inceptionv3"), "size": THESIS_SIZE,
                                "images": 8, "batch_size": 8, "repeats": 5,
                                "matmul_n": 2048},
        "mc_dropout": {"backbone": "vgg16", "size": 128, "images": 32, "batch_size": 16,
                       "T": MC_PASSES, "repeats": 7, "naive_images": 8, "naive_repeats": 2},
        "head_training": {"backbone": "vgg16", "size": 128, "images": 128,
                          "batch_size": THESIS_BATCH, "repeats": 5},
        "unfreeze_last_block": {"backbone": "vgg16", "size": 128, "images": 64,
                                "batch_size": THESIS_BATCH, "repeats": 5},
        "tuner_trial": {"backbone": "vgg16", "size": 128, "images": 64, "epochs": 2,
                        "repeats": 3},
        "pretraining": {"backbone": "vgg16", "size": 64, "karyogram_size": 416, "images": 128,
                        "batch_size": 32, "repeats": 3, "matmul_n": 2048},
        "detector": {"size": THESIS_SIZE, "karyograms": 16, "T": MC_PASSES, "epochs": 2, "repeats": 3},
        "reproduce_overhead": {"preset": "tiny"},
    },
    "tiny": {
        "synth_render": {"normal": 2, "abnormal": 2, "size": 64, "repeats": 2},
        "backbone_throughput": {"backbones": ("vgg16", "inceptionv3"), "size": 75,
                                "images": 4, "batch_size": 4, "repeats": 2,
                                "matmul_n": 512},
        "mc_dropout": {"backbone": "vgg16", "size": 32, "images": 6, "batch_size": 4,
                       "T": 10, "repeats": 2, "naive_images": 3, "naive_repeats": 1},
        "head_training": {"backbone": "vgg16", "size": 32, "images": 8, "batch_size": 4,
                          "repeats": 2},
        "unfreeze_last_block": {"backbone": "vgg16", "size": 32, "images": 8, "batch_size": 4,
                                "repeats": 2},
        "tuner_trial": {"backbone": "vgg16", "size": 32, "images": 8, "epochs": 1,
                        "repeats": 1},
        "pretraining": {"backbone": "vgg16", "size": 32, "karyogram_size": 96, "images": 8,
                        "batch_size": 4, "repeats": 1, "matmul_n": 256},
        "detector": {"size": 128, "karyograms": 4, "T": 10, "epochs": 1, "repeats": 1},
        "predict_memory": {"size": 64, "counts": (3, 6), "T": 5, "repeats": 1},
    },
}

#: Karyotypes the detector section renders, in turn (normal and count changes, both sexes).
DETECTOR_KARYOTYPES = ("normal_xx", "normal_xy", "trisomy21_xy", "monosomyX", "normal_xy", "klinefelter")


# ------------------------------------------------------------------------------ timing


def _stats(seconds):
    """Median and spread of repeated measurements (seconds)."""
    values = [float(s) for s in seconds]
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "repeats": len(values)}


def _ratio(numerators, denominators):
    """Median and spread of per-repeat ratios (paired measurements)."""
    ratios = [a / b for a, b in zip(numerators, denominators)]
    return statistics.median(ratios), {"min": min(ratios), "max": max(ratios)}


def _wall(fn):
    """A function that calls ``fn`` and returns its wall-clock duration in seconds."""
    def timed():
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    return timed


def _alternate(measures, repeats, warm_up=True):
    """Warm up every measure once, then run them in alternation ``repeats`` times.

    Args:
        measures: dict name -> callable returning the seconds it measured.
        warm_up: call each measure once first, untimed (False: they are already warm).

    Returns:
        dict name -> list of seconds (warm-up excluded).
    """
    for measure in measures.values() if warm_up else ():
        measure()
    times = {name: [] for name in measures}
    for _ in range(int(repeats)):
        for name, measure in measures.items():
            times[name].append(measure())
    return times


def _epoch_timer():
    """A Keras callback recording the duration of every epoch in ``.seconds``."""
    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds, self._start = [], None

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self._start)

    return EpochTimer()


def _one_epoch(model, dataset):
    """A measure: one more epoch of ``model.fit`` on ``dataset`` (its duration, seconds).

    ``fit`` is called once per epoch so that two models can alternate; Keras keeps the
    compiled train function between calls, so only the first call traces.
    """
    def measure():
        timer = _epoch_timer()
        model.fit(dataset, epochs=1, verbose=0, shuffle=False, callbacks=[timer])
        return timer.seconds[-1]
    return measure


# ------------------------------------------------------------------------------ images


def stand_in_karyograms(n, size, seed=0):
    """Karyogram-like images without ``karyo.karyograms.synth``: dark banded bars in four rows on white."""
    rng = np.random.default_rng(seed)
    images = np.full((n, size, size, 3), 255, np.uint8)
    rows, per_row = 4, 7
    for image in images:
        for r in range(rows):
            top = 4 + r * size // rows
            for c in range(per_row):
                x = 2 + c * size // per_row
                width = max(1, size // 40)
                height = int(rng.integers(size // 10, size // rows - 4))
                bands = rng.integers(0, 200, size=height, dtype=np.uint8)
                image[top:top + height, x:x + width] = bands[:, None, None]
                image[top:top + height, x + 2 * width:x + 3 * width] = bands[:, None, None]
    return images


def _resized_pool(base, n, size, seed=0):
    """``n`` distinct ``size`` x ``size`` images made from ``base`` (N, H, W, 3) uint8.

    Beyond ``len(base)`` the images are reused with a small brightness change, as the thesis'
    augmentation does, so every image is different (the feature cache computes duplicates once,
    which would flatter the extraction cost).
    """

    rng = np.random.default_rng(seed)
    small = [resize(image, size) for image in base]
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        image = small[i % len(small)]
        if i >= len(small):
            factor = 1.0 + rng.uniform(-0.25, 0.25)
            image = np.clip(image.astype(np.float32) * factor, 0, 255).round().astype(np.uint8)
            image[i % size, (i // size) % size] ^= 1  # never equal to another copy
        out[i] = image
    return out


def _karyograms(cfg, folder):
    """Synthetic karyograms at 416 px to benchmark on (untimed): the alpha-dataset."""
    manifest = read_manifest(synthesize(folder, normal=cfg["normal"], abnormal=cfg["abnormal"],
                                        size=THESIS_SIZE, seed=0, progress=False))
    return load_images(manifest, manifest.rows, THESIS_SIZE, progress=False)


def _labels(n):
    """Alternating 0 / 1 labels (normal / abnormal), both classes present."""
    return (np.arange(n) % 2).astype("float32")


# ------------------------------------------------------------------------------ sections


def bench_synth_render(cfg, workdir):
    """Time ``karyo.karyograms.synth.synthesize`` on the alpha-dataset; return (figures, images).

    ``images`` are the rendered karyograms (uint8, N x size x size x 3).
    """
    seconds, folder = [], None
    for r in range(int(cfg["repeats"])):
        folder = Path(workdir) / f"synth-{r}"
        start = time.perf_counter()
        synthesize(folder, normal=cfg["normal"], abnormal=cfg["abnormal"], size=cfg["size"],
                   seed=0, progress=False)
        seconds.append(time.perf_counter() - start)
    manifest = read_manifest(folder / "manifest.csv")
    images = load_images(manifest, manifest.rows, cfg["size"], progress=False)
    n = cfg["normal"] + cfg["abnormal"]
    stats = _stats(seconds)
    return {
        "available": True, "images": n, "image_size": cfg["size"],
        "seconds": stats, "images_per_second": n / stats["median"],
        "method": "karyo.karyograms.synth.synthesize(normal, abnormal, size, seed=0, progress=False): "
                  "rendering, PNG encoding and the manifest with sha256, into a new folder",
    }, images


def _matmul_measures(n):
    """Measures of one n x n float32 matrix multiply, in TensorFlow and in numpy (seconds)."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    a_np = rng.random((n, n), dtype=np.float32)
    b_np = rng.random((n, n), dtype=np.float32)
    a, b = tf.constant(a_np), tf.constant(b_np)
    matmul = tf.function(lambda x, y: tf.reduce_sum(tf.linalg.matmul(x, y)))
    return {"matmul_tensorflow": _wall(lambda: matmul(a, b).numpy()),
            "matmul_numpy": _wall(lambda: a_np @ b_np)}


def _matmul_figures(n, times):
    """GFLOP/s of the matmul measures in ``times`` (2 n^3 floating-point operations each)."""
    flops = 2.0 * n ** 3
    result = {"n": n}
    for library in ("tensorflow", "numpy"):
        stats = _stats(times[f"matmul_{library}"])
        result[library] = {"gflops": flops / stats["median"] / 1e9,
                           "gflops_min": flops / stats["max"] / 1e9,
                           "gflops_max": flops / stats["min"] / 1e9, "repeats": stats["repeats"]}
    result["limit_gflops"] = max(result["tensorflow"]["gflops"], result["numpy"]["gflops"])
    return result


def matmul_gflops(n=2048, repeats=10):
    """The machine's dense float32 matrix-multiply speed (GFLOP/s), TensorFlow and numpy.

    A matmul of two n x n matrices is 2 n^3 floating-point operations; ``limit_gflops`` is the
    faster library's median.
    """
    return _matmul_figures(n, _alternate(_matmul_measures(n), repeats))


def count_macs(model):
    """Multiply-accumulates of one forward pass (per image) in the conv and dense layers.

    Counted from the layers' kernels and output shapes: a convolution or dense layer does
    ``prod(output spatial dims) * kernel.size`` MACs (a separable convolution: its depthwise and
    pointwise kernels). Pooling, normalisation and activations are not counted (a few percent).
    One MAC is two FLOPs.
    """
    total = 0

    def visit(layer):
        nonlocal total
        if isinstance(layer, keras.Model):
            for sub in layer.layers:
                visit(sub)
            return
        kernels = [getattr(layer, name, None) for name in ("kernel", "depthwise_kernel",
                                                           "pointwise_kernel")]
        kernels = [k for k in kernels if k is not None and hasattr(k, "shape")]
        if not kernels:
            return
        spatial = int(np.prod([int(d) for d in layer.output.shape[1:-1]] or [1]))
        total += spatial * sum(int(np.prod(k.shape)) for k in kernels)

    visit(model)
    return total


def bench_backbone_throughput(cfg, images, folder=None):
    """Feature extraction throughput (images/s) of each backbone at ``cfg["size"]``.

    The machine's matmul speed is measured in alternation with each backbone's extraction, so
    the share of the limit a backbone reaches compares two measurements under the same load
    (the machine may be shared). ``folder`` is not used (every section takes one).
    """
    x = _resized_pool(images, cfg["images"], cfg["size"]).astype(np.float32)
    batch, matmul_n = int(cfg["batch_size"]), int(cfg["matmul_n"])
    result = {"image_size": cfg["size"], "images": cfg["images"], "batch_size": batch,
              "method": "frozen part of build_model(weights=None) (preprocess + backbone + "
                        "global pooling), predict_on_batch per batch; MACs counted from the "
                        "conv/dense kernels (karyo.bench.suite.count_macs); matmul (n x n float32, "
                        "TensorFlow and numpy) measured in alternation with the extraction"}
    matmul_times = {"matmul_tensorflow": [], "matmul_numpy": []}
    for name in cfg["backbones"]:
        keras.backend.clear_session()
        macs = count_macs(build_backbone(name, cfg["size"], "none"))
        frozen, _ = split_model(build_model(name, cfg["size"], seed=0), 0)

        def extract(frozen=frozen):
            for start in range(0, len(x), batch):
                frozen.predict_on_batch(x[start:start + batch])

        times = _alternate({"extract": _wall(extract), **_matmul_measures(matmul_n)},
                           cfg["repeats"])
        stats = _stats(times["extract"])
        per_second = len(x) / stats["median"]
        gflops = per_second * 2 * macs / 1e9
        # Per repeat: the backbone's GFLOP/s over the faster matmul's, measured just after it.
        matmul_flops = 2.0 * matmul_n ** 3
        shares = [(len(x) * 2 * macs / e) / (matmul_flops / min(t, n))
                  for e, t, n in zip(times["extract"], times["matmul_tensorflow"],
                                     times["matmul_numpy"])]
        share, spread = statistics.median(shares), {"min": min(shares), "max": max(shares)}
        for key in matmul_times:
            matmul_times[key] += times[key]
        result[name] = {
            "images_per_second": per_second,
            "images_per_second_min": len(x) / stats["max"],
            "images_per_second_max": len(x) / stats["min"],
            "seconds": stats, "gmacs_per_image": macs / 1e9, "achieved_gflops": gflops,
            "share_of_matmul_limit": share, "share_spread": spread,
        }
    result["matmul"] = _matmul_figures(matmul_n, matmul_times)
    return result


def bench_mc_dropout(cfg, images, folder=None):
    """T MC Dropout passes (vectorised and naive) against one ordinary prediction.

    The naive loop costs about T predictions, so it runs on the first ``naive_images`` images
    only, and its ratio is to one prediction of those same images. ``folder`` is not used.
    """

    x = _resized_pool(images, cfg["images"], cfg["size"]).astype(np.float32)
    x_naive = x[:int(cfg["naive_images"])]
    batch, T = int(cfg["batch_size"]), int(cfg["T"])
    model = build_model(cfg["backbone"], cfg["size"], seed=0)

    def single(data):
        for start in range(0, len(data), batch):
            model.predict_on_batch(data[start:start + batch])

    times = _alternate({"single": _wall(lambda: single(x)),
                        "mc": _wall(lambda: mc_predict(model, x, T=T, batch_size=batch))},
                       cfg["repeats"])
    # Fewer repeats of the naive loop (it costs about T predictions). Each is compared with
    # the median of 3 predictions of the same images just before it and 3 just after: the load
    # of a shared machine changes over the naive loop's many seconds, and one short
    # prediction alone is too noisy a reference. The naive loop calls the same predict
    # function on the same batch shapes as ``single(x_naive)``: one warm-up serves both.
    single(x_naive)
    naive = {"single": [], "naive": []}
    for _ in range(int(cfg["naive_repeats"])):
        around = [_wall(lambda: single(x_naive))() for _ in range(3)]
        naive["naive"].append(_wall(lambda: naive_mc_predict(model, x_naive, T=T,
                                                             batch_size=batch))())
        around += [_wall(lambda: single(x_naive))() for _ in range(3)]
        naive["single"].append(statistics.median(around))
    ratio, spread = _ratio(times["mc"], times["single"])
    naive_ratio, naive_spread = _ratio(naive["naive"], naive["single"])
    return {
        "backbone": cfg["backbone"], "image_size": cfg["size"], "images": len(x),
        "naive_images": len(x_naive), "batch_size": batch, "T": T,
        "single_predict_seconds": _stats(times["single"]),
        "mc_predict_seconds": _stats(times["mc"]),
        "naive_single_predict_seconds": _stats(naive["single"]),
        "naive_mc_predict_seconds": _stats(naive["naive"]),
        "ratio_vs_single_predict": ratio, "ratio_spread": spread,
        "naive_ratio_vs_single_predict": naive_ratio, "naive_ratio_spread": naive_spread,
        "method": "single = model.predict_on_batch over the batches (one pass of the whole "
                  "network); mc = karyo.uncertainty.mc_dropout.mc_predict (backbone once, head T times in "
                  "one tf.function); naive = naive_mc_predict (the whole network T times) on "
                  "the first naive_images images, against the median of 6 single predictions "
                  "of those images around each naive run (naive_single_predict_seconds)",
    }


def bench_head_training(cfg, images, folder):
    """One epoch of the head on cached features vs one epoch of the whole frozen-backbone model.

    ``folder`` holds the feature cache (use an empty one: the extraction is timed).
    """
    cache_dir = Path(folder)

    x = _resized_pool(images, cfg["images"], cfg["size"])
    y = _labels(len(x))
    batch = int(cfg["batch_size"])
    model = build_model(cfg["backbone"], cfg["size"], seed=0)
    frozen, head = split_model(model, 0)
    start = time.perf_counter()
    features = cached_features(frozen, x, [cfg["backbone"], "bench", cfg["size"], "pooled"],
                               cache_dir, batch_size=32, progress=False)
    extraction = time.perf_counter() - start
    start = time.perf_counter()
    cached_features(frozen, x, [cfg["backbone"], "bench", cfg["size"], "pooled"], cache_dir,
                    batch_size=32, progress=False)
    reread = time.perf_counter() - start

    compile_model(model, 1e-3)
    compile_model(head, 1e-3)
    times = _alternate({
        "head": _one_epoch(head, make_dataset(features, y, batch, shuffle=True)),
        "end_to_end": _one_epoch(model, make_dataset(x.astype(np.float32), y, batch, shuffle=True)),
    }, cfg["repeats"])
    speedup, spread = _ratio(times["end_to_end"], times["head"])
    head_epoch = statistics.median(times["head"])
    e2e_epoch = statistics.median(times["end_to_end"])
    return {
        "backbone": cfg["backbone"], "image_size": cfg["size"], "images": cfg["images"],
        "batch_size": batch,
        "head_epoch_seconds": _stats(times["head"]),
        "end_to_end_epoch_seconds": _stats(times["end_to_end"]),
        "speedup_vs_end_to_end": speedup, "speedup_spread": spread,
        "extraction_seconds": extraction, "cache_read_seconds": reread,
        # Epochs after which caching has paid for its extraction pass.
        "break_even_epochs": extraction / max(e2e_epoch - head_epoch, 1e-9),
        "method": "Keras fit, one epoch per call (training epoch, no validation), Adam and the "
                  "thesis' metrics (karyo.experiments.fit.compile_model), karyo.data.pipeline.make_dataset; "
                  "extraction = karyo.models.features.cached_features into an empty cache",
    }


def _matmul_bf16_measure(n):
    """One n x n bfloat16 matrix multiply in TensorFlow (seconds): the bf16 units' limit."""
    import tensorflow as tf

    rng = np.random.default_rng(1)
    a = tf.constant(rng.random((n, n), dtype=np.float32), dtype=tf.bfloat16)
    b = tf.constant(rng.random((n, n), dtype=np.float32), dtype=tf.bfloat16)
    matmul = tf.function(lambda x, y: tf.reduce_sum(tf.cast(tf.linalg.matmul(x, y), tf.float32)))
    return _wall(lambda: matmul(a, b).numpy())


def bench_pretraining(cfg, images=None, folder=None):
    """Chromosome pretraining's training throughput in float32 and mixed_bfloat16, side by side.

    One epoch of ``karyo.experiments.pretrain.build_classifier`` (every layer trainable) on
    synthetic chromosome crops, alternating the two precisions with a float32 and a bfloat16
    matmul, so each precision's share of its own matmul limit compares measurements taken under
    the same load. A training step is counted as three forward passes (forward, and the two
    products of the backward pass). ``images`` and ``folder`` are not used.
    """
    backbone, size, batch = cfg["backbone"], int(cfg["size"]), int(cfg["batch_size"])
    crops, labels = synthetic_chromosomes(int(cfg["images"]), size, int(cfg["karyogram_size"]), seed=0)
    dataset = make_dataset(crops.astype(np.float32), labels.astype(np.int64), batch, shuffle=True)
    macs = count_macs(build_backbone(backbone, size, "none"))
    measures = {}
    for precision in PRECISIONS:
        keras.backend.clear_session()
        model, _ = build_classifier(backbone, size, seed=0, precision=precision)
        model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="sparse_categorical_crossentropy")
        measures[precision] = _one_epoch(model, dataset)
    n = int(cfg["matmul_n"])
    measures["matmul_float32"] = _matmul_measures(n)["matmul_tensorflow"]
    measures["matmul_bfloat16"] = _matmul_bf16_measure(n)
    times = _alternate(measures, cfg["repeats"])
    matmul_flops = 2.0 * n ** 3
    result = {"backbone": backbone, "image_size": size, "images": len(crops), "batch_size": batch,
              "karyogram_size": cfg["karyogram_size"], "gmacs_per_image": macs / 1e9}
    limits = {"float32": "matmul_float32", "mixed_bfloat16": "matmul_bfloat16"}
    for precision in PRECISIONS:
        epochs, matmuls = times[precision], times[limits[precision]]
        stats = _stats(epochs)
        shares = [(len(crops) * 3 * 2 * macs / e) / (matmul_flops / m) for e, m in zip(epochs, matmuls)]
        result[precision] = {
            "images_per_second": len(crops) / stats["median"], "epoch_seconds": stats,
            "achieved_gflops": len(crops) * 3 * 2 * macs / stats["median"] / 1e9,
            "matmul_limit_gflops": matmul_flops / statistics.median(matmuls) / 1e9,
            "share_of_matmul_limit": statistics.median(shares),
        }
    result["bf16_speedup"], result["bf16_speedup_spread"] = _ratio(times["float32"], times["mixed_bfloat16"])
    result["bf16_matmul_speedup"], _ = _ratio(times["matmul_float32"], times["matmul_bfloat16"])
    result["method"] = ("Keras fit, one epoch per call, Adam, every layer trainable "
                        "(karyo.experiments.pretrain.build_classifier) on karyo.karyograms.chromosome_synth crops; "
                        "float32 and mixed_bfloat16 alternated with a float32 and a bfloat16 TensorFlow matmul")
    return result


def bench_unfreeze_last_block(cfg, images, folder):
    """VGG16 with block 5 unfrozen: an epoch on cached block-4 output vs on images.

    ``folder`` holds the cache of block 4's output (use an empty one: the extraction is timed).
    """
    cache_dir = Path(folder)

    x = _resized_pool(images, cfg["images"], cfg["size"], seed=1)
    y = _labels(len(x))
    batch = int(cfg["batch_size"])
    model = unfreeze_blocks(build_model(cfg["backbone"], cfg["size"], seed=0), 1)
    frozen, rest = split_model(model, 1)
    start = time.perf_counter()
    cached = cached_features(frozen, x, [cfg["backbone"], "bench", cfg["size"], "unfreeze1"],
                             cache_dir, batch_size=32, progress=False)
    extraction = time.perf_counter() - start
    compile_model(model, FINE_TUNE_LEARNING_RATE)
    compile_model(rest, FINE_TUNE_LEARNING_RATE)
    times = _alternate({
        "cached": _one_epoch(rest, make_dataset(cached, y, batch, shuffle=True)),
        "full": _one_epoch(model, make_dataset(x.astype(np.float32), y, batch, shuffle=True)),
    }, cfg["repeats"])
    speedup, spread = _ratio(times["full"], times["cached"])
    return {
        "backbone": cfg["backbone"], "image_size": cfg["size"], "images": cfg["images"],
        "batch_size": batch, "cached_shape": list(cached.shape[1:]),
        "cached_epoch_seconds": _stats(times["cached"]),
        "full_network_epoch_seconds": _stats(times["full"]),
        "speedup": speedup, "speedup_spread": spread, "extraction_seconds": extraction,
        "method": "karyo.models.unfreeze.unfreeze_blocks(model, 1) then split_model(model, 1): the "
                  "trainable part (block5 + pool + head) on cached block4_pool output vs the "
                  "whole model on images; one Keras fit epoch per call, no validation",
    }


def bench_detector(cfg, images, folder):
    """The karyotype detector on rendered karyogram files: read + features + T MC passes, per karyogram.

    ``karyograms`` karyograms of :data:`DETECTOR_KARYOTYPES` are rendered at ``size`` and written
    as PNG files (untimed), a detector is fitted on their readings (untimed: its speed does not
    depend on its weights), and :func:`karyo.models.detector.predict_karyograms` is timed on all
    the files in one call (what ``karyo predict FOLDER`` does) and on each file alone (one
    karyogram at a time, as a laboratory scores a new cell). ``images`` is not used.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths, readings, labels = [], [], []
    for i in range(int(cfg["karyograms"])):
        karyotype = get_karyotype(DETECTOR_KARYOTYPES[i % len(DETECTOR_KARYOTYPES)])
        image = render_karyogram(karyotype, size=int(cfg["size"]), rng=np.random.default_rng(i))
        path = folder / f"k{i}.png"
        path.write_bytes(encode_png(image))
        paths.append(path)
        readings.append(compact(read_slots(image)))
        labels.append(slot_labels(karyotype_counts(karyotype)))
    detector = fit_detector(readings, labels, epochs=int(cfg["epochs"]), batch_size=64, seed=0)
    T, n = int(cfg["T"]), len(paths)

    def one_by_one():
        for path in paths:
            predict_karyograms(detector, [path], T=T, seed=0)

    times = _alternate({"batch": _wall(lambda: predict_karyograms(detector, paths, T=T, seed=0)),
                        "single": _wall(one_by_one)}, cfg["repeats"])
    batch, single = _stats(times["batch"]), _stats(times["single"])
    return {
        "image_size": int(cfg["size"]), "karyograms": n, "T": T,
        "seconds_per_karyogram": batch["median"] / n,
        "seconds_per_karyogram_spread": {"min": batch["min"] / n, "max": batch["max"] / n},
        "seconds_per_karyogram_one_by_one": single["median"] / n,
        "one_by_one_spread": {"min": single["min"] / n, "max": single["max"] / n},
        "method": "karyo.models.detector.predict_karyograms(detector, files, T): decode, read_slots, "
                  "features and T MC Dropout passes of the slot head, on rendered karyogram PNG files; "
                  "all files in one call (seconds_per_karyogram) and one file per call (one_by_one)",
    }


def _tuner_trial(build, x, y, x_val, y_val, epochs, directory, project):
    """Run one keras-tuner trial (random search, lr log-uniform, batch size in ``fit``)."""
    import keras_tuner as kt

    class OneTrial(kt.HyperModel):
        def build(self, hp):
            return compile_model(build(), hp.Float("lr", 7e-4, 3e-2, sampling="log"))

        def fit(self, hp, model, *args, **kwargs):
            size = hp.Choice("batch_size", [16, 32])
            return model.fit(make_dataset(x, y, size, shuffle=True),
                             validation_data=make_dataset(x_val, y_val, size), epochs=epochs,
                             verbose=0, shuffle=False, callbacks=kwargs.get("callbacks"))

    tuner = kt.RandomSearch(OneTrial(), objective="val_loss", max_trials=1, seed=0,
                            directory=str(directory), project_name=project, overwrite=True)
    # Every trial builds a new model and so traces new functions, as a real search does;
    # TensorFlow's "triggered tf.function retracing" warning about it is expected here.
    tf_logger = logging.getLogger("tensorflow")
    level = tf_logger.level
    tf_logger.setLevel(logging.ERROR)
    try:
        start = time.perf_counter()
        tuner.search(verbose=0)
        seconds = time.perf_counter() - start
    finally:
        tf_logger.setLevel(level)
    trials = list(tuner.oracle.trials.values())
    if not trials or trials[0].status != "COMPLETED":
        # keras-tuner records a failed trial and returns normally (SPEC 8): say why.
        reason = getattr(trials[0], "message", None) if trials else "no trial ran"
        raise KaryoError(f"keras-tuner trial '{project}' did not complete: {reason}")
    return seconds, dict(trials[0].hyperparameters.values)


def bench_tuner_trial(cfg, images, folder):
    """One keras-tuner trial on cached features vs the same trial on images.

    ``folder`` receives the feature cache and keras-tuner's project folders.
    """
    cache_dir, workdir = Path(folder) / "cache", Path(folder) / "tuner"
    x = _resized_pool(images, cfg["images"], cfg["size"], seed=2)
    y = _labels(len(x))
    n_val = max(2, len(x) // 4)
    size, backbone = cfg["size"], cfg["backbone"]
    frozen, _ = split_model(build_model(backbone, size, seed=0), 0)
    start = time.perf_counter()
    features = cached_features(frozen, x, [backbone, "bench", size, "pooled"], cache_dir,
                               batch_size=32, progress=False)
    extraction = time.perf_counter() - start
    keras.backend.clear_session()
    arms = {"cached": (features, lambda: build_head(features.shape[-1], seed=0)),
            "images": (x.astype(np.float32), lambda: build_model(backbone, size, seed=0))}

    def trial(arm, name):
        data, build = arms[arm]
        return _tuner_trial(build, data[n_val:], y[n_val:], data[:n_val], y[:n_val],
                            cfg["epochs"], workdir, name)

    # Untimed: the first trial of a process also pays for keras-tuner's one-time set-up. Every
    # timed trial builds and traces its own model, as the trials of a real search do.
    trial("cached", "warm-up")
    runs = {"cached": [], "images": []}
    for r in range(int(cfg["repeats"])):
        for arm in runs:
            seconds, hps = trial(arm, f"{arm}-{r}")
            runs[arm].append(seconds)
    speedup, spread = _ratio(runs["images"], runs["cached"])
    return {
        "backbone": backbone, "image_size": size, "images": cfg["images"],
        "validation_images": n_val, "epochs": cfg["epochs"], "hyperparameters": hps,
        "cached_trial_seconds": _stats(runs["cached"]),
        "images_trial_seconds": _stats(runs["images"]),
        "speedup": speedup, "speedup_spread": spread, "extraction_seconds": extraction,
        "method": "keras_tuner.RandomSearch, max_trials=1, objective val_loss, a HyperModel in "
                  "karyo.bench.suite (lr log-uniform in [7e-4, 3e-2], batch size 16/32 in fit); "
                  "cached: the head on features extracted once (cost reported separately); "
                  "images: the whole frozen-backbone model built and fitted by the trial. "
                  "karyo.experiments.tuning.tune is not used: it reads a manifest and always caches.",
    }


# ------------------------------------------------------------------------------ report


#: ``karyo predict``'s old way, for the throughput comparison: every image decoded into one array.
_IN_MEMORY_PREDICT = """
import sys
from pathlib import Path
from karyo.data.imageio import is_image_path
from karyo.data.manifest import KARYOGRAM_LABELS
from karyo.data.pipeline import load_paths
from karyo.experiments.runs import load_models, pooled_passes, read_config
from karyo.uncertainty.confidence import predictions_table, summarize_passes
run, folder, passes = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
files = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_path(p))
images, good, _ = load_paths(files, read_config(run)["experiment"]["image_size"])
summary = summarize_passes(pooled_passes(load_models(run), images, passes, 0), threshold=0.8)
predictions_table([str(p) for p in good], None, summary, class_names=KARYOGRAM_LABELS)
"""


def _tiny_run(folder, size):
    """A run folder holding a tiny model at ``size`` px: one strided convolution, then the thesis' head.

    What is measured is the input pipeline's memory, which a big backbone would only slow down.
    """
    keras.utils.set_random_seed(0)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(8, 5, strides=8, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, build_head(8, seed=0)(x))
    folder.mkdir(parents=True)
    model.save(folder / "model.keras")
    config = {"experiment": {"image_size": size, "title": "bench: tiny model"}, "data": {"split_root": str(folder)}}
    atomic_write_text(folder / "config.json", json.dumps(config))
    return folder


def _measure_child(args, env):
    """Run a command; return its wall seconds and its own peak RSS in MB (``os.wait4``'s rusage)."""
    import subprocess

    with tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            err.seek(0)
            lines = err.read().decode("utf-8", "replace").strip().splitlines() or ["(no output)"]
            raise KaryoError(f"benchmark command failed ({' '.join(map(str, args[:4]))} ...): {lines[-1]}")
    # ru_maxrss is in kilobytes on Linux, in bytes on macOS.
    scale = 1 / 1024 ** 2 if platform.system() == "Darwin" else 1 / 1024
    return seconds, usage.ru_maxrss * scale


def bench_predict_memory(cfg, images, folder):
    """Peak memory of ``karyo predict`` (a subprocess) on more and more 416 px karyograms.

    One karyogram of ``images`` is written once and copied to reach each count; a tiny model
    scores them (:func:`_tiny_run`). The peak resident set size of each ``karyo predict`` is
    read from ``os.wait4``; streamed decoding should keep it flat. At the smallest count the
    streamed command is timed in alternation with the old in-memory way (every image decoded
    into one array, :data:`_IN_MEMORY_PREDICT`), which is run only there.
    """
    import shutil
    import sys

    size, counts, passes = int(cfg["size"]), tuple(cfg["counts"]), int(cfg["T"])
    run = _tiny_run(folder / "run", size)
    picture = encode_png(resize(np.asarray(images[0]), size)[:, :, 0])
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                           os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    streamed_cmd = [sys.executable, "-m", "karyo", "predict", "--model", str(run), "--mc", str(passes)]
    data = folder / "karyograms"
    data.mkdir()
    (data / "k00000.png").write_bytes(picture)
    result = {"image_size": size, "mc_passes": passes, "counts": list(counts),
              "model": "one 5x5 convolution (8 filters, stride 8) + the thesis' head",
              "peak_rss_mb": {}, "seconds": {}}
    made = 1
    for n in counts:
        for i in range(made, n):
            shutil.copyfile(data / "k00000.png", data / f"k{i:05d}.png")
        made = max(made, n)
        if n == counts[0]:
            measures = {
                "streamed": lambda: _measure_child(streamed_cmd + [str(data)], env),
                "in_memory": lambda: _measure_child(
                    [sys.executable, "-c", _IN_MEMORY_PREDICT, str(run), str(data), str(passes)], env),
            }
            runs = {name: [] for name in measures}
            for _ in range(int(cfg["repeats"])):
                for name, measure in measures.items():  # in alternation, so load hits both alike
                    runs[name].append(measure())
            seconds = {name: [r[0] for r in values] for name, values in runs.items()}
            result["in_memory_seconds"] = _stats(seconds["in_memory"])
            result["in_memory_peak_rss_mb"] = max(r[1] for r in runs["in_memory"])
            result["throughput_vs_in_memory"] = statistics.median(
                m / s for s, m in zip(seconds["streamed"], seconds["in_memory"]))
            result["seconds"][str(n)] = _stats(seconds["streamed"])
            result["peak_rss_mb"][str(n)] = max(r[1] for r in runs["streamed"])
        else:
            seconds, rss = _measure_child(streamed_cmd + [str(data)], env)
            result["seconds"][str(n)] = _stats([seconds])
            result["peak_rss_mb"][str(n)] = rss
    peaks = [result["peak_rss_mb"][str(n)] for n in counts]
    result["peak_rss_mb_at_most_images"] = peaks[-1]
    result["rss_growth"] = peaks[-1] / peaks[0]
    return result


def machine_info():
    """Cores, library versions and platform (recorded with every benchmark)."""
    import tensorflow as tf

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {
        "cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable,
        "platform": platform.platform(), "python": platform.python_version(),
        "karyo": __version__, "tensorflow": tf.__version__, "keras": keras.__version__,
        "numpy": np.__version__,
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
        "tf_enable_onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "(unset: on)"),
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "mixed_precision_policy": keras.mixed_precision.global_policy().name,
        # Other processes' load slows every figure (the ratios less: both sides share it).
        "load_average_at_start": _load_average(),
    }


def _load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):  # not available on this platform
        return None


def bench_reproduce_overhead(cfg, images, folder):
    """Share of ``karyo reproduce``'s wall time spent outside training and prediction.

    Runs ``reproduce`` (preset ``cfg["preset"]``, offline weights ``none`` so that nothing is
    downloaded or pretrained) with timers around the functions that train (``train_model``, the
    search's ``fit_trial``) and predict (``pooled_passes``): the rest is checking and decoding
    data, the leakage guard, the split, writing files and the report. ``images`` is not used.
    """
    timed = {"train": 0.0, "predict": 0.0}
    patches = ((training_module, "train_model", "train"), (hypermodel_module, "fit_trial", "train"),
               (runs_module, "pooled_passes", "predict"))
    originals = [getattr(module, name) for module, name, _ in patches]

    def timer(function, kind):
        def wrapped(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                timed[kind] += time.perf_counter() - start
        return wrapped

    for (module, name, kind), original in zip(patches, originals):
        setattr(module, name, timer(original, kind))
    try:
        start = time.perf_counter()
        reproduce(Path(folder) / "reproduce", preset=cfg["preset"], weights="none", log=lambda *a: None)
        total = time.perf_counter() - start
    finally:
        for (module, name, _), original in zip(patches, originals):
            setattr(module, name, original)
    inside = timed["train"] + timed["predict"]
    return {"preset": cfg["preset"], "seconds": total, "train_seconds": timed["train"],
            "predict_seconds": timed["predict"], "share_outside_training_and_prediction": 1 - inside / total}


def evaluate_goals(result):
    """The SPEC 6 goals with the measured value and whether each is met (missing: not met)."""
    goals = {}
    measured = [goal for goal in MEASURED_ONLY_GOALS if goal[0] in result]
    for section, key, op, bound in GOALS + tuple(measured):
        value = result.get(section, {}).get(key)
        met = value is not None and (value <= bound if op == "<=" else value >= bound)
        goals[f"{section}.{key}"] = {"value": value, "goal": f"{op} {bound:g}", "met": bool(met)}
    return goals


#: The function measuring each section after ``synth_render``: ``f(settings, images, folder)``
#: with ``folder`` an empty scratch folder of its own.
_SECTION_FUNCTIONS = {
    "backbone_throughput": bench_backbone_throughput,
    "mc_dropout": bench_mc_dropout,
    "head_training": bench_head_training,
    "unfreeze_last_block": bench_unfreeze_last_block,
    "tuner_trial": bench_tuner_trial,
    "pretraining": bench_pretraining,
    "detector": bench_detector,
    "predict_memory": bench_predict_memory,
    "reproduce_overhead": bench_reproduce_overhead,
}


def _preset_name(quick, tiny):
    return "tiny" if tiny else "quick" if quick else "full"


def _mixed_precision(flag):
    if flag is None:
        flag = os.environ.get(MIXED_PRECISION_ENV, "").strip().lower() in ("1", "true", "yes", "on")
    return bool(flag)


def run_bench(quick=False, out=None, progress=True, tiny=False, sections=None,
              mixed_precision=None):
    """Measure karyo's speed against the naive implementation; return (and write) the figures.

    Args:
        quick: the ``quick`` preset (a few minutes on a 2-core CPU) instead of ``full``.
        out: write the result there as JSON (atomically); None: do not write.
        progress: show a progress bar over the sections (on standard error).
        tiny: the ``tiny`` preset (seconds, for tests; overrides ``quick``).
        sections: measure only these (names from :data:`SECTIONS`); default all.
        mixed_precision: run under the ``mixed_float16`` policy (for GPUs); None: on when
            ``$KARYO_MIXED_PRECISION`` is 1 / true / yes / on.

    Returns:
        dict with ``schema``, ``preset``, ``machine``, one entry per section (see the module
        docstring), ``goals`` (each with ``value``, ``goal``, ``met``) and ``seconds`` (the
        benchmark's own duration).

    Raises:
        KaryoError: an unknown section name, or ``out`` cannot be written.
    """
    from tqdm.auto import tqdm

    chosen = tuple(SECTIONS if sections is None else sections)
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        raise KaryoError(f"unknown benchmark section '{unknown[0]}' "
                         f"(choose from {', '.join(SECTIONS)})")
    preset = _preset_name(quick, tiny)
    cfg = PRESETS[preset]
    chosen = tuple(s for s in chosen if s in cfg)  # a preset may leave a slow section out
    started = time.perf_counter()
    previous_policy = keras.mixed_precision.global_policy().name
    if _mixed_precision(mixed_precision):
        keras.mixed_precision.set_global_policy("mixed_float16")
    result = {"schema": SCHEMA_VERSION, "preset": preset, "settings": _plain(cfg),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine_info()}
    try:
        with tempfile.TemporaryDirectory(prefix="karyo-bench-") as tmp:
            tmp = Path(tmp)
            bar = tqdm(chosen, desc="bench", unit="section", disable=not progress)
            images = None
            for section in bar:
                bar.set_description(f"bench {section}")
                section_start = time.perf_counter()
                keras.backend.clear_session()
                keras.utils.set_random_seed(0)
                if section == "synth_render":
                    result[section], images = bench_synth_render(cfg[section], tmp)
                else:
                    if images is None:  # rendering not measured, or karyo.karyograms.synth missing
                        images = _karyograms(cfg["synth_render"], tmp / "images")
                    # A folder per section: each extraction fills an empty cache.
                    result[section] = _SECTION_FUNCTIONS[section](cfg[section], images,
                                                                  tmp / section)
                result[section]["section_seconds"] = time.perf_counter() - section_start
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
        keras.backend.clear_session()
    result["goals"] = evaluate_goals(result)
    result["machine"]["load_average_at_end"] = _load_average()
    result["seconds"] = time.perf_counter() - started
    if out is not None:
        try:
            atomic_write_text(out, json.dumps(_plain(result), indent=2) + "\n")
        except OSError as exc:
            raise KaryoError(f"{out}: cannot write the benchmark ({exc.strerror or exc})") from None
    return result


def _plain(value):
    """``value`` with numpy scalars turned into Python numbers (for JSON)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _fmt(value, unit=""):
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}{unit}"
    if abs(value) >= 10:
        return f"{value:.1f}{unit}"
    if abs(value) >= 1:
        return f"{value:.2f}{unit}"
    return f"{value:.3g}{unit}"


def format_bench(result):
    """A short human-readable table of a :func:`run_bench` result (what ``karyo bench`` prints)."""
    rows = []

    def add(name, value, spread=None, goal="", unit=""):
        text = _fmt(value, unit)
        if spread:
            text += f"  ({_fmt(spread[0], unit)}-{_fmt(spread[1], unit)})"
        rows.append((name, text, goal))

    goals = result.get("goals", {})

    def goal_text(key):
        goal = goals.get(key)
        return "" if goal is None else f"{goal['goal']}  {'met' if goal['met'] else 'NOT MET'}"

    mc = result.get("mc_dropout")
    if mc:
        where = f"{mc['backbone']} {mc['image_size']}px, {mc['images']} images"
        add(f"MC Dropout T={mc['T']} / one prediction ({where})", mc["ratio_vs_single_predict"],
            (mc["ratio_spread"]["min"], mc["ratio_spread"]["max"]),
            goal_text("mc_dropout.ratio_vs_single_predict"), "x")
        add(f"naive MC Dropout T={mc['T']} / one prediction ({mc.get('naive_images', '?')} images)",
            mc["naive_ratio_vs_single_predict"],
            (mc["naive_ratio_spread"]["min"], mc["naive_ratio_spread"]["max"]), unit="x")
    head = result.get("head_training")
    if head:
        where = f"{head['backbone']} {head['image_size']}px, {head['images']} images"
        add(f"head epoch speedup, cached vs end-to-end ({where})", head["speedup_vs_end_to_end"],
            (head["speedup_spread"]["min"], head["speedup_spread"]["max"]),
            goal_text("head_training.speedup_vs_end_to_end"), "x")
        add("  one-time feature extraction", head["extraction_seconds"], unit=" s")
    unf = result.get("unfreeze_last_block")
    if unf:
        where = f"{unf['backbone']} {unf['image_size']}px, {unf['images']} images"
        add(f"last block epoch speedup, cached block 4 ({where})", unf["speedup"],
            (unf["speedup_spread"]["min"], unf["speedup_spread"]["max"]),
            goal_text("unfreeze_last_block.speedup"), "x")
    tun = result.get("tuner_trial")
    if tun:
        add(f"keras-tuner trial speedup, cached vs images ({tun['epochs']} epochs)",
            tun["speedup"], (tun["speedup_spread"]["min"], tun["speedup_spread"]["max"]), unit="x")
    det = result.get("detector")
    if det:
        add(f"karyotype detector, T={det['T']}, {det['karyograms']} files at {det['image_size']}px "
            "(s per karyogram)", det["seconds_per_karyogram"],
            (det["seconds_per_karyogram_spread"]["min"], det["seconds_per_karyogram_spread"]["max"]),
            goal_text("detector.seconds_per_karyogram"), " s")
        add("  one file per call (s per karyogram)", det["seconds_per_karyogram_one_by_one"],
            (det["one_by_one_spread"]["min"], det["one_by_one_spread"]["max"]), unit=" s")
    thr = result.get("backbone_throughput")
    if thr:
        for name in ("vgg16", "inceptionv3"):
            if name in thr:
                fig = thr[name]
                add(f"{name} features at {thr['image_size']}px (images/s)", fig["images_per_second"],
                    (fig["images_per_second_min"], fig["images_per_second_max"]),
                    f"{fig['share_of_matmul_limit']:.0%} of matmul GFLOP/s")
        add("dense matmul (GFLOP/s, float32)", thr["matmul"]["limit_gflops"])
    pre = result.get("pretraining")
    if pre:
        where = f"{pre['backbone']} {pre['image_size']}px, every layer trained"
        for precision in PRECISIONS:
            fig = pre[precision]
            add(f"pretraining {precision} ({where}; images/s)", fig["images_per_second"],
                goal=f"{fig['share_of_matmul_limit']:.0%} of its matmul limit "
                     f"({fig['matmul_limit_gflops']:.0f} GFLOP/s)")
        add("  pretraining speedup, mixed_bfloat16 vs float32", pre["bf16_speedup"],
            (pre["bf16_speedup_spread"]["min"], pre["bf16_speedup_spread"]["max"]),
            goal=f"matmul alone {pre['bf16_matmul_speedup']:.2f}x", unit="x")
    mem = result.get("predict_memory")
    if mem:
        for n in mem["counts"]:
            add(f"karyo predict peak RSS, {n:,} karyograms at {mem['image_size']}px (MB)", mem["peak_rss_mb"][str(n)],
                goal=goal_text("predict_memory.peak_rss_mb_at_most_images") if n == mem["counts"][-1] else "")
        add(f"  streamed / in-memory throughput at {mem['counts'][0]:,} (in-memory peak "
            f"{mem['in_memory_peak_rss_mb']:,.0f} MB)", mem["throughput_vs_in_memory"],
            goal=goal_text("predict_memory.throughput_vs_in_memory"), unit="x")
    over = result.get("reproduce_overhead")
    if over:
        add(f"karyo reproduce --preset {over['preset']}: share of wall time outside training and "
            f"prediction ({over['seconds']:.0f} s)", 100 * over["share_outside_training_and_prediction"], unit=" %")
    syn = result.get("synth_render")
    if syn:
        if syn.get("available"):
            add(f"render {syn['images']} karyograms at {syn['image_size']}px", syn["seconds"]["median"],
                (syn["seconds"]["min"], syn["seconds"]["max"]), unit=" s")
        else:
            rows.append(("render the alpha-dataset", "not measured", syn.get("reason", "")))
    width = max([len(r[0]) for r in rows] + [10])
    value_width = max([len(r[1]) for r in rows] + [5])
    machine = result.get("machine", {})
    lines = [f"karyo bench ({result.get('preset', '?')}): {machine.get('cpu', '?')}, "
             f"{machine.get('cores', '?')} cores, TensorFlow {machine.get('tensorflow', '?')}, "
             f"{result.get('seconds', 0):.0f} s"]
    lines += [f"{name:<{width}}  {value:>{value_width}}  {goal}".rstrip() for name, value, goal in rows]
    return "\n".join(lines)
