"""Synthetic single-chromosome crops for the 24-class pretraining task (``1``..``22``, ``X``, ``Y``).

The crops reuse the karyogram renderer of :mod:`karyo.karyograms.synth` (same cell-level condensation,
bands from the cytoband table, centromere, chromatids, satellites, stain), so that a backbone
pretrained on them has features that fire on karyogram pixels. What matters most for the
transfer is the scale: each chromosome is drawn at the pixels-per-megabase that
``render_karyogram`` would use for a karyogram of side ``karyogram_size`` and then centred on a
crop of the backbone's input size, never stretched to fill it. A chromosome 21 stays a small
blob and a chromosome 1 a long bar, as in the karyogram the backbone will later read.

On top of the renderer's own variation, each synthetic cell varies its band resolution (band
smoothing for roughly 300-850 bands), chromatid separation, width and bending more widely than a
karyogram does, and each crop gets its own augmentation: a small rotation, a mirror image,
scale jitter, a shift, blur, brightness/contrast and camera noise. Real karyograms show
chromosomes upright with the short arm up, so rotations stay small and crops are never turned
upside down.

Every cell yields one chromosome of each of the 24 classes, so the classes are balanced; the
same seed gives the same bytes.
"""

import math

import numpy as np

from karyo.errors import KaryoError
from karyo.karyograms.karyotype import for_abnormality
from karyo.karyograms.layout import MIN_SIZE, fit_scale, slot_boxes
from karyo.data.manifest import CHROMOSOME_LABELS
from karyo.karyograms.synth import STAINS, extent, render_chromosome, sample_cell, sample_chromosome

#: ``stain`` values: G-banding, Q-banding, or half of the cells each.
STAIN_CHOICES = STAINS + ("both",)
#: Largest rotation of a crop, in degrees (chromosomes stand upright in a karyogram).
MAX_ROTATION = 15.0
#: Share of the chromosome-1 slot height kept free around the tallest chromosome in a crop.
CROP_MARGIN = 1.3


def default_crop_size(karyogram_size, min_size=32):
    """Smallest crop side (a multiple of 8, at least ``min_size``) that holds a chromosome 1
    drawn at the scale of a ``karyogram_size`` karyogram, with room for rotation and jitter."""
    if not isinstance(karyogram_size, (int, np.integer)) or karyogram_size < MIN_SIZE:
        raise KaryoError(f"karyogram size {karyogram_size} is too small (at least {MIN_SIZE} px)")
    x0, y0, x1, y1 = slot_boxes(int(karyogram_size))["1"]
    need = int(math.ceil(CROP_MARGIN * (y1 - y0) / 8.0)) * 8
    return max(int(min_size), need)


def _cell_scale(rng, cell, stain, karyogram_size):
    """Pose a 46,XY cell and return its chromosomes by slot and the karyogram's px per unit."""
    karyotype = for_abnormality("none", "XY")
    posed = {slot: [sample_chromosome(rng, ch, cell, stain) for ch in chromosomes]
             for slot, chromosomes in karyotype.slots}
    # The same scale render_karyogram uses (0.97 of the fit), so sizes match karyogram pixels.
    scale = 0.97 * fit_scale({s: [extent(c) for c in cs] for s, cs in posed.items()}, karyogram_size)
    return posed, scale


def _place(chromosome, crop_size, background, rng):
    """Centre a gray chromosome on a ``crop_size`` square of ``background``, shifted a little."""
    import cv2

    h, w = chromosome.shape
    if max(h, w) > crop_size:  # only a chromosome 1 at the top of the scale jitter
        f = crop_size / max(h, w)
        chromosome = cv2.resize(chromosome, (max(1, int(w * f)), max(1, int(h * f))),
                                interpolation=cv2.INTER_AREA)
        h, w = chromosome.shape
    canvas = np.full((crop_size, crop_size), background, np.uint8)
    room_y, room_x = crop_size - h, crop_size - w
    top = int(np.clip(room_y // 2 + rng.integers(-2, 3), 0, room_y))
    left = int(np.clip(room_x // 2 + rng.integers(-2, 3), 0, room_x))
    canvas[top:top + h, left:left + w] = chromosome
    return canvas


def _finish(crop, rng, stain, augment):
    """Camera and stain variation: blur, brightness/contrast, noise (as ``render_karyogram``)."""
    import cv2

    gray = crop.astype(np.float32)
    gray = cv2.GaussianBlur(gray, (0, 0), sigmaX=rng.uniform(0.35, 1.0) if augment else 0.5)
    if augment:
        # Contrast around the background keeps the field level plausible; brightness shifts it.
        background = float(np.median(np.concatenate([gray[0], gray[-1]])))
        gray = background + (gray - background) * rng.uniform(0.75, 1.25)
        gray += rng.uniform(-0.12, 0.12) * 255 * (0.3 if stain == "g" else 0.15)
    gray += rng.normal(0.0, rng.uniform(0.6, 4.0) if augment else 1.0, gray.shape).astype(np.float32)
    return np.clip(gray, 0, 255).round().astype(np.uint8)


def synthetic_chromosomes(n, crop_size, karyogram_size, seed=0, stain="g", augment=True):
    """``n`` synthetic chromosome crops and their classes, classes balanced.

    Args:
        n: number of crops (cells of 24 crops, one per class, until ``n`` are drawn).
        crop_size: side of each square crop (the backbone's input size, e.g. 32 for VGG16).
        karyogram_size: side of the karyogram whose scale the chromosomes are drawn at (the
            karyogram model's input size).
        seed: the only source of randomness; cell ``j`` uses ``default_rng([seed, j])``.
        stain: ``"g"`` (dark on white), ``"q"`` (bright on dark) or ``"both"`` (alternate cells).
        augment: per-crop rotation, mirror, scale jitter, shift, blur, brightness/contrast, noise.

    Returns:
        ``(images, labels)``: ``uint8`` array (n, crop_size, crop_size, 3) with equal channels,
        and ``int`` array (n,) of indices into ``karyo.data.manifest.CHROMOSOME_LABELS``.

    Raises:
        KaryoError: a bad count, stain, crop size or karyogram size.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise KaryoError(f"number of synthetic chromosomes must be a positive integer, not {n!r}")
    if stain not in STAIN_CHOICES:
        raise KaryoError(f"unknown stain '{stain}' (choose {', '.join(STAIN_CHOICES)})")
    if not isinstance(crop_size, (int, np.integer)) or crop_size < 8:
        raise KaryoError(f"crop size {crop_size!r} is too small (at least 8 px)")
    if not isinstance(karyogram_size, (int, np.integer)) or karyogram_size < MIN_SIZE:
        raise KaryoError(f"karyogram size {karyogram_size} is too small (at least {MIN_SIZE} px)")
    images = np.empty((n, crop_size, crop_size), np.uint8)
    labels = np.empty(n, np.int64)
    k = len(CHROMOSOME_LABELS)
    for j in range(int(math.ceil(n / k))):
        rng = np.random.default_rng([seed, j])
        cell_stain = stain if stain != "both" else STAINS[j % 2]
        cell = sample_cell(rng, cell_stain)
        # Wider than a karyogram's own variation: real cells differ more than one slide does.
        cell["width"] *= rng.uniform(0.8, 1.25)
        cell["groove"] = rng.uniform(0.03, 0.4)  # chromatids from tight to clearly separated
        cell["max_bend"] = rng.uniform(0.02, 0.12)
        posed, scale = _cell_scale(rng, cell, cell_stain, int(karyogram_size))
        # Coarser smoothing = fewer visible bands (about 850 down to 300 bands).
        band_sigma = (cell["band_sigma"] * rng.uniform(0.8, 2.6) * max(1.0, karyogram_size / 416)
                      / cell["condensation"])
        order = rng.permutation(k)
        for position, label_index in enumerate(order):
            i = j * k + position
            if i >= n:
                break
            c = dict(posed[CHROMOSOME_LABELS[label_index]][0])
            px = scale
            if augment:
                c["tilt"] = math.radians(rng.uniform(-MAX_ROTATION, MAX_ROTATION))
                c["bend"] = rng.uniform(-1, 1) * cell["max_bend"]
                px = scale * rng.uniform(0.9, 1.1)
            drawn = render_chromosome(c, px, cell_stain, cell["background"], band_sigma, cell["groove"])
            if augment and rng.random() < 0.5:
                drawn = drawn[:, ::-1]
            crop = _place(np.ascontiguousarray(drawn), int(crop_size), cell["background"], rng)
            images[i] = _finish(crop, rng, cell_stain, augment)
            labels[i] = label_index
    return np.repeat(images[:, :, :, None], 3, axis=3), labels
