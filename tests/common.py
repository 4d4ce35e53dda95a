"""Helpers shared by the tests: small generated images and karyogram sets, and subprocess settings.

Tests import from here (``from tests.common import ...``), never from another test module.
"""

import os
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

#: The smallest settings a search or a training run accepts (VGG16 at 32 px, no weights).
TINY_TUNE = dict(backbone="vgg16", image_size=32, weights="none", epochs=1, augmented=False, progress=False)


def random_images(n, size, seed=0):
    """``n`` random RGB ``uint8`` images of ``size`` x ``size`` (for shapes and caching, not learning)."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)).astype(np.uint8)


def blob_image(seed, size=48, abnormal=False):
    """A gray 'karyogram-like' image: dark bars on white; an abnormal one has an extra bar (a stand-in
    for a trisomy)."""
    rng = np.random.default_rng(seed)
    image = np.full((size, size), 255, np.uint8)
    n = 4 + int(abnormal)
    for k in range(n):
        x = 3 + k * (size - 6) // n
        h = int(rng.integers(size // 3, size - 8))
        image[4:4 + h, x:x + 3] = rng.integers(0, 90)
    return image


def write_blob_manifest(root, normal, abnormal):
    """``normal`` + ``abnormal`` blob images (:func:`blob_image`) in ``root``, one case each; the manifest's path."""
    import cv2

    from karyo.data.manifest import write_manifest

    root = Path(root)
    rows = []
    for label, count in (("normal", normal), ("abnormal", abnormal)):
        for i in range(count):
            path = f"{label}_{i}.png"
            cv2.imwrite(str(root / path), blob_image(i + 100 * (label == "abnormal"), abnormal=label == "abnormal"))
            rows.append({"path": path, "label": label, "group": f"{label}{i}"})
    write_manifest(root / "manifest.csv", rows)
    return root / "manifest.csv"


def tiny_search_data(cache_dir):
    """``(cache_key, data)`` of a search trial on 12 + 4 random 32-px images for VGG16 from random weights.

    ``data`` is what ``tuner.search(data=...)`` hands a ``KaryogramHyperModel``: ``images``, ``labels`` and
    the frozen backbone's ``pooled`` features (cached in ``cache_dir`` under ``cache_key + ["pooled"]``).
    """
    from karyo.models.features import cached_features
    from karyo.models.network import build_model, split_model

    rng = np.random.default_rng(0)
    images = {p: rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for p, n in (("train", 12), ("val", 4))}
    labels = {p: np.arange(len(images[p])) % 2 for p in images}
    key = ["vgg16", "none:seed=0", 32]
    frozen, _ = split_model(build_model("vgg16", 32, seed=0), 0)
    pooled = {p: cached_features(frozen, images[p], key + ["pooled"], cache_dir, progress=False) for p in images}
    return key, {"images": images, "labels": labels, "pooled": pooled}


def write_karyograms(root, normal=18, abnormal=12, size=80):
    """``normal/`` and ``abnormal/`` folders of bars on white, and their manifest (one group each).

    Six slots of two bars; an abnormal karyogram carries a third bar in the fifth slot, so a model
    can learn the difference at small sizes.
    """
    import cv2

    from karyo.data.manifest import import_folder

    root = Path(root)
    for label, count in (("normal", normal), ("abnormal", abnormal)):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            rng = np.random.default_rng(1000 * (label == "abnormal") + i)
            image = np.full((size, size), 255, np.uint8)
            for slot in range(6):
                x = 6 + slot * 12
                bars = 3 if (label == "abnormal" and slot == 4) else 2
                for b in range(bars):
                    h = int(rng.integers(size // 3, size - 12))
                    image[6:6 + h, x + 4 * b:x + 4 * b + 3] = rng.integers(0, 80)
            cv2.imwrite(str(root / label / f"k{i}.png"), image)
    return import_folder(root, root / "manifest.csv")


def trial_json(out, trial_id):
    """keras-tuner's record of one trial in a search folder."""
    return Path(out) / "keras_tuner" / f"trial_{trial_id}" / "trial.json"


def subprocess_env(**extra):
    """The environment for a karyo subprocess: this checkout first on the path, TensorFlow quiet,
    no distributed-search variables inherited."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TF_CPP_MIN_LOG_LEVEL="3")
    for name in ("KERASTUNER_ORACLE_IP", "KERASTUNER_ORACLE_PORT", "KERASTUNER_TUNER_ID"):
        env.pop(name, None)
    env.update(extra)
    return env


#: hg38 lengths (Mb) of chromosomes 1..22, X, Y: the relative sizes of :func:`write_cell_folder`'s crops.
LENGTH_MB = (249, 242, 198, 190, 182, 171, 159, 145, 138, 134, 135, 133, 114, 107, 102, 90, 83, 80,
             59, 64, 47, 51, 156, 57)


def write_cell_folder(folder, changes=None):
    """A cell folder of crops in the layout of ../shared/data (``<folder>/<k>/<i>.png``, k = 1..24).

    Each crop is a banded bar of its chromosome's relative length, dark on white. The cell is 46,XX
    unless ``changes`` gives other counts (``{"21": 3}``, ``{"X": 1, "Y": 1}``).
    """
    import cv2

    from karyo.data.manifest import CHROMOSOME_LABELS

    counts = {slot: 2 for slot in CHROMOSOME_LABELS}
    counts["Y"] = 0
    counts.update(changes or {})
    for k, slot in enumerate(CHROMOSOME_LABELS):
        height = 8 + LENGTH_MB[k] // 4
        for i in range(counts[slot]):
            crop = np.full((height + 6, 16), 255, np.uint8)
            for y in range(3, height + 3):
                crop[y, 4:12] = (60, 140)[(y // 4) % 2]
            path = Path(folder) / str(k + 1) / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), crop)
    return Path(folder)
