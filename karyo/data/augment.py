"""The thesis' offline, order-preserving augmentation: brightness, noise and blur, never geometry.

Thesis section 3.1.2: "Because karyograms are ordered and arranged positions, we cannot add flips
or rotations to the images. [...] we added brightness between -25% to +25% and noise up to 5% of
pixels in the augmentation step. We got 376 typical images and 316 abnormal images" (from 105
normal and 41 abnormal karyograms). The Discussion explains why: a first attempt with flips,
rotations, crops and shears looked good on augmented data but failed on ordinary karyograms,
because a karyogram's layout (which pair sits in which slot) is its meaning; "so later, we only
kept the blur, brightness, and noise". This module therefore changes pixel values only: every
chromosome of a copy stays exactly where it was in its source.

The names of the thesis' options (flip, 90 degree rotate, crop, rotation, shear, exposure, blur,
noise; brightness -25 %..+25 %; noise on up to 5 % of the pixels) are those of Roboflow's
augmentation menu, whose noise is salt-and-pepper; the noise here is salt-and-pepper too.

Every augmented copy keeps its source's ``group``, so a grouped split never puts a karyogram
and its copies on both sides (SPEC 5); ``source`` and ``augmented`` record where each row
came from. The same seed gives the same bytes: a copy's random stream depends only on the
seed, its source's path and its copy number.
"""

import hashlib
import json
import math
from collections import Counter, defaultdict
from pathlib import Path, PurePosixPath

import numpy as np

from karyo import thesis
from karyo.atomic import atomic_dir, atomic_write_bytes, atomic_write_text
from karyo.errors import ImageError, KaryoError, ManifestError
from karyo.data.imageio import decode_image, encode_png
from karyo.data.manifest import (
    CHROMOSOME_LABELS,
    KARYOGRAM_LABELS,
    LINK_ESCAPE,
    check_output_folder,
    read_manifest,
    sha256_file,
    write_manifest,
)

#: Thesis section 3.1.2: brightness "between -25% to +25%".
BRIGHTNESS = thesis.BRIGHTNESS
#: Thesis section 3.1.2: "noise up to 5% of pixels".
NOISE = thesis.NOISE
#: The alpha-dataset before augmentation (section 3.1.2: "105 regular cases and 41 abnormal").
THESIS_SOURCE = {"normal": 105, "abnormal": 41}
#: The alpha-dataset after augmentation (section 3.1.2: "376 typical images and 316 abnormal").
THESIS_TARGET = {"normal": thesis.BALANCED_NORMAL, "abnormal": thesis.BALANCED_ABNORMAL}
#: Columns every augmented manifest adds to its source's columns.
AUGMENT_COLUMNS = ("source", "augmented")
#: Name of the manifest written into an augmentation's output folder.
MANIFEST_NAME = "manifest.csv"


def augment_image(image, rng, brightness=BRIGHTNESS, noise=NOISE, blur=0.0):
    """Return an augmented copy of ``image``: blur, then brightness, then salt-and-pepper noise.

    Only pixel values change; the array keeps its shape, so every chromosome keeps its place.

    * Blur: a Gaussian blur whose sigma is drawn uniformly in ``[0, blur]`` pixels (the thesis'
      conclusions name blur among the kept augmentations; ``blur=0`` switches it off).
    * Brightness: every pixel is multiplied by one factor drawn uniformly in
      ``[1 - brightness, 1 + brightness]`` (thesis: -25 % to +25 %), then clipped to 0..255.
      A factor keeps black black and keeps the bands' contrast in proportion; Roboflow's
      "brightness" adds a constant instead, which on white karyogram paper mostly saturates.
    * Noise: a share of the pixels drawn uniformly in ``[0, noise]`` (thesis: up to 5 %) is
      chosen without replacement, and each chosen pixel becomes black (0) or white (255) with
      equal probability, the same value in every channel (impulse noise, as dust and dead
      camera pixels look; a gray karyogram stays gray). Noise is applied last so that it
      touches at most that share of pixels (blurring it afterwards would spread it).

    Args:
        image: ``uint8`` array, (H, W) gray or (H, W, C).
        rng: a ``numpy.random.Generator``; the only source of randomness.
        brightness: largest relative change of brightness, in [0, 1).
        noise: largest share of pixels replaced by noise, in [0, 1].
        blur: largest Gaussian sigma in pixels, >= 0.

    Returns:
        A new ``uint8`` array of the same shape.

    Raises:
        KaryoError: a parameter is out of range or the image is not a ``uint8`` array.
    """
    check_parameters(brightness, noise, blur)
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or image.size == 0:
        raise KaryoError(
            f"augment_image needs a non-empty uint8 image of shape (H, W) or (H, W, C), "
            f"got {image.dtype} {image.shape}"
        )
    # Draw the three random numbers first, in a fixed order, so that a copy's parameters do
    # not depend on which of the three effects is switched on.
    factor = 1.0 + rng.uniform(-brightness, brightness)
    sigma = rng.uniform(0.0, blur)
    share = rng.uniform(0.0, noise)

    out = image
    if sigma >= 0.05:  # below this a 1-pixel kernel: no visible change
        import cv2

        out = cv2.GaussianBlur(out, (0, 0), sigmaX=sigma, sigmaY=sigma,
                               borderType=cv2.BORDER_REFLECT)
    out = np.clip(out.astype(np.float32) * factor, 0, 255).round().astype(np.uint8)

    h, w = out.shape[:2]
    count = int(math.floor(share * h * w))
    if count:
        flat = rng.choice(h * w, size=count, replace=False)
        values = np.where(rng.random(count) < 0.5, 0, 255).astype(np.uint8)
        rows, cols = np.divmod(flat, w)
        if out.ndim == 3:
            out[rows, cols, :] = values[:, None]
        else:
            out[rows, cols] = values
    return out


def check_parameters(brightness, noise, blur):
    """Raise :class:`KaryoError` naming the value if an augmentation parameter is out of range."""
    for name, value in (("brightness", brightness), ("noise", noise), ("blur", blur)):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not math.isfinite(value):
            raise KaryoError(f"{name} must be a number, got {value!r}")
    if not 0 <= brightness < 1:
        raise KaryoError(
            f"brightness must be in [0, 1) (0.25 means -25 %..+25 %), got {brightness}"
        )
    if not 0 <= noise <= 1:
        raise KaryoError(f"noise must be in [0, 1] (0.05 means up to 5 % of pixels), got {noise}")
    if not 0 <= blur <= 50:
        raise KaryoError(f"blur must be a Gaussian sigma in [0, 50] pixels, got {blur}")


def balance_counts(n_normal, n_abnormal, normal=None, abnormal=None):
    """Per-class image counts after augmentation, balanced as the thesis balanced its data.

    The thesis turned 105 normal + 41 abnormal karyograms (146) into 376 + 316 (692): each class
    grew by its own factor (~3.58 and ~7.71) so that the classes end up nearly balanced. For an
    input of another size the thesis' targets are scaled by the input's total size::

        scale  = (n_normal + n_abnormal) / 146
        target = max(n_class, round(thesis_target_class * scale))

    so the thesis' own input gives exactly 376 / 316, an input of any size grows by the thesis'
    4.74x overall, and the result keeps the thesis' final 54 : 46 class ratio whatever the
    input's ratio (scaling each class by its own thesis factor would keep an input's imbalance:
    558 / 26 would become 1998 / 200). ``max`` keeps every original (copies are only added),
    and a class without images stays at 0 (there is nothing to copy).

    Args:
        n_normal, n_abnormal: images per class before augmentation.
        normal, abnormal: explicit targets; ``None`` applies the rule above.

    Returns:
        ``{"normal": int, "abnormal": int}``.

    Raises:
        KaryoError: a count is negative, or an explicit target is below the class' originals
            or asks for copies of a class that has no images.
    """
    counts = {"normal": n_normal, "abnormal": n_abnormal}
    explicit = {"normal": normal, "abnormal": abnormal}
    return _targets(counts, explicit)


def default_targets(counts, overrides=None):
    """Per-class targets for any class names: the thesis' rule, generalised.

    ``normal`` / ``abnormal`` follow :func:`balance_counts`. Other class sets (for example the
    24 chromosome classes of the two-step transfer's intermediate task) grow by the thesis'
    overall factor 692 / 146 ~ 4.74 and share the result equally, which balances them::

        target = max(n_class, round(n_total * 692 / 146 / n_classes))

    Args:
        counts: dict label -> images before augmentation.
        overrides: dict label -> explicit target (``None`` values are ignored).
    """
    return _targets(counts, overrides or {})


def _targets(counts, explicit):
    for label, n in counts.items():
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise KaryoError(f"class '{label}' count must be a non-negative integer, got {n!r}")
    total = sum(counts.values())
    karyogram = set(counts) <= set(KARYOGRAM_LABELS)
    thesis_total = sum(THESIS_TARGET.values())
    out = {}
    for label, n in counts.items():
        if karyogram:
            wanted = THESIS_TARGET[label] * total / sum(THESIS_SOURCE.values())
        else:
            wanted = total * thesis_total / sum(THESIS_SOURCE.values()) / len(counts)
        out[label] = 0 if n == 0 else max(int(n), int(round(wanted)))
    for label, value in explicit.items():
        if value is None:
            continue
        n = counts.get(label, 0)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise KaryoError(
                f"target for class '{label}' must be a non-negative integer, got {value!r}"
            )
        if value > 0 and n == 0:
            raise KaryoError(
                f"cannot make {value} '{label}' images: the input has no '{label}' image"
            )
        if value < n:
            raise KaryoError(
                f"target {value} for class '{label}' is below its {n} original images "
                "(augmentation keeps every original and only adds copies)"
            )
        out[label] = int(value)
    return out


def copy_rng(seed, source, index):
    """The random generator of copy ``index`` of ``source``: a function of these three only.

    The source path is hashed (sha256) rather than passed through Python's ``hash``, which
    changes between processes, so the same seed gives the same bytes on every run.
    """
    digest = hashlib.sha256(str(source).encode("utf-8")).digest()
    words = [int.from_bytes(digest[i:i + 4], "little") for i in range(0, 32, 4)]
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(seed) >> 32 & 0xFFFFFFFF,
                                  int(index)] + words)


def copy_path(source_path, index):
    """Manifest path of copy ``index`` of a source: ``images/<folder>/<stem>.aug<index>.png``.

    A source that is not a PNG keeps its extension in the name (``scan.tif`` ->
    ``scan.tif.aug1.png``), so that ``scan.png`` and ``scan.tif`` in one folder never share copies.
    """
    rel = PurePosixPath(source_path.replace("\\", "/"))
    name = rel.stem if rel.suffix.lower() == ".png" else rel.name
    return (PurePosixPath("images") / rel.parent / f"{name}.aug{index}.png").as_posix()


def augment_rows(manifest, rows, out_dir, targets, brightness=BRIGHTNESS, noise=NOISE, blur=0.0,
                 seed=0, progress=False, transform=None):
    """Write every original once and augmented copies up to ``targets``; return the new rows.

    Originals are copied byte for byte to ``out_dir/images/<path>`` so the output manifest is
    self-contained. Copies are made round-robin over each class' sources, in manifest order,
    until the class reaches its target (so sources get copy counts differing by at most one)
    and are written as PNG to ``out_dir/images/<folder>/<stem>.aug<k>.png``. Every output row
    keeps all columns of its source row (``group``, ``split``, ``karyotype`` ...), with
    ``path`` and ``sha256`` of the written file, ``source`` = the source row's path and
    ``augmented`` = ``"0"`` or ``"1"``. Images keep their size (resize before augmenting, as
    the thesis did at 416x416, so that the noise is pixel-sized at training resolution).

    Args:
        manifest: the :class:`karyo.data.manifest.Manifest` the rows belong to (for their root).
        rows: the rows to augment (for example only the training part of a grouped split).
        out_dir: folder to write into (``images/`` is created there).
        targets: dict label -> total images wanted for that class (originals included); a
            class absent from ``targets`` keeps its originals only.
        brightness, noise, blur: see :func:`augment_image`.
        seed: the seed; a copy's randomness depends only on it, its source path and its number.
        progress: show a tqdm progress bar.
        transform: ``f(image, rng) -> image`` applied to each copy before :func:`augment_image`
            (e.g. :func:`karyo.karyograms.pair_augment.augment_pairs`), with a generator of its
            own, so that switching it on leaves each copy's brightness, noise and blur unchanged.

    Returns:
        list of row dicts: the originals in input order, then the copies class by class.

    Raises:
        ManifestError: a target names a class without rows, is below a class' originals, or
            two outputs would share a path, or a row's file is a link out of the root.
        ImageError: a source image is missing, unreadable or does not match its ``sha256``.
    """
    check_parameters(brightness, noise, blur)
    out_dir = Path(out_dir)
    by_label = defaultdict(list)
    for row in rows:
        by_label[row["label"]].append(row)
    for label, target in targets.items():
        n = len(by_label.get(label, []))
        if target and not n:
            raise ManifestError(f"{manifest.source or manifest.root}: cannot make {target} "
                                f"'{label}' images: no row has label '{label}'")
        if target < n:
            raise ManifestError(f"{manifest.source or manifest.root}: target {target} for "
                                f"'{label}' is below its {n} original images")

    # Plan: which copy numbers each source gets (round-robin), so each source is decoded once.
    plan = defaultdict(list)  # source path -> copy numbers
    copy_order = []  # (source path, copy number) in output order
    for label, members in by_label.items():
        extra = targets.get(label, len(members)) - len(members)
        for j in range(extra):
            source = members[j % len(members)]
            index = j // len(members) + 1
            plan[source["path"]].append(index)
            copy_order.append((source["path"], index))

    originals, copies, written = [], {}, {}
    root = manifest.root.resolve()
    bar = _progress(len(rows) + len(copy_order), progress)
    try:
        for row in rows:
            src = manifest.resolve(row)
            data = _read_source(src, row, root, manifest)
            rel = (PurePosixPath("images") / row["path"].replace("\\", "/")).as_posix()
            _claim(written, rel, row["path"], manifest)
            atomic_write_bytes(out_dir / rel, data)
            originals.append(_row(row, rel, hashlib.sha256(data).hexdigest(), row["path"], 0))
            bar.update(1)
            if not plan.get(row["path"]):
                continue
            image = decode_image(src)
            gray = bool((image[:, :, 0] == image[:, :, 1]).all()
                        and (image[:, :, 0] == image[:, :, 2]).all())
            if gray:  # keep gray karyograms one-channel on disk (a third of the bytes)
                image = image[:, :, 0]
            for index in plan[row["path"]]:
                source = image
                if transform is not None:
                    source = transform(image, copy_rng(seed, row["path"] + "#transform", index))
                copy = augment_image(source, copy_rng(seed, row["path"], index),
                                     brightness=brightness, noise=noise, blur=blur)
                png = encode_png(copy)
                rel_copy = copy_path(row["path"], index)
                _claim(written, rel_copy, row["path"], manifest)
                atomic_write_bytes(out_dir / rel_copy, png)
                copies[(row["path"], index)] = _row(row, rel_copy, hashlib.sha256(png).hexdigest(),
                                                    row["path"], 1)
                bar.update(1)
    finally:
        bar.close()
    return originals + [copies[key] for key in copy_order]


def augment_manifest(manifest_path, out_dir, normal=None, abnormal=None, brightness=BRIGHTNESS,
                     noise=NOISE, blur=0.0, seed=0, root=None, progress=True, transform=None):
    """Augment a whole manifest into ``out_dir`` (``manifest.csv`` + ``images/``), atomically.

    This is ``karyo data augment``. Targets default to :func:`default_targets` (the thesis'
    105 / 41 -> 376 / 316 scaled to the input's size); ``normal`` / ``abnormal`` override them
    for the karyogram task. ``out_dir/augment.json`` records the parameters, the targets and
    the input manifest's sha256. ``out_dir`` appears whole or not at all; an existing
    ``out_dir`` is replaced only if it is an earlier output (it holds a ``manifest.csv``).

    Note that augmenting a whole manifest and splitting afterwards is the thesis' leaky
    protocol; for a leakage-free evaluation split by group first and augment the training part
    (:func:`augment_rows` on those rows). ``transform`` is passed to :func:`augment_rows`
    (``karyo data augment --per-pair`` gives :func:`karyo.karyograms.pair_augment.augment_pairs`).

    Returns:
        Path of the written ``out_dir/manifest.csv``.

    Raises:
        ManifestError: unreadable manifest, ``--normal/--abnormal`` on a manifest whose labels
            are not normal/abnormal, a target below the originals, or an unsafe ``out_dir``.
        ImageError: a source image is missing, unreadable or does not match its sha256.
        KaryoError: a parameter is out of range.
    """
    check_parameters(brightness, noise, blur)
    manifest_path = Path(manifest_path)
    manifest = read_manifest(manifest_path, root=root)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, manifest_path, manifest.root)
    counts = Counter(row["label"] for row in manifest.rows)
    _check_labels(manifest_path, manifest.rows)
    explicit = {"normal": normal, "abnormal": abnormal}
    if any(v is not None for v in explicit.values()) and not set(counts) <= set(KARYOGRAM_LABELS):
        raise ManifestError(
            f"{manifest_path}: --normal/--abnormal apply to the karyogram task, but the labels are "
            f"{', '.join(sorted(counts))}"
        )
    try:
        targets = default_targets(dict(counts), explicit)
    except KaryoError as exc:
        raise ManifestError(f"{manifest_path}: {exc}") from None
    columns = list(manifest.columns)
    if "sha256" not in columns:
        columns.append("sha256")
    columns += [c for c in AUGMENT_COLUMNS if c not in columns]
    with atomic_dir(out_dir) as tmp:
        rows = augment_rows(manifest, manifest.rows, tmp, targets, brightness=brightness,
                            noise=noise, blur=blur, seed=seed, progress=progress, transform=transform)
        write_manifest(tmp / MANIFEST_NAME, rows, columns)
        record = {
            "source_manifest": str(manifest_path),
            "source_sha256": sha256_file(manifest_path),
            "counts_before": dict(sorted(counts.items())),
            "targets": dict(sorted(targets.items())),
            "brightness": brightness,
            "noise": noise,
            "blur": blur,
            "seed": seed,
            "transform": getattr(transform, "__name__", None) if transform else None,
            "rule": _rule_text(counts),
        }
        atomic_write_text(tmp / "augment.json", json.dumps(record, indent=2) + "\n")
    return out_dir / MANIFEST_NAME


def _check_labels(manifest_path, rows):
    """Refuse a manifest that mixes a task's labels with unknown ones (``abnormall``, ``Normal``).

    Any class names are allowed (augmentation serves every task), but once a manifest uses the
    karyogram task's or the chromosome task's labels, every row must use that task's labels.
    """
    present = {row["label"] for row in rows}
    for known in (KARYOGRAM_LABELS, CHROMOSOME_LABELS):
        if present & set(known) and not present <= set(known):
            for number, row in enumerate(rows, start=2):
                if row["label"] not in known:
                    raise ManifestError(f"{manifest_path}: line {number}: unknown label '{row['label']}' "
                                        f"(expected one of {', '.join(known)})")


def _rule_text(counts):
    if set(counts) <= set(KARYOGRAM_LABELS):
        return "target = max(n, round(thesis_target * n_total / 146)); thesis 105/41 -> 376/316"
    return "target = max(n, round(n_total * 692 / 146 / n_classes)); the thesis' overall growth"


def _row(row, path, sha256, source, augmented):
    new = dict(row)
    new.update(path=path, sha256=sha256, source=source, augmented=str(augmented))
    return new


def _read_source(path, row, root, manifest):
    try:
        path.resolve().relative_to(root)
    except ValueError:  # a link inside the root that points out of it
        raise ManifestError(f"{manifest.source or manifest.root}: {row['path']}: {LINK_ESCAPE}") from None
    if not path.is_file():
        raise ImageError(path, "file not found")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(path, f"cannot be read ({exc.strerror or exc})") from None
    expected = row.get("sha256", "").lower()
    if expected and hashlib.sha256(data).hexdigest() != expected:
        raise ImageError(path, "sha256 mismatch (the file changed since the manifest was made)")
    return data


def _claim(written, rel, source, manifest):
    key = rel.lower()  # case-insensitive file systems would merge these
    if key in written:
        raise ManifestError(
            f"{manifest.source or manifest.root}: {source} and {written[key]} would both be "
            f"written to {rel}; rename one of them"
        )
    written[key] = source


def _check_out_dir(out_dir, manifest_path, root):
    """Refuse output folders whose replacement would destroy the input or unrelated files."""
    check_output_folder(out_dir, inputs=(manifest_path, root))


def _progress(total, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="augment", unit="img", disable=not enabled)
