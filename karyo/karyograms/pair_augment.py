"""Per-pair augmentation: each chromosome pair moved a little inside its slot, the layout kept.

The thesis dropped rotation, flips and crops because they move chromosomes out of their
places: a karyogram's order and layout carry its meaning (4.4: "the relative position of each
pair of chromosomes is fixed"). Its future work (5.3) proposes the geometric augmentations that
keep it: "for each pair of chromosomes in the karyogram, rotation, folding, mirroring, and other
operations". :func:`augment_pairs` does that on a karyogram in karyo's layout
(:mod:`karyo.karyograms.layout`): every slot's box is rotated by a small angle about its
baseline's centre, mirrored left-right (the two homologs swap sides and each is mirrored, as a
cytogeneticist may place them) and shifted a few pixels, filled with the paper's colour. Pair
numbers, slot order and the rest of the picture are untouched.

Examples:
    >>> import numpy as np
    >>> from karyo.karyograms.pair_augment import augment_pairs
    >>> image = np.full((128, 128, 3), 255, np.uint8)
    >>> augment_pairs(image, np.random.default_rng(0)).shape
    (128, 128, 3)
"""

import cv2
import numpy as np

from karyo.errors import KaryoError
from karyo.karyograms.layout import MIN_SIZE, background_level, slot_boxes

#: Largest rotation of a pair, in degrees (either way).
PAIR_ANGLE = 8.0
#: Largest shift of a pair, as a share of its slot box's width (sideways) and height (upwards).
PAIR_SHIFT = 0.06
#: Probability that a pair is mirrored left-right.
PAIR_MIRROR = 0.5


def augment_pairs(image, rng, max_angle=PAIR_ANGLE, max_shift=PAIR_SHIFT, mirror=PAIR_MIRROR, layout="standard"):
    """A copy of ``image`` with every chromosome pair rotated, mirrored and shifted inside its slot.

    Args:
        image: a square ``uint8`` karyogram in karyo's layout, gray (H, W) or (H, W, C), at any size
            (the slot boxes scale with the side).
        rng: a ``numpy.random.Generator``, the only source of randomness; per slot, in slot order,
            it draws the angle, the mirror and the two shifts.
        max_angle: largest rotation in degrees; max_shift: largest shift as a share of the box;
        mirror: probability of a left-right mirror.
        layout: the layout the karyogram is drawn in (``standard`` or ``compact``).

    Returns:
        A new array of the same shape and dtype. Pixels outside the slot boxes are unchanged.

    Raises:
        KaryoError: the image is not a square uint8 karyogram of at least the layout's smallest side.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or image.shape[0] != image.shape[1] \
            or image.shape[0] < MIN_SIZE:
        raise KaryoError(f"per-pair augmentation needs a square uint8 karyogram of at least {MIN_SIZE} px "
                         f"in karyo's layout, got {image.dtype} {image.shape}")
    if not (0 <= max_angle <= 45 and 0 <= max_shift < 0.5 and 0 <= mirror <= 1):
        raise KaryoError(f"per-pair augmentation: angle {max_angle} (0-45), shift {max_shift} (0-0.5) "
                         f"or mirror {mirror} (0-1) out of range")
    paper = background_level(image)
    fill = (paper,) * (image.shape[2] if image.ndim == 3 else 1)
    out = image.copy()
    for x0, y0, x1, y1 in slot_boxes(image.shape[0], layout).values():
        angle = rng.uniform(-max_angle, max_angle)
        flip = rng.random() < mirror
        dx = rng.uniform(-max_shift, max_shift) * (x1 - x0)
        dy = -rng.uniform(0.0, max_shift) * (y1 - y0)  # upwards only: the baseline is the box's floor
        box = out[y0:y1, x0:x1]
        if flip:
            box = box[:, ::-1]
        w, h = x1 - x0, y1 - y0
        matrix = cv2.getRotationMatrix2D((w / 2.0, float(h - 1)), angle, 1.0)
        matrix[:, 2] += (dx, dy)
        moved = cv2.warpAffine(np.ascontiguousarray(box), matrix, (w, h), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=fill)
        out[y0:y1, x0:x1] = moved.reshape(box.shape)
    return out
