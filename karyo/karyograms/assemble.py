"""Real karyograms assembled from segmented chromosome crops, and a single-chromosome manifest.

The thesis' flow chart places an automatic karyotyping step between the metaphase photograph and
abnormality detection: the chromosomes are segmented, classified and laid out as an ordered
karyogram (section 3.1.1). The public sets in ``../shared/data`` (``gband612``, BioImLab's Q-band
set) stop after classification, with one folder of crops per cell::

    <set>/cells/<cell>/<k>/<i>.png   a crop of one chromosome; k = 1..22, 23 = X, 24 = Y
    <set>/cells.csv                  cell, case, karyotype, label, status, n_chromosomes

:func:`assemble_cells` finishes the step: each cell's crops go into the standard layout of
:mod:`karyo.karyograms.layout`, all scaled by one factor so that their relative sizes are kept, turned upright
when the crop holds the chromosome at a slant (the Q-band crops), on the crops' own background
(G-band: dark on white; Q-band: bright on black, detected from the crops' border pixels).
:func:`chromosome_manifest` writes the 24-class single-chromosome task of two-step transfer.

Examples:
    >>> from karyo.karyograms.assemble import assemble_cells              # doctest: +SKIP
    >>> assemble_cells("../shared/data/gband612", "karyograms")  # doctest: +SKIP
    PosixPath('karyograms/manifest.csv')
"""

import csv
import hashlib
import math
import re
from pathlib import Path

import numpy as np

from karyo.atomic import atomic_dir
from karyo.errors import ImageError, ManifestError
from karyo.data.imageio import DEFAULT_SIZE, decode_image, encode_png, is_image_path
from karyo.karyograms.layout import BLACK, WHITE, arrange_karyogram, background_level, get_layout
from karyo.data.manifest import CHROMOSOME_LABELS, check_output_folder, write_manifest

#: Columns ``cells.csv`` must have.
CELL_COLUMNS = ("cell", "case", "karyotype", "label", "status", "n_chromosomes")
#: Labels a cell may carry; ``uncertain`` cells (irregular counts) are left out by default.
CELL_LABELS = ("normal", "abnormal", "uncertain")
#: Manifest columns of assembled karyograms and of single chromosomes.
KARYOGRAM_COLUMNS = ("path", "label", "group", "karyotype", "cell", "n_chromosomes", "sha256")
CHROMOSOME_COLUMNS = ("path", "label", "group", "cell", "sha256")
#: Gray-level distance from the background above which a crop pixel belongs to the chromosome.
FOREGROUND_DELTA = 25
#: Crops whose chromosome leans more than this (degrees) are turned upright.
UPRIGHT_MIN_DEGREES = 10.0


def slot_of(class_dir):
    """Slot key of a class folder name: ``"1"``..``"22"``, ``"23"`` -> X, ``"24"`` -> Y."""
    try:
        k = int(class_dir)
    except ValueError:
        return None
    return CHROMOSOME_LABELS[k - 1] if 1 <= k <= 24 else None


def read_cells(cells_dir):
    """Rows of ``<cells_dir>/cells.csv`` (dicts of strings), checked.

    Raises:
        ManifestError: the folder or file is missing, a column is missing, a row has an empty
            cell id, an unknown label or a non-integer count, or a cell id repeats.
    """
    cells_dir = Path(cells_dir)
    if not cells_dir.is_dir():
        raise ManifestError(f"{cells_dir}: folder not found")
    path = cells_dir / "cells.csv"
    if not path.is_file():
        raise ManifestError(f"{path}: not found (a cells folder holds cells.csv and cells/)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: cannot be read as a UTF-8 CSV ({exc})") from None
    reader = csv.DictReader(text.splitlines())
    missing = [c for c in CELL_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise ManifestError(f"{path}: missing column(s) {', '.join(missing)}")
    rows, seen = [], set()
    for number, raw in enumerate(reader, start=2):
        row = {k: (v or "").strip() for k, v in raw.items() if k}
        if not row["cell"]:
            raise ManifestError(f"{path}: line {number}: empty 'cell'")
        if row["cell"] in seen:
            raise ManifestError(f"{path}: line {number}: cell {row['cell']} listed twice")
        if row["label"] not in CELL_LABELS:
            raise ManifestError(f"{path}: line {number}: unknown label '{row['label']}' "
                                f"(expected {', '.join(CELL_LABELS)})")
        if not row["n_chromosomes"].isdigit():
            raise ManifestError(f"{path}: line {number}: n_chromosomes '{row['n_chromosomes']}' "
                                "is not a count")
        seen.add(row["cell"])
        rows.append(row)
    if not rows:
        raise ManifestError(f"{path}: no cells listed")
    return rows


def _select(rows, cells, path):
    """Apply the ``cells`` argument: None (all), an int (the first n) or a list of cell ids."""
    if cells is None:
        return rows
    if isinstance(cells, int):
        if cells < 1:
            raise ManifestError(f"cells={cells}: give at least one cell")
        return rows[:cells]
    wanted = [str(c) for c in cells]
    by_id = {r["cell"]: r for r in rows}
    unknown = [c for c in wanted if c not in by_id]
    if unknown:
        raise ManifestError(f"{path}: no cell(s) {', '.join(unknown[:5])} in cells.csv "
                            "(or excluded by their label)")
    return [by_id[c] for c in wanted]


def cell_crops(cells_dir, cell):
    """``{slot: [crop path, ...]}`` of one cell of a set, crops in numeric order.

    Raises:
        ManifestError: the cell's folder is missing or holds a folder that is not a class 1..24.
    """
    folder = Path(cells_dir) / "cells" / cell
    if not folder.is_dir():
        raise ManifestError(f"{folder}: cell folder not found (listed in cells.csv)")
    return folder_crops(folder)


def folder_crops(folder):
    """``{slot: [crop path, ...]}`` of a cell folder (``<folder>/<k>/*.png``, k = 1..24), crops in numeric order.

    Raises:
        ManifestError: the folder holds an entry that is not a class folder 1..24.
    """
    folder = Path(folder)
    crops = {slot: [] for slot in CHROMOSOME_LABELS}
    for sub in sorted(folder.iterdir()):
        if sub.name.startswith("."):
            continue
        slot = slot_of(sub.name)
        if slot is None or not sub.is_dir():
            raise ManifestError(f"{sub}: not a chromosome class folder (a cell folder holds only "
                                "folders 1..24 of crops, 23 = X, 24 = Y)")
        files = [f for f in sub.iterdir() if f.is_file() and is_image_path(f)
                 and not f.name.startswith(".")]
        crops[slot] = sorted(files, key=lambda f: (len(f.stem), f.stem))
    return crops


def is_cell_folder(path):
    """True if ``path`` looks like one cell's crops: a folder holding at least one class folder 1..24."""
    path = Path(path)
    return path.is_dir() and any(sub.is_dir() and slot_of(sub.name) is not None for sub in path.iterdir())


def find_cell_folders(path):
    """The cell folders at or under ``path`` (see :func:`is_cell_folder`), sorted; none inside another."""
    path = Path(path)
    if is_cell_folder(path):
        return [path]
    if not path.is_dir():
        return []
    found = []
    for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found += find_cell_folders(sub)
    return found


def load_crop(path):
    """A crop as a 2-D gray ``uint8`` array (ImageError naming the file if it is unusable).

    Crops smaller than the karyogram minimum (8 px) are accepted: segmentation leaves a few
    tiny pieces (gband612 has one of 9x6 px), and they are part of the cell as published.
    """
    try:
        return decode_image(path)[:, :, 1]
    except ImageError as exc:
        if not exc.reason.startswith("too small"):
            raise
    import cv2

    # decode_image got past its checks for missing, empty, truncated and undecodable files
    # before it rejected the size, so the file decodes.
    image = cv2.imdecode(np.fromfile(str(path), np.uint8), cv2.IMREAD_GRAYSCALE)
    if image is None or image.size == 0:
        raise ImageError(path, "cannot be decoded as an image")
    return image


def is_dark_field(crops):
    """True if the crops lie on a dark field (Q-banding), from their border pixels."""
    levels = [background_level(c) for c in crops]
    return bool(levels) and float(np.median(levels)) < 128


def trim(crop, background):
    """Cut the uniform background around the chromosome (one pixel of it is kept)."""
    mask = np.abs(crop.astype(np.int16) - int(background)) > FOREGROUND_DELTA
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return crop
    y0, y1 = max(rows.min() - 1, 0), min(rows.max() + 2, crop.shape[0])
    x0, x1 = max(cols.min() - 1, 0), min(cols.max() + 2, crop.shape[1])
    return crop[y0:y1, x0:x1]


def upright(crop, background):
    """Turn a slanted chromosome to stand as narrow as it can (long axis vertical).

    The angle is the one (within +-90 degrees, the smaller rotation preferred) that minimises the
    width of the chromosome's convex hull: it straightens the long axis of straight chromosomes
    and stands bent or folded ones on end. Crops that gain less than a tenth of their width, or
    need less than :data:`UPRIGHT_MIN_DEGREES`, are returned unchanged. A rotation keeps the
    chromosome's size.
    """
    import cv2

    mask = (np.abs(crop.astype(np.int16) - int(background)) > FOREGROUND_DELTA).astype(np.uint8)
    points = cv2.findNonZero(mask)
    if points is None or len(points) < 10:
        return crop
    hull = cv2.convexHull(points).reshape(-1, 2).astype(np.float64)
    angles = np.radians(np.arange(-90, 90, 2.0))
    # x extent of the hull after rotating by each angle (cv2's convention: counter-clockwise)
    xs = np.cos(angles)[:, None] * hull[None, :, 0] + np.sin(angles)[:, None] * hull[None, :, 1]
    widths = xs.max(axis=1) - xs.min(axis=1)
    best = int(np.argmin(widths + 0.02 * np.abs(np.degrees(angles))))
    turn = float(np.degrees(angles[best]))
    straight = widths[np.argmin(np.abs(angles))]
    if abs(turn) < UPRIGHT_MIN_DEGREES or widths[best] > 0.9 * straight:
        return crop
    return trim(rotate_whole(crop, turn, background), background)


def rotate_whole(image, degrees, fill):
    """``image`` (2-D) rotated by ``degrees`` about its centre onto a canvas large enough to keep all of it.

    The corners the rotation uncovers are ``fill``."""
    import cv2

    h, w = image.shape
    rot = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
    cos, sin = abs(rot[0, 0]), abs(rot[0, 1])
    nw, nh = int(math.ceil(h * sin + w * cos)), int(math.ceil(h * cos + w * sin))
    rot[0, 2] += nw / 2 - w / 2
    rot[1, 2] += nh / 2 - h / 2
    return cv2.warpAffine(image, rot, (nw, nh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=int(fill))


def prepare_cell(cells_dir, cell, straighten=True, clean=False):
    """One cell's crops as the layout takes them: trimmed, turned upright, on their background.

    Returns:
        ``({slot: [gray uint8 crop, ...]}, background level)``.

    Raises:
        ImageError: a crop cannot be read (the message names the file).
        ManifestError: the cell folder is missing, malformed or empty.
    """
    cell_crops(cells_dir, cell)  # the set's own message when the cell's folder is missing
    return prepare_folder(Path(cells_dir) / "cells" / cell, straighten, clean)


def prepare_folder(folder, straighten=True, clean=False):
    """A cell folder's crops (:func:`folder_crops`) trimmed, turned upright, on their background.

    Raises:
        ImageError: a crop cannot be read (the message names the file).
        ManifestError: the folder is malformed or holds no crop.
    """
    paths = folder_crops(folder)
    crops = {slot: [load_crop(p) for p in files] for slot, files in paths.items()}
    if not any(crops.values()):
        raise ManifestError(f"{folder}: the cell has no crops (expected <k>/*.png with k = 1..24)")
    return prepare_crops(crops, straighten, clean)


def main_object(crop, background):
    """The crop with only its chromosome: pieces of neighbours that entered the box are erased.

    Raw bounding boxes cut from a metaphase hold pieces of neighbouring chromosomes at their edges.
    The chromosome is the connected component (of the pixels :data:`FOREGROUND_DELTA` from the
    background, lightly closed) with the largest area weighted by how near its centroid lies to the
    box's centre; other components are kept only when they lie mostly within its bounding box (a
    pale band splitting one chromosome in two).
    """
    import cv2

    mask = (np.abs(crop.astype(np.int16) - int(background)) > FOREGROUND_DELTA).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8))
    n, labels, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 2:
        return crop
    h, w = crop.shape
    centre = np.array([w / 2, h / 2])
    reach = np.hypot(w, h) / 2
    areas = stats[1:, cv2.CC_STAT_AREA].astype(np.float64)
    near = 1.0 - np.linalg.norm(centroids[1:] - centre, axis=1) / reach
    main = 1 + int(np.argmax(areas * np.clip(near, 0.05, None) ** 2))
    x, y, bw, bh = stats[main, :4]
    keep = labels == main
    for k in range(1, n):
        if k == main:
            continue
        inside = labels[y:y + bh, x:x + bw] == k
        if inside.sum() >= 0.6 * stats[k, cv2.CC_STAT_AREA]:
            keep |= labels == k
    keep = cv2.dilate(keep.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    return np.where(keep, crop, np.uint8(background)).astype(np.uint8)


def normalise_contrast(crop, background, level=None):
    """Stretch a pale chromosome's darkness so that its 95th percentile reaches ``level``.

    ``level`` defaults to 200 grey levels from the background. Crops already at least as dark are
    left as they are (only pale ones are stretched).
    """
    level = 200.0 if level is None else float(level)
    dark = np.abs(crop.astype(np.float32) - float(background))
    fg = dark > FOREGROUND_DELTA
    if fg.sum() < 4:
        return crop
    top = float(np.percentile(dark[fg], 95))
    if top >= level:
        return crop
    dark = np.clip(dark * (level / max(top, 1.0)), 0, 255)
    out = background - dark if background >= 128 else background + dark
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def prepare_crops(crops, straighten=True, clean=False):
    """``{slot: [gray crop, ...]}`` trimmed and turned upright on their background (dark field detected).

    Args:
        crops: the cell's crops.
        straighten: turn slanted chromosomes upright (:func:`upright`).
        clean: for raw bounding boxes from another laboratory: erase neighbours' pieces
            (:func:`main_object`) and stretch pale chromosomes (:func:`normalise_contrast`) first.

    Returns:
        ``({slot: [gray uint8 crop, ...]}, background level)``.
    """
    every = [c for cs in crops.values() for c in cs]
    background = BLACK if is_dark_field(every) else WHITE
    prepared = {}
    for slot, cs in crops.items():
        if clean:
            cs = [normalise_contrast(main_object(c, background), background) for c in cs]
        cs = [trim(c, background) for c in cs]
        if straighten:
            cs = [upright(c, background) for c in cs]
        prepared[slot] = cs
    return prepared, background


def assemble_cell(cells_dir, cell, size=DEFAULT_SIZE, straighten=True, clean=False, layout="standard"):
    """Lay one cell of a set out as a karyogram (``layout``: ``standard`` or ``compact``).

    Returns:
        ``(rgb uint8 image, number of crops, background level)``.

    Raises:
        ImageError: a crop cannot be read (the message names the file).
        ManifestError: the cell folder is missing or malformed.
    """
    cell_crops(cells_dir, cell)
    return assemble_folder(Path(cells_dir) / "cells" / cell, size, straighten, clean, layout)


def assemble_folder(folder, size=DEFAULT_SIZE, straighten=True, clean=False, layout="standard"):
    """Lay a cell folder's crops (``<folder>/<k>/*.png``) out as a karyogram, as ``karyo data assemble`` does.

    Returns:
        ``(rgb uint8 image, number of crops, background level)``.

    Raises:
        ImageError: a crop cannot be read (the message names the file).
        ManifestError: the folder is malformed or holds no crop (the message names it).
    """
    prepared, background = prepare_folder(folder, straighten, clean)
    laid = arrange_karyogram(prepared, size, background=background, layout=layout)
    return laid.image, sum(len(cs) for cs in prepared.values()), background


def safe_file_name(text):
    """``text`` as a file name: every run of characters other than letters, digits, ``.``, ``_``, ``-`` is ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def _cells_iterator(rows, progress, desc):
    if progress:
        from tqdm.auto import tqdm

        return tqdm(rows, desc=desc, unit="cell")
    return rows


def assemble_cells(cells_dir, out_dir, size=DEFAULT_SIZE, include_uncertain=False, cells=None,
                   progress=True, straighten=True, clean=False, layout="standard"):
    """Assemble every cell of a set into a karyogram: ``out_dir/manifest.csv`` + ``images/``.

    Args:
        cells_dir: the set's folder (holds ``cells.csv`` and ``cells/``).
        out_dir: folder to create (written atomically; an earlier output is replaced, any
            other existing file or folder is refused).
        size: karyogram side in pixels (the thesis' 416).
        include_uncertain: keep cells labelled ``uncertain`` (their label stays ``uncertain``).
        cells: optional cell ids, or the number of (selected) cells to take from the top.
        progress: show a progress bar.
        straighten: turn slanted crops upright (see :func:`upright`).
        clean: erase neighbours' pieces and stretch pale chromosomes (raw bounding boxes from
            another laboratory; see :func:`prepare_crops`).
        layout: ``standard`` or ``compact`` (thin gaps, no numbers; then a ``layout`` column is added).

    Returns:
        path of the manifest (columns ``path,label,group,karyotype,cell,n_chromosomes,sha256``;
        ``group`` is the case, so no patient straddles a split).

    Raises:
        ManifestError: ``cells.csv`` or a cell folder is missing or malformed, or a cell's crop
            count differs from its ``n_chromosomes``.
        ImageError: a crop cannot be read; nothing is written.
    """
    cells_dir, out_dir = Path(cells_dir), Path(out_dir)
    layout = get_layout(layout).name
    rows = read_cells(cells_dir)
    check_output_folder(out_dir, inputs=(cells_dir,))
    keep = CELL_LABELS if include_uncertain else ("normal", "abnormal")
    rows = _select([r for r in rows if r["label"] in keep], cells, cells_dir / "cells.csv")
    if not rows:
        raise ManifestError(f"{cells_dir / 'cells.csv'}: no cells to assemble")
    out_rows, names = [], set()
    with atomic_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        for row in _cells_iterator(rows, progress, "assemble karyograms"):
            image, n, _ = assemble_cell(cells_dir, row["cell"], size, straighten, clean, layout)
            if n != int(row["n_chromosomes"]):
                raise ManifestError(f"{cells_dir / 'cells' / row['cell']}: {n} crops, but "
                                    f"cells.csv says n_chromosomes={row['n_chromosomes']}")
            name = safe_file_name(row["cell"])
            if name in names:
                raise ManifestError(f"cell id {row['cell']} clashes with another as a file name")
            names.add(name)
            data = encode_png(image[:, :, 0])  # gray PNG: the three channels are equal
            (tmp / "images" / f"{name}.png").write_bytes(data)
            out_rows.append({"path": f"images/{name}.png", "label": row["label"],
                             "group": row["case"] or row["cell"], "karyotype": row["karyotype"],
                             "cell": row["cell"], "n_chromosomes": row["n_chromosomes"],
                             "sha256": hashlib.sha256(data).hexdigest()}
                            | ({"layout": layout} if layout != "standard" else {}))
        write_manifest(tmp / "manifest.csv", out_rows,
                       list(KARYOGRAM_COLUMNS) + (["layout"] if layout != "standard" else []))
    return out_dir / "manifest.csv"


def pad_square(crop, background):
    """Pad a crop to a square on its background, the chromosome centred."""
    h, w = crop.shape
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    out = np.full((side, side), int(background), np.uint8)
    out[top:top + h, left:left + w] = crop
    return out


def chromosome_manifest(cells_dir, out_dir, size=None, cells=None, progress=True):
    """Write the single-chromosome task of two-step transfer: one image per crop, 24 classes.

    Every cell of ``cells.csv`` contributes (a crop's class is known even when the cell's count
    is irregular). Crops are padded to a square on their own background and resized to ``size``
    when given, and written inside ``out_dir`` so that the manifest's paths stay inside it.

    Returns:
        path of the manifest (columns ``path,label,group,cell,sha256``; ``label`` is
        ``1``..``22``, ``X``, ``Y``; ``group`` is the case).

    Raises:
        ManifestError: ``cells.csv`` or a cell folder is missing or malformed.
        ImageError: a crop cannot be read; nothing is written.
    """
    import cv2

    cells_dir, out_dir = Path(cells_dir), Path(out_dir)
    if size is not None and size < 8:
        raise ManifestError(f"size {size} is too small for a chromosome image (at least 8)")
    rows = _select(read_cells(cells_dir), cells, cells_dir / "cells.csv")
    check_output_folder(out_dir, inputs=(cells_dir,))
    out_rows = []
    with atomic_dir(out_dir) as tmp:
        for row in _cells_iterator(rows, progress, "copy chromosomes"):
            folder = safe_file_name(row["cell"])
            (tmp / "images" / folder).mkdir(parents=True, exist_ok=True)
            for slot, files in cell_crops(cells_dir, row["cell"]).items():
                for i, path in enumerate(files):
                    crop = load_crop(path)
                    square = pad_square(crop, WHITE if background_level(crop) >= 128 else BLACK)
                    if size is not None and square.shape[0] != size:
                        interp = cv2.INTER_AREA if square.shape[0] > size else cv2.INTER_LINEAR
                        square = cv2.resize(square, (size, size), interpolation=interp)
                    data = encode_png(square)
                    rel = f"images/{folder}/{slot}-{i}.png"
                    (tmp / rel).write_bytes(data)
                    out_rows.append({"path": rel, "label": slot, "group": row["case"] or row["cell"],
                                     "cell": row["cell"], "sha256": hashlib.sha256(data).hexdigest()})
        if not out_rows:
            raise ManifestError(f"{cells_dir}: no chromosome crops found")
        write_manifest(tmp / "manifest.csv", out_rows, list(CHROMOSOME_COLUMNS))
    return out_dir / "manifest.csv"
