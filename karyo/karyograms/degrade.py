"""Chromosome crops degraded the way other laboratories' exports are: tilted, bent, thin, pale, with neighbours.

gband612's crops are straightened, high-contrast and clean. Many laboratories' karyotyping exports,
and detection datasets, give raw bounding boxes cut from the metaphase instead. :func:`degrade_crop`
turns a clean crop into such a box, one effect at a time, each drawn at random up to ``strength``:

- **rotation**: the chromosome lies at an angle (up to 35 degrees at strength 1), on an enlarged canvas;
- **bending**: its axis curves (a half sine, up to 15 % of its length sideways);
- **thinning**: it is narrower (width x 0.6-0.9);
- **contrast**: it is paler (its darkness x 0.5-0.8);
- **neighbour fragments**: a piece of another chromosome of the cell enters the box at one side.

:func:`degrade_cell` degrades every crop of a cell (``{slot: [crop, ...]}``), with a fragment
taken from another chromosome of the same cell, so that a degraded cell can be assembled
(:func:`karyo.karyograms.assemble.prepare_crops`) and read like any other. Crops on a dark field
(Q-banding) are degraded the same way, inverted.

Examples:
    >>> import numpy as np
    >>> crop = np.full((60, 14), 255, np.uint8); crop[4:56, 3:11] = 60
    >>> out = degrade_crop(crop, np.random.default_rng(0))
    >>> out.dtype, out.ndim, int(out.min()) > 60
    (dtype('uint8'), 2, True)
"""

import math

import numpy as np

from karyo.karyograms.assemble import rotate_whole
from karyo.karyograms.layout import WHITE

#: Largest rotation (degrees), bend (share of the length), width loss and contrast loss at strength 1.
MAX_ROTATION, MAX_BEND, THINNING, PALING = 35.0, 0.15, (0.1, 0.4), (0.2, 0.5)
#: Chance (at strength 1) that a piece of a neighbour enters the box.
FRAGMENT_CHANCE = 0.5
EFFECTS = ("rotation", "bending", "thinning", "contrast", "fragments")


def _darkness(crop, background):
    """Distance from the background as float (chromosome high), whatever the polarity."""
    c = crop.astype(np.float32)
    return np.clip(background - c if background >= 128 else c - background, 0, 255)


def _from_darkness(dark, background):
    dark = np.clip(dark, 0, 255)
    out = background - dark if background >= 128 else background + dark
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _bend(dark, amount):
    """Shift each row sideways by ``amount * sin(pi * y / h)`` (a half sine: the middle moves most)."""
    import cv2

    h, w = dark.shape
    pad = int(math.ceil(abs(amount))) + 1
    canvas = np.zeros((h, w + 2 * pad), np.float32)
    canvas[:, pad:pad + w] = dark
    ys, xs = np.mgrid[0:h, 0:w + 2 * pad].astype(np.float32)
    shift = amount * np.sin(np.pi * ys / max(h - 1, 1))
    return cv2.remap(canvas, (xs - shift).astype(np.float32), ys, interpolation=cv2.INTER_LINEAR, borderValue=0)


def _fragment(dark, neighbour, rng):
    """Put a piece of ``neighbour`` (darkness) at one side of ``dark``, touching the box's edge."""
    nh, nw = neighbour.shape
    ph = max(2, int(nh * rng.uniform(0.2, 0.4)))
    top = int(rng.integers(0, max(nh - ph, 0) + 1))
    piece = neighbour[top:top + ph]
    h, w = dark.shape
    side = rng.choice(["left", "right", "top", "bottom"])
    if side in ("left", "right"):
        # the piece enters from the side; its width shows, overlapping the box by a third of it
        piece = piece[:, : max(2, piece.shape[1] * 2 // 3)]
        H, W = max(h, ph), w + piece.shape[1]
        out = np.zeros((H, W), np.float32)
        x0 = piece.shape[1] if side == "left" else 0
        out[:h, x0:x0 + w] = dark
        px = 0 if side == "left" else w
        py = int(rng.integers(0, H - ph + 1))
        out[py:py + ph, px:px + piece.shape[1]] = np.maximum(out[py:py + ph, px:px + piece.shape[1]], piece)
        return out
    H, W = h + ph, max(w, nw)
    out = np.zeros((H, W), np.float32)
    y0 = ph if side == "top" else 0
    out[y0:y0 + h, :w] = dark
    py = 0 if side == "top" else h
    px = int(rng.integers(0, W - nw + 1))
    out[py:py + ph, px:px + nw] = np.maximum(out[py:py + ph, px:px + nw], piece)
    return out


def degrade_crop(crop, rng, background=WHITE, neighbour=None, strength=1.0, effects=EFFECTS):
    """One chromosome crop as another laboratory's raw export might cut it (see the module docstring).

    Args:
        crop: gray ``uint8`` crop of one chromosome on its background.
        rng: ``numpy.random.Generator``.
        background: the crop's background level (255 G-band, 0 Q-band).
        neighbour: another chromosome's crop (same background), for a fragment; None: no fragment.
        strength: 0 (unchanged) .. 1 (the largest effects above); each effect is drawn uniformly up to it.
        effects: which effects to apply (names of :data:`EFFECTS`).

    Returns:
        a gray ``uint8`` crop, usually larger than ``crop`` (rotation, bending and fragments enlarge the box).
    """
    import cv2

    strength = float(np.clip(strength, 0.0, 1.0))
    dark = _darkness(np.asarray(crop), background)
    if "thinning" in effects:
        factor = 1.0 - strength * rng.uniform(*THINNING)
        h, w = dark.shape
        dark = cv2.resize(dark, (max(1, int(round(w * factor))), h), interpolation=cv2.INTER_AREA)
    if "contrast" in effects:
        dark = dark * (1.0 - strength * rng.uniform(*PALING))
    if "bending" in effects:
        dark = _bend(dark, rng.choice([-1.0, 1.0]) * strength * rng.uniform(0, MAX_BEND) * dark.shape[0])
    if "rotation" in effects:
        dark = rotate_whole(dark, strength * rng.uniform(-MAX_ROTATION, MAX_ROTATION), 0)
    if "fragments" in effects and neighbour is not None and rng.random() < FRAGMENT_CHANCE * strength:
        dark = _fragment(dark, _darkness(np.asarray(neighbour), background), rng)
    return _from_darkness(dark, background)


def degrade_cell(crops, rng, background=WHITE, strength=1.0, effects=EFFECTS):
    """Every crop of a cell (``{slot: [crop, ...]}``) degraded by :func:`degrade_crop`.

    A fragment comes from another chromosome of the same cell, drawn at random.
    """
    every = [c for cs in crops.values() for c in cs]
    out = {}
    for slot, cs in crops.items():
        out[slot] = []
        for crop in cs:
            others = [c for c in every if c is not crop]
            neighbour = others[int(rng.integers(len(others)))] if others else None
            out[slot].append(degrade_crop(crop, rng, background, neighbour, strength, effects))
    return out
