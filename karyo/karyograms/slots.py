"""Read an assembled karyogram slot by slot: how many chromosomes each slot holds and what they look like.

A cytogeneticist reads a karyogram pair by pair. This module does the measuring part of that on
a karyogram in karyo's standard layout (:mod:`karyo.karyograms.layout`), synthetic or assembled from real
crops, at any size the layout allows:

    image -> polarity (dark on white, or bright on dark: turned dark on white)
          -> foreground (distance from the background level) inside each slot's box
          -> connected components, pieces of one chromosome joined (they share columns:
             the layout stands a slot's chromosomes side by side), specks dropped,
             touching chromosomes split at an empty column
          -> per chromosome: mask, crop, length along the main axis, area, banding profile

The pair numbers lie in a band under each box, which :func:`karyo.karyograms.layout.slot_boxes` excludes.

Examples:
    >>> from karyo.karyograms.karyotype import get
    >>> from karyo.karyograms.synth import render_karyogram
    >>> readings = read_slots(render_karyogram(get("trisomy21_xx"), size=256))
    >>> {r.slot: r.count for r in readings}["21"]
    3
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from karyo.errors import KaryoError
from karyo.data.imageio import decode_image
from karyo.karyograms.layout import MIN_SIZE, SLOTS, gap, slot_boxes

#: Samples of a banding profile (from one end of the main axis to the other).
PROFILE_LENGTH = 64
#: Smallest gray-level distance from the background that counts as chromosome.
MIN_DELTA = 18
#: Pieces smaller than this share of the karyogram's median chromosome area are specks.
SPECK_SHARE = 0.06
#: A component at least this many times as wide as the karyogram's median chromosome may hold
#: two touching chromosomes; it is split where a column is (nearly) empty.
SPLIT_WIDTH = 1.7


@dataclass
class ChromosomeReading:
    """One chromosome found in a slot.

    Attributes:
        box: ``(x0, y0, x1, y1)`` in the karyogram (``x1``/``y1`` exclusive).
        mask: bool array of the box's shape, True on the chromosome.
        crop: gray ``uint8`` crop of the box, dark chromosome on white (polarity normalised).
        length: extent along the main axis, in pixels.
        area: pixels of the mask.
        width: ``area / length``.
        profile: darkness along the main axis (0 background .. ~1 darkest band of the karyogram),
            :data:`PROFILE_LENGTH` samples from the top end to the bottom end.
    """

    box: tuple
    mask: np.ndarray
    crop: np.ndarray
    length: float
    area: int
    width: float
    profile: np.ndarray


@dataclass
class SlotReading:
    """What one slot holds: its key (``"1"``..``"22"``, ``"X"``, ``"Y"``) and its chromosomes, left to right."""

    slot: str
    box: tuple
    chromosomes: list = field(default_factory=list)

    @property
    def count(self):
        return len(self.chromosomes)


def as_gray(image, name="<array>"):
    """An image (path or array, gray or RGB) as a square 2-D ``uint8`` array.

    Raises:
        KaryoError: unreadable file, wrong shape or type, not square, or smaller than the layout's minimum.
    """
    if isinstance(image, (str, Path)):
        name = str(image)
        image = decode_image(image)
    image = np.asarray(image)
    if image.ndim == 3:
        image = image[:, :, 0]
    if image.ndim != 2 or image.dtype != np.uint8:
        raise KaryoError(f"{name}: a karyogram must be a gray or RGB uint8 image, got shape "
                         f"{image.shape} and dtype {image.dtype}")
    h, w = image.shape
    if h != w:
        raise KaryoError(f"{name}: {w}x{h} is not a square karyogram in karyo's layout")
    if h < MIN_SIZE:
        raise KaryoError(f"{name}: {h} px is too small for a karyogram (at least {MIN_SIZE} px)")
    return image


def darkness(gray):
    """``(darkness, background level)``: distance of every pixel from the background, chromosome high.

    The background is the image's median (most of a karyogram is background); a dark background
    (Q-banding, bright chromosomes) is detected from it and the image read the other way round.
    """
    background = float(np.median(gray))
    g = gray.astype(np.float32)
    dark = background - g if background >= 128 else g - background
    return np.clip(dark, 0, None), background


def _threshold(dark):
    """Foreground threshold: half the typical chromosome darkness, at least :data:`MIN_DELTA`."""
    strong = dark[dark > MIN_DELTA]
    if strong.size == 0:
        return MIN_DELTA
    return max(MIN_DELTA, 0.35 * float(np.percentile(strong, 50)))


def _components(mask):
    """Connected components of ``mask`` as a list of (label image == k) index arrays and boxes."""
    import cv2

    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    return labels, [(k, stats[k]) for k in range(1, n)]


def _merge_columns(items):
    """Join pieces that share columns (pieces of one chromosome): lists of (x0, x1, ids)."""
    items = sorted(items, key=lambda t: t[0])
    merged = []
    for x0, x1, ids in items:
        if merged:
            m0, m1, mids = merged[-1]
            overlap = min(x1, m1) - max(x0, m0)
            if overlap > 0.4 * min(x1 - x0, m1 - m0):
                merged[-1] = (min(x0, m0), max(x1, m1), mids + ids)
                continue
        merged.append((x0, x1, ids))
    return merged


def _split_at_valleys(mask, typical_width, strict=False):
    """Column ranges of ``mask`` after cutting at near-empty columns of a too-wide component.

    A cut must leave two parts that both stand at least 40 % of the component's height: the
    layout stands chromosomes side by side, while a bent chromosome's foot is low. ``strict``
    (a component alone in its slot) also asks for a nearly empty cut column.
    """
    cols = mask.sum(axis=0).astype(np.float64)
    w = cols.size
    if w < SPLIT_WIDTH * typical_width or cols.max() == 0:
        return [(0, w)]
    # cut only well inside the component, where a column is nearly empty against its neighbours
    lo, hi = int(0.25 * typical_width), w - int(0.25 * typical_width)
    inner = cols[lo:hi]
    if inner.size == 0:
        return [(0, w)]
    cut = lo + int(np.argmin(inner))
    if cols[cut] > (0.05 if strict else 0.15) * cols.max():
        return [(0, w)]
    left, right = mask[:, :cut], mask[:, cut + 1:]
    height = np.ptp(np.nonzero(mask.any(axis=1))[0]) + 1
    for side in (left, right):
        rows = np.nonzero(side.any(axis=1))[0]
        if rows.size == 0 or np.ptp(rows) + 1 < 0.4 * height:
            return [(0, w)]
    out = [(a, b) for a, b in _split_at_valleys(left, typical_width, strict)]
    out += [(cut + 1 + a, cut + 1 + b) for a, b in _split_at_valleys(right, typical_width, strict)]
    return [(a, b) for a, b in out if b > a]


def main_axis_profile(mask, dark, n=PROFILE_LENGTH):
    """``(length, profile)``: extent of ``mask`` along its main axis and mean darkness along it.

    The main axis is the first principal axis of the mask's pixels, oriented top to bottom.
    """
    ys, xs = np.nonzero(mask)
    if ys.size < 2:
        return float(ys.size), np.zeros(n, np.float32)
    pts = np.stack([xs, ys], axis=1).astype(np.float64)
    pts -= pts.mean(axis=0)
    cov = pts.T @ pts / len(pts)
    vals, vecs = np.linalg.eigh(cov)
    axis = vecs[:, np.argmax(vals)]
    if axis[1] < 0:  # point downwards so that the profile runs from the top end
        axis = -axis
    t = pts @ axis
    t0, t1 = t.min(), t.max()
    length = float(t1 - t0 + 1)
    bins = np.clip(((t - t0) / max(t1 - t0, 1e-9) * n).astype(int), 0, n - 1)
    values = dark[ys, xs]
    sums = np.bincount(bins, weights=values, minlength=n)
    counts = np.bincount(bins, minlength=n)
    filled = counts > 0
    profile = np.zeros(n)
    profile[filled] = sums[filled] / counts[filled]
    if not filled.all():  # short chromosomes leave empty bins: interpolate across them
        idx = np.arange(n)
        profile = np.interp(idx, idx[filled], profile[filled])
    return length, profile.astype(np.float32)


def read_slots(image, name="<array>"):
    """Count and measure the chromosomes of every slot of a karyogram in karyo's layout.

    Args:
        image: path, or gray / RGB ``uint8`` array, square, at least 64 px.
        name: how to name an array in error messages.

    Returns:
        list of 24 :class:`SlotReading`, in karyotype order (1..22, X, Y).

    Raises:
        KaryoError: the image cannot be read or is not a karyogram-sized square image.
    """
    import cv2

    gray = as_gray(image, name)
    size = gray.shape[0]
    dark, _ = darkness(gray)
    # a light blur joins pale bands to their chromosome before thresholding
    smooth = cv2.GaussianBlur(dark, (0, 0), sigmaX=max(0.5, size / 832))
    fg = smooth > _threshold(smooth)
    boxes = slot_boxes(size)
    g = gap(size)
    raw = {}
    for slot in SLOTS:
        x0, y0, x1, y1 = boxes[slot]
        # the layout leaves half a gap around each box: widen by less than that
        pad = max(0, g // 2 - 1)
        bx0, bx1 = max(0, x0 - pad), min(size, x1 + pad)
        sub = fg[y0:y1, bx0:bx1]
        labels, comps = _components(sub)
        items = [(int(s[0]), int(s[0] + s[2]), [k]) for k, s in comps]
        raw[slot] = (bx0, y0, labels, _merge_columns(items))
    # typical chromosome size of this karyogram, for specks and for splitting
    areas, widths = [], []
    for bx0, y0, labels, groups in raw.values():
        for x0, x1, ids in groups:
            areas.append(int(np.isin(labels[:, x0:x1], ids).sum()))
            widths.append(x1 - x0)
    median_area = float(np.median(areas)) if areas else 0.0
    typical_width = float(np.percentile(widths, 30)) if widths else 1.0
    scale = float(np.percentile(dark[fg], 95)) if fg.any() else 1.0
    readings = []
    for slot in SLOTS:
        bx0, y0, labels, groups = raw[slot]
        found = []
        pieces = [np.isin(labels[:, gx0:gx1], ids) for gx0, gx1, ids in groups]
        group_areas = [int(p.sum()) for p in pieces]
        for i, ((gx0, gx1, ids), piece) in enumerate(zip(groups, pieces)):
            others = [a for j, a in enumerate(group_areas) if j != i and a >= SPECK_SHARE * median_area]
            # two chromosomes in one component hold about twice the area of a neighbour
            if others and group_areas[i] < 1.6 * max(others):
                ranges = [(0, piece.shape[1])]
            else:
                ranges = _split_at_valleys(piece, typical_width, strict=not others)
            for a, b in ranges:
                part = piece[:, a:b]
                area = int(part.sum())
                if area < max(4, SPECK_SHARE * median_area):
                    continue
                rows = np.nonzero(part.any(axis=1))[0]
                cols = np.nonzero(part.any(axis=0))[0]
                r0, r1 = rows[0], rows[-1] + 1
                c0, c1 = cols[0], cols[-1] + 1
                mask = part[r0:r1, c0:c1]
                X0, Y0 = bx0 + gx0 + a + c0, y0 + r0
                box = (int(X0), int(Y0), int(X0 + c1 - c0), int(Y0 + r1 - r0))
                local = dark[box[1]:box[3], box[0]:box[2]] / max(scale, 1e-6)
                length, profile = main_axis_profile(mask, local)
                crop = np.where(mask, 255 - np.clip(local * 200, 0, 255), 255).astype(np.uint8)
                found.append(ChromosomeReading(box, mask, crop, length, area, area / max(length, 1.0),
                                               profile))
        readings.append(SlotReading(slot, boxes[slot], found))
    return readings


def slot_counts(readings):
    """``{slot: count}`` of a :func:`read_slots` result."""
    return {r.slot: r.count for r in readings}


def expected_counts(counts):
    """``{slot: expected count}`` given the counts seen: 2 per autosome, sex from the Y slot.

    A karyogram with a Y is read as male (one X, one Y expected), one without as female (two X):
    45,X then shows one X missing, 47,XXY one X too many, 47,XYY one Y too many.
    """
    male = counts.get("Y", 0) >= 1
    expected = {slot: 2 for slot in SLOTS[:22]}
    expected.update({"X": 1, "Y": 1} if male else {"X": 2, "Y": 0})
    return expected


def count_deviations(counts):
    """``{slot: count - expected}`` (see :func:`expected_counts`)."""
    expected = expected_counts(counts)
    return {slot: int(counts.get(slot, 0)) - expected[slot] for slot in SLOTS}
