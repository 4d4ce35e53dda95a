"""The standard karyogram layout: rows 1-5 / 6-12 / 13-18 / 19-22, X, Y, numbers under the slots.

Synthetic karyograms (:mod:`karyo.karyograms.synth`) and karyograms assembled from real chromosome crops
(:mod:`karyo.karyograms.assemble`) share it, so a model sees the same arrangement either way. Every slot has
a fixed box on the canvas; its chromosomes stand side by side on the box's bottom edge, and the
pair number is written in a band under the box that no chromosome enters. All chromosomes of a
karyogram are scaled by one factor, the largest that fits every slot, so relative sizes (the
first thing a cytogeneticist compares) are kept.

Examples:
    >>> import numpy as np
    >>> from karyo.karyograms.layout import arrange_karyogram
    >>> crop = np.full((40, 10), 60, np.uint8)   # a dark bar: one "chromosome" on white
    >>> result = arrange_karyogram({"1": [crop, crop]}, size=416)
    >>> result.image.shape
    (416, 416, 3)
"""

from dataclasses import dataclass, field

import numpy as np

from karyo.errors import KaryoError
from karyo.data.manifest import CHROMOSOME_LABELS

#: Slot keys in karyotype order.
SLOTS = CHROMOSOME_LABELS
#: Slots per row of the standard layout.
ROWS = (SLOTS[0:5], SLOTS[5:12], SLOTS[12:18], SLOTS[18:24])
#: Height share of each row's chromosome box: the hg38 length (Mb) of the row's longest normal
#: chromosome (1, 6, 13, X), so that the largest chromosome of every row fills its row alike.
ROW_WEIGHTS = (249.0, 171.0, 114.0, 156.0)
#: Outer margin, as a share of the canvas side.
MARGIN = 0.015
#: Height of the band under each row that holds the pair numbers, as a share of the side.
NUMBER_BAND = 0.032
#: Smallest canvas side a karyogram can be laid out on.
MIN_SIZE = 64
WHITE, BLACK = 255, 0


@dataclass(frozen=True)
class Layout:
    """How much of the canvas is paper: margins, the pair numbers' band and the gaps, as shares of the side.

    ``standard`` is what cytogeneticists print. ``compact`` is the thesis' future work (5.3: "the
    gaps between the chromosome pairs in the karyogram are somewhat large, which can be reduced to make
    meaningful objects more compact and reduce the blank areas' interference"): thin margins and gaps
    and no number band, so the same slots hold larger chromosomes at the same input size. The slots'
    order and arrangement are the same in both.
    """

    name: str
    margin: float
    number_band: float
    gap: float


#: The layouts karyograms can be drawn in, by name.
LAYOUTS = {
    "standard": Layout("standard", MARGIN, NUMBER_BAND, 0.011),
    "compact": Layout("compact", 0.004, 0.0, 0.004),
}


def get_layout(layout):
    """The :class:`Layout` named ``layout`` (a Layout is returned as it is)."""
    if isinstance(layout, Layout):
        return layout
    try:
        return LAYOUTS[layout]
    except KeyError:
        raise KaryoError(f"unknown karyogram layout '{layout}' (choose {', '.join(LAYOUTS)})") from None


@dataclass
class Arrangement:
    """A laid-out karyogram: the RGB image, the scale applied, and where each chromosome went.

    ``rects`` maps a slot to the ``(x0, y0, x1, y1)`` rectangles (``x1``/``y1`` exclusive) of its
    chromosomes, left to right.
    """

    image: np.ndarray
    scale: float
    rects: dict = field(default_factory=dict)


def _check_size(size):
    if not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
        raise KaryoError(f"image size {size} is too small for a karyogram (at least {MIN_SIZE} px)")


def gap(size, layout="standard"):
    """Pixels left between neighbouring chromosomes of a slot (and between slots)."""
    return max(2, int(round(size * get_layout(layout).gap)))


def _geometry(size, layout="standard"):
    layout = get_layout(layout)
    margin = max(1, int(round(size * layout.margin)))
    band = max(6, int(round(size * layout.number_band))) if layout.number_band else 0
    usable = size - 2 * margin - len(ROWS) * band
    heights = np.array(ROW_WEIGHTS) / sum(ROW_WEIGHTS) * usable
    tops = margin + np.concatenate([[0], np.cumsum(heights + band)[:-1]])
    return margin, band, tops, heights


def slot_boxes(size, layout="standard"):
    """``{slot: (x0, y0, x1, y1)}``: the box each slot's chromosomes go in (``x1``/``y1`` exclusive).

    Boxes do not overlap and are at least :func:`gap` pixels apart; ``y1`` is the baseline the
    chromosomes stand on. The pair number is written below it (:func:`number_boxes`).
    """
    _check_size(size)
    margin, band, tops, heights = _geometry(size, layout)
    half_gap = gap(size, layout) / 2.0
    boxes = {}
    for row, top, height in zip(ROWS, tops, heights):
        width = (size - 2 * margin) / len(row)
        for c, slot in enumerate(row):
            x0 = margin + c * width
            boxes[slot] = (int(np.ceil(x0 + half_gap)), int(np.ceil(top)),
                           int(np.floor(x0 + width - half_gap)), int(np.floor(top + height)))
    return boxes


def number_boxes(size, layout="standard"):
    """``{slot: (x0, y0, x1, y1)}``: the band under each slot where its pair number is written.

    Empty for a layout without numbers (``compact``)."""
    _, band, _, _ = _geometry(size, layout)
    if not band:
        return {}
    return {slot: (x0, y1, x1, y1 + band) for slot, (x0, y0, x1, y1) in slot_boxes(size, layout).items()}


def draw_numbers(canvas, ink, layout="standard"):
    """Write the pair numbers (1..22, X, Y) centred in the bands under the slots.

    The text keeps one pixel clear of the band's top and bottom so it never touches a chromosome.
    A layout without a number band draws nothing.
    """
    import cv2

    size = canvas.shape[0]
    boxes = number_boxes(size, layout)
    if not boxes:
        return canvas
    band = next(iter(boxes.values()))
    band_h = band[3] - band[1]
    thickness = 1
    font = cv2.FONT_HERSHEY_SIMPLEX
    # The largest font whose digits fit the band with a pixel above and below (baseline included).
    scale = 1.0
    while scale > 0.1:
        (_, th), base = cv2.getTextSize("18", font, scale, thickness)
        if th + base + 3 <= band_h:
            break
        scale *= 0.9
    (_, th), base = cv2.getTextSize("18", font, scale, thickness)
    for slot, (x0, y0, x1, y1) in boxes.items():
        (tw, _), _ = cv2.getTextSize(slot, font, scale, thickness)
        x = int(round((x0 + x1 - tw) / 2))
        y = int(round(y0 + (band_h + th - base) / 2))
        cv2.putText(canvas, slot, (x, y), font, scale, int(ink), thickness, cv2.LINE_AA)
    return canvas


def fit_scale(sizes, size, layout="standard"):
    """The largest scale at which every slot's chromosomes fit their boxes.

    Args:
        sizes: ``{slot: [(height, width), ...]}`` of the chromosome images, unscaled.
        size: canvas side.
        layout: ``standard`` or ``compact`` (:data:`LAYOUTS`).

    Returns:
        float scale (``inf`` when no slot holds anything).
    """
    boxes = slot_boxes(size, layout)
    g = gap(size, layout)
    best = float("inf")
    for slot, items in sizes.items():
        if not items:
            continue
        if slot not in boxes:
            raise KaryoError(f"unknown slot '{slot}' (expected one of {', '.join(SLOTS)})")
        x0, y0, x1, y1 = boxes[slot]
        room = (x1 - x0) - g * (len(items) - 1)
        if room <= 0:
            raise KaryoError(f"slot {slot}: {len(items)} chromosomes cannot fit a {size}-px karyogram")
        best = min(best, (y1 - y0) / max(h for h, _ in items), room / sum(w for _, w in items))
    return best


def arrange_karyogram(slots, size=416, background=WHITE, scale=None, max_scale=None,
                      numbers=True, ink=None, layout="standard"):
    """Place chromosome images into the standard layout with one scale for the whole karyogram.

    Args:
        slots: ``{slot: [gray uint8 image, ...]}``; each image is a chromosome on ``background``
            (dark on white for G-banding, bright on black for Q-banding), drawn left to right.
        size: canvas side in pixels.
        background: gray level of the canvas (255 white, 0 black).
        scale: force this scale (it is still reduced if the chromosomes would not fit).
        max_scale: never enlarge beyond this (``None``: the chromosomes fill their rows).
        numbers: write the pair numbers under the slots.
        ink: gray level of the numbers (default: dark on a light background, light on a dark one).
        layout: ``standard`` (numbers under the slots) or ``compact`` (thin gaps, no numbers).

    Returns:
        :class:`Arrangement` with an RGB ``uint8`` image of ``size`` x ``size``.
    """
    import cv2

    _check_size(size)
    images = {slot: [np.asarray(im) for im in items] for slot, items in slots.items() if len(items)}
    for slot, items in images.items():
        for im in items:
            if im.ndim != 2 or im.dtype != np.uint8 or min(im.shape) < 1:
                raise KaryoError(f"slot {slot}: chromosome images must be 2-D uint8 arrays")
    fit = fit_scale({s: [im.shape for im in items] for s, items in images.items()}, size, layout)
    if fit == float("inf"):
        fit = 1.0
    chosen = fit if scale is None else min(scale, fit)
    if max_scale is not None:
        chosen = min(chosen, max_scale)
    canvas = np.full((size, size), int(background), np.uint8)
    boxes = slot_boxes(size, layout)
    g = gap(size, layout)
    rects = {}
    for slot in SLOTS:
        items = images.get(slot)
        if not items:
            rects[slot] = []
            continue
        x0, y0, x1, y1 = boxes[slot]
        placed = []
        for im in items:
            h, w = im.shape
            # floor so that rounding can never push a chromosome out of its box
            nh = max(1, min(y1 - y0, int(h * chosen + 1e-6)))
            nw = max(1, int(w * chosen + 1e-6))
            if (nh, nw) != (h, w):
                interp = cv2.INTER_AREA if chosen < 1 else cv2.INTER_LINEAR
                im = cv2.resize(im, (nw, nh), interpolation=interp)
            placed.append(im)
        total = sum(im.shape[1] for im in placed) + g * (len(placed) - 1)
        x = x0 + max(0, (x1 - x0 - total) // 2)
        rects[slot] = []
        for im in placed:
            h, w = im.shape
            w = min(w, x1 - x)  # guard against a one-pixel rounding overflow
            canvas[y1 - h:y1, x:x + w] = im[:, :w]
            rects[slot].append((x, y1 - h, x + w, y1))
            x += w + g
    if numbers:
        if ink is None:
            ink = 40 if background >= 128 else 215
        draw_numbers(canvas, ink, layout)
    return Arrangement(np.repeat(canvas[:, :, None], 3, axis=2), chosen, rects)


def background_level(image, border=2):
    """Median gray level of an image's border pixels: the crop's background (paper or dark field)."""
    image = np.asarray(image)
    if image.ndim == 3:
        image = image[:, :, 0]
    b = max(1, min(border, min(image.shape) // 2))
    edge = np.concatenate([image[:b].ravel(), image[-b:].ravel(), image[:, :b].ravel(),
                           image[:, -b:].ravel()])
    return int(np.median(edge))
