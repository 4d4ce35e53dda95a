"""Leakage guard: identical or near-identical images in two parts of a split (perceptual hash).

The thesis augmented its 146 karyograms to 692 images and split them afterwards (sections 3.1.2
and 4.1), so an augmented copy of a test karyogram could sit in the training part; its test
scores then measure memory, not generalisation. The ``grouped`` protocol prevents that through
the ``group`` column, but only if that column is right. This module checks the images
themselves: two images in different parts whose perceptual hashes are closer than
:data:`DEFAULT_THRESHOLD` are a *near-duplicate pair*. Under ``grouped`` a pair is an error (the
``group`` column is wrong); under ``thesis`` it is the expected leakage, quantified.

The hash (a pHash adapted to karyo's augmentations; :func:`perceptual_hash`):

1. gray, and a 3x3 median filter at the image's own resolution: removes the salt-and-pepper
   noise of :func:`karyo.data.augment.augment_image` (up to 5 % of the pixels);
2. clip at the 5th percentile's gray level and divide by it (the 95th on a dark, Q-banded
   field): a brightness factor cancels exactly, and the level is a chromosome's gray, never the
   paper's, so a copy brightened by up to 25 % that saturates the paper to 255 keeps the same
   picture (clipping relative to the paper did not: its level is lost when it saturates).
   A drawing with only a few flat tones (fewer than 6 below that level) is clipped at 3/4 of
   its paper's gray instead, or it would keep a single tone;
3. area-downscale to 96x96, 2-D DCT, keep the 48x48 lowest frequencies without the DC term, and
   set a bit where a coefficient exceeds their median: 2,303 bits.

Distances are shares of differing bits (0 = same hash, ~0.5 = unrelated). Measured with
``scripts/leakage_study.py`` on 416 px data made by ``karyo data synth`` / ``assemble`` /
``augment`` (min / median / max over all pairs of the kind):

===========================================================  =====================
an image vs its augmented copies, synthetic G-band (692)      0.001 / 0.010 / 0.024
  copies of one image among themselves                        0.003 / 0.014 / 0.030
  the same with ``--blur 1.5``                                0.002 / 0.022 / 0.067
an image vs its copies, synthetic Q-band (692)                0.000 / 0.009 / 0.021
an image vs its copies, real G-band gband612 (2,768)          0.000 / 0.017 / 0.053
  copies of one image among themselves                        0.002 / 0.025 / 0.067
an image vs its copies, real Q-band BioImLab (306)            0.000 / 0.008 / 0.017
the same image re-saved as JPEG quality 75                    0.006 / 0.010 / 0.027
distinct synthetic G-band karyograms (146), same karyotype    0.175 / 0.253 / 0.442
distinct synthetic Q-band karyograms (146), same karyotype    0.129 / 0.193 / 0.411
distinct real G-band karyograms, other patients (584)         0.296 / 0.421 / 0.520
distinct real Q-band karyograms (119)                         0.229 / 0.381 / 0.471
===========================================================  =====================

The default 0.10 lies above every augmented copy (largest 0.067) and below every pair of
distinct karyograms, including the synthetic ones that share one layout by construction
(smallest 0.129 in Q-band, 0.175 in the default G-band; a classic 64-bit pHash puts 28-71 % of
those pairs within 0.10 of each other). An exact copy is 0. Small images hash less reliably: at
160 px (``karyo reproduce --preset quick``) 99 % of copies fall within 0.10 and no distinct
karyogram does (smallest 0.184); at 96 px the chromosomes are 1-2 px wide, noise and saturation
erase them, and only 65 % of the image-copy pairs (27 % of copy-copy pairs) are caught;
distinct karyograms are still never flagged (smallest 0.165). Below that the hash fails both
ways: at 64 px 45 % of distinct synthetic pairs fall within 0.10. A grouped split therefore
refuses pairs of images smaller than :data:`MIN_REFUSE_SIDE` (128 px) only when their pixels are
identical, and warns about the others (docs/reliability.md has the measurements per size).

The hash compares whole pictures, so it cannot tell one cell from the same cell with one small
chromosome added: a synthetic 46,XY and the same rendering (same random stream) with an extra
chromosome 21 are 0.075 apart. Distinct cells, which is what a dataset holds, never came closer
than 0.129.
"""

from collections import Counter
from pathlib import Path

import numpy as np

from karyo import thesis
from karyo.atomic import write_csv
from karyo.data.imageio import decode_image
from karyo.data.splits import PARTS, PROTOCOLS
from karyo.errors import KaryoError, SplitError
from karyo.models.features import image_digest

#: Side of the thumbnail whose DCT is taken.
HASH_SIZE = 96
#: Low-frequency block kept (48x48 coefficients without the DC term: 2,303 bits).
HASH_FREQUENCIES = 48
#: Percentile of gray levels the image is clipped at (on a dark field: 100 minus it). The
#: chromosomes cover 9-49 % of a karyogram; the 5th percentile is a chromosome's gray (53-148 of
#: 255 on the synthetic and real G-band sets), below the 204 above which a 25 % brightening
#: saturates.
CLIP_PERCENTILE = 5.0
#: Fewest gray levels below the clip level of a photograph; fewer make the image a drawing of
#: flat tones (1-3 in the test suites' bar drawings; at least 13 in real and synthetic karyograms).
MIN_TONES = 6
#: A drawing's clip level, as a share of its paper's gray (its tones lie far below it).
PAPER_SHARE = 0.75
#: Largest side an image is hashed at (the thesis' 416 px; larger images are shrunk first).
WORK_SIDE = thesis.IMAGE_SIZE
#: Largest share of differing bits at which two images count as near-identical; see the table above.
DEFAULT_THRESHOLD = 0.10
#: Smallest side (px) of the stored images at which a grouped split refuses a pair. Below it the
#: hash cannot tell distinct karyograms from copies (synthetic G-band, 146 cells: distinct pairs
#: as close as 0.017 at 72 px, 0.089 at 80 px, 0.121 at 96 px; 0.194 at 128 px), so such pairs
#: are only warned about. Measured by ``scripts/leakage_study.py --sizes``; see docs/reliability.md.
MIN_REFUSE_SIDE = 128
#: Pairs kept in a :func:`check_leakage` summary (the counts cover all of them).
SUMMARY_PAIRS = 20


def hash_bits():
    """Number of bits of a :func:`perceptual_hash`."""
    return HASH_FREQUENCIES * HASH_FREQUENCIES - 1


def perceptual_hash(image):
    """Perceptual hash of a karyogram, insensitive to karyo's augmentations.

    Args:
        image: ``uint8`` array, (H, W) or (H, W, 1) gray, or (H, W, 3/4) RGB(A) (alpha ignored).

    Returns:
        Boolean array of :func:`hash_bits` bits.

    Raises:
        KaryoError: the array is not a non-empty ``uint8`` image.
    """
    import cv2

    image = np.asarray(image)
    channels = 1 if image.ndim == 2 else (image.shape[2] if image.ndim == 3 else 0)
    if image.dtype != np.uint8 or channels not in (1, 3, 4) or image.size == 0 or min(image.shape[:2]) < 3:
        raise KaryoError(f"perceptual_hash needs a uint8 gray or RGB image of at least 3x3 pixels, got "
                         f"{image.dtype} {image.shape}")
    if channels == 1:
        gray = image.reshape(image.shape[:2])
    else:
        gray = cv2.cvtColor(np.ascontiguousarray(image[:, :, :3]), cv2.COLOR_RGB2GRAY)
    # The median filter must see the noise at its own size: after a downscale it is a gray smear.
    gray = cv2.medianBlur(np.ascontiguousarray(gray), 3)
    if max(gray.shape) > WORK_SIDE:
        gray = cv2.resize(gray, (WORK_SIDE, WORK_SIDE), interpolation=cv2.INTER_AREA)
    counts = np.bincount(gray.ravel(), minlength=256)
    cumulative = np.cumsum(counts)
    median = int(np.searchsorted(cumulative, gray.size / 2))
    if median < 128:  # a dark (Q-banded) field: saturation clips the bright chromosomes
        level = float(np.searchsorted(cumulative, (1.0 - CLIP_PERCENTILE / 100) * gray.size))
    else:
        level = float(np.searchsorted(cumulative, CLIP_PERCENTILE / 100 * gray.size))
        if np.count_nonzero(counts[:int(level)]) < MIN_TONES:
            # A drawing of a few flat tones: its 5th percentile is one of them, and clipping there
            # would keep that tone alone (identical hashes for different drawings).
            level = PAPER_SHARE * median
    level = max(level, 1.0)
    x = np.minimum(gray.astype(np.float32), level) / level
    x = cv2.resize(x, (HASH_SIZE, HASH_SIZE), interpolation=cv2.INTER_AREA)
    coefficients = cv2.dct(x)[:HASH_FREQUENCIES, :HASH_FREQUENCIES].ravel()[1:]
    return coefficients > np.median(coefficients)


def hash_files(paths, progress=False):
    """Perceptual hashes of image files, one row per file (see :func:`file_hashes`)."""
    return file_hashes(paths, progress)[0]


def file_hashes(paths, progress=False):
    """Perceptual hashes of image files at their own resolution, and each file's shorter side.

    The hash is always taken from the stored pixels, never from a model's (smaller) input: a
    416 px file trained at 32 px is still hashed at 416 px.

    Args:
        paths: image files (read with :func:`karyo.data.imageio.decode_image` at their own size).
        progress: show a tqdm progress bar.

    Returns:
        ``(hashes, sides, digests)``: boolean array of shape (len(paths), :func:`hash_bits`), an
        int array of each image's shorter side in pixels (see :data:`MIN_REFUSE_SIDE`), and the
        sha256 of each image's decoded pixels (:func:`karyo.features.image_digest`).

    Raises:
        ImageError: a file is missing or not an image (the message names it).
    """

    paths = list(paths)
    out = np.zeros((len(paths), hash_bits()), dtype=bool)
    sides = np.zeros(len(paths), dtype=np.int64)
    digests = []
    iterator = paths
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(paths, desc="leakage hashes", unit="img")
    for i, path in enumerate(iterator):
        image = decode_image(path)
        sides[i] = min(image.shape[:2])
        digests.append(image_digest(image))
        out[i] = perceptual_hash(image)
    return out, sides, digests


def hamming_distances(a, b):
    """Share of differing bits between every hash of ``a`` and every hash of ``b``.

    Args:
        a, b: boolean arrays of shape (n, bits) and (m, bits).

    Returns:
        float array of shape (n, m), values in [0, 1].
    """
    a, b = np.atleast_2d(np.asarray(a, bool)), np.atleast_2d(np.asarray(b, bool))
    if a.shape[1] != b.shape[1]:
        raise KaryoError(f"hashes differ in length ({a.shape[1]} and {b.shape[1]} bits)")
    bits = a.shape[1]
    pa, pb = _pack(a), _pack(b)
    out = np.empty((len(pa), len(pb)), dtype=np.float64)
    # Chunked so the XOR block stays near 4 million words whatever the sizes.
    step = max(1, 4_000_000 // max(1, len(pb) * pa.shape[1]))
    for start in range(0, len(pa), step):
        block = pa[start:start + step, None, :] ^ pb[None, :, :]
        out[start:start + step] = _popcount(block).sum(axis=-1) / bits
    return out


def _pack(hashes):
    """Bits packed into little 64-bit words (zero-padded), for XOR and popcount."""
    packed = np.packbits(hashes, axis=1)
    pad = (-packed.shape[1]) % 8
    if pad:
        packed = np.pad(packed, ((0, 0), (0, pad)))
    return np.ascontiguousarray(packed).view(np.uint64)


_BYTE_COUNTS = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _popcount(words):
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(words).astype(np.uint16)
    return _BYTE_COUNTS[words.view(np.uint8)].reshape(words.shape + (8,)).sum(axis=-1, dtype=np.uint16)


def near_duplicates(rows, root, threshold=DEFAULT_THRESHOLD, progress=False, hashes=None):
    """Near-identical image pairs that lie in two different parts of a split.

    Args:
        rows: manifest rows (dicts) with ``path`` and ``split`` (train / val / test).
        root: folder the ``path`` column is relative to.
        threshold: largest share of differing hash bits that counts as near-identical.
        progress: show a progress bar while hashing.
        hashes: precomputed :func:`hash_files` output for ``rows`` (skips reading the files).

    Returns:
        list of ``(part_a, path_a, part_b, path_b, distance)``, ``part_a`` earlier than ``part_b``
        in train / val / test order, sorted by distance then paths.

    Raises:
        SplitError: a row has no known ``split``.
        ImageError: an image cannot be read.
    """
    _check_threshold(threshold)
    rows = list(rows)
    _check_splits(rows)
    if hashes is None:
        hashes = hash_files([Path(root) / row["path"] for row in rows], progress=progress)
    index = {part: [i for i, row in enumerate(rows) if row["split"] == part] for part in PARTS}
    pairs = []
    for a_pos, part_a in enumerate(PARTS):
        for part_b in PARTS[a_pos + 1:]:
            ia, ib = index[part_a], index[part_b]
            if not ia or not ib:
                continue
            d = hamming_distances(hashes[ia], hashes[ib])
            for i, j in zip(*np.nonzero(d <= threshold)):
                pairs.append((part_a, rows[ia[i]]["path"], part_b, rows[ib[j]]["path"], float(d[i, j])))
    pairs.sort(key=lambda p: (p[4], PARTS.index(p[0]), PARTS.index(p[2]), p[1], p[3]))
    return pairs


def check_leakage(manifest, protocol, threshold=DEFAULT_THRESHOLD, progress=False):
    """Find near-identical images across the parts of a split; refuse them under ``grouped``.

    Args:
        manifest: a :class:`karyo.data.manifest.Manifest` whose rows carry a ``split`` column
            (what :func:`karyo.experiments.training.prepare_data` returns).
        protocol: ``grouped`` or ``thesis``.
        threshold: see :data:`DEFAULT_THRESHOLD`.
        progress: show a progress bar while hashing.

    Returns:
        JSON-ready dict: ``protocol``, ``threshold``, ``hash``, ``pairs`` (count),
        ``parts`` (per part: ``images``, ``with_train_match``, and ``with_val_match`` for test),
        ``examples`` (the closest pairs), ``smallest_side`` (px), ``small_image_pairs`` (pairs
        below :data:`MIN_REFUSE_SIDE`), ``warning`` (text when pairs exist under ``thesis``, or
        small-image pairs under ``grouped``, else ``None``).

    Pairs of images whose shorter side is below :data:`MIN_REFUSE_SIDE` are refused only when
    their pixels are identical: there the hash cannot tell distinct karyograms from augmented
    copies, so other such pairs only give a warning.

    Raises:
        SplitError: under ``grouped``, any pair of images of at least :data:`MIN_REFUSE_SIDE` px,
            or of identical pixels (the message gives the count, the closest such pair's two files
            and distance, and what to fix; the error's ``pairs`` attribute holds every pair, for
            :func:`write_pairs`); an unknown protocol or a missing split.
    """
    if protocol not in PROTOCOLS:
        raise SplitError(f"unknown split protocol '{protocol}' (choose from {', '.join(PROTOCOLS)})")
    rows = manifest.rows
    _check_threshold(threshold)
    _check_splits(rows)  # before reading any image
    hashes, sides, digests = file_hashes([Path(manifest.root) / row["path"] for row in rows], progress)
    pairs = near_duplicates(rows, manifest.root, threshold, hashes=hashes)
    summary = leakage_summary(rows, pairs, protocol, threshold)
    side_of = {row["path"]: int(side) for row, side in zip(rows, sides)}
    digest_of = {row["path"]: digest for row, digest in zip(rows, digests)}

    def certain(pair):  # identical pixels are a copy at any size
        a, b = pair[1], pair[3]
        return min(side_of[a], side_of[b]) >= MIN_REFUSE_SIDE or digest_of[a] == digest_of[b]

    small = [p for p in pairs if not certain(p)]
    sure = [p for p in pairs if certain(p)]
    summary["smallest_side"] = int(sides.min()) if len(sides) else None
    summary["small_image_pairs"] = len(small)
    source = manifest.source or manifest.root
    if sure and protocol == "grouped":
        part_a, path_a, part_b, path_b, distance = sure[0]
        error = SplitError(
            f"{source}: {len(sure)} near-identical image pair(s) straddle the grouped split, "
            f"e.g. {path_a} ({part_a}) and {path_b} ({part_b}), hash distance {distance:.3f} "
            f"<= {threshold:.2f}; give near-identical images the same value in the 'group' column "
            "(or remove the duplicates) so that they fall in one part"
        )
        error.pairs = pairs
        raise error
    if small:
        part_a, path_a, part_b, path_b, distance = small[0]
        side = min(side_of[path_a], side_of[path_b])
        why = (f"the images are {side} px, below the {MIN_REFUSE_SIDE} px at which the hash tells distinct "
               "karyograms from augmented copies")
        if protocol == "grouped":
            summary["warning"] = (
                f"{source}: {len(small)} image pair(s) across the grouped split look alike, e.g. {path_a} "
                f"({part_a}) and {path_b} ({part_b}), hash distance {distance:.3f} <= {threshold:.2f}, but "
                f"{why}: not refused; make sure copies of one karyogram share a 'group' value")
        else:
            summary["warning"] += f" ({len(small)} pair(s) are unreliable: {why})"
    return summary


def leakage_summary(rows, pairs, protocol, threshold=DEFAULT_THRESHOLD):
    """Counts of :func:`near_duplicates` pairs per part, and the warning text (see :func:`check_leakage`)."""
    parts = Counter(row["split"] for row in rows)
    matched = {key: set() for key in ("val_train", "test_train", "test_val")}
    for part_a, path_a, part_b, path_b, _ in pairs:
        key = f"{part_b}_{part_a}"
        if key in matched:
            matched[key].add(path_b)
    per_part = {
        "train": {"images": parts.get("train", 0)},
        "val": {"images": parts.get("val", 0), "with_train_match": len(matched["val_train"])},
        "test": {"images": parts.get("test", 0), "with_train_match": len(matched["test_train"]),
                 "with_val_match": len(matched["test_val"])},
    }
    warning = None
    if pairs:
        test, val = per_part["test"], per_part["val"]
        warning = (
            f"{test['with_train_match']} of {test['images']} test images ({_percent(test)}) and "
            f"{val['with_train_match']} of {val['images']} validation images ({_percent(val)}) have a "
            f"near-identical image in the training part (perceptual-hash distance <= {threshold:.2f}; "
            f"{len(pairs)} pair(s) in all); their scores partly measure memory, not generalisation"
        )
        if protocol == "thesis":
            warning += " (the thesis protocol's leakage: compare with --split grouped)"
    return {
        "protocol": protocol,
        "threshold": threshold,
        "hash": f"pHash {HASH_SIZE} px, {HASH_FREQUENCIES}x{HASH_FREQUENCIES} DCT ({hash_bits()} bits), "
                f"median-filtered, clipped at the {CLIP_PERCENTILE:g}th gray percentile",
        "pairs": len(pairs),
        "parts": per_part,
        "examples": [
            {"part_a": a, "path_a": pa, "part_b": b, "path_b": pb, "distance": round(d, 4)}
            for a, pa, b, pb, d in pairs[:SUMMARY_PAIRS]
        ],
        "warning": warning,
    }


def write_pairs(path, pairs):
    """Write :func:`near_duplicates` pairs as a CSV (``part_a,path_a,part_b,path_b,distance``), atomically."""
    write_csv(path, [(a, pa, b, pb, f"{d:.4f}") for a, pa, b, pb, d in pairs],
              ("part_a", "path_a", "part_b", "path_b", "distance"))
    return path


def _percent(part):
    n = part["images"]
    return f"{100.0 * part['with_train_match'] / n:.1f} %" if n else "0 %"


def _check_splits(rows):
    for row in rows:
        if row.get("split") not in PARTS:
            raise SplitError(f"{row.get('path', '<no path>')}: split '{row.get('split', '')}' is not one of "
                             f"{', '.join(PARTS)}")


def _check_threshold(threshold):
    number = isinstance(threshold, (int, float)) and not isinstance(threshold, bool)
    if not number or not 0 <= threshold < 0.5:
        raise KaryoError(f"leakage threshold must be a share of hash bits in [0, 0.5), got {threshold!r}")
