"""Abnormal karyograms built from real chromosome crops, each with per-slot labels.

Real abnormal cells are few (gband612: 26 aneuploid cells, and no structural abnormality at
all), so the detector also learns from abnormal karyograms made out of real normal cells: the
cell's crops (trimmed and upright, as :func:`karyo.karyograms.assemble.prepare_cell` gives them) are
changed the way a numerical or structural abnormality changes a cell, then laid out as
``karyo data assemble`` lays out a real one. The crops stand vertically, so a chromosome's axis
is the crop's rows:

* ``extra`` / ``missing``: a copy of a homologue added (slightly rescaled) / one crop dropped;
* ``del_terminal`` / ``del_interstitial``: rows cut off an end / out of the middle;
* ``duplication``: a run of rows repeated in place;
* ``inversion``: a run of rows turned end to end;
* ``translocation``: the distal parts of two chromosomes of different classes swapped
  (reciprocal; both derivatives stay in their own slots, as ISCN draws them);
* ``robertsonian``: the long arms of two acrocentrics of different classes joined at their
  centromeres into one chromosome drawn in the first one's slot.

A slot is labelled abnormal when it was changed or when its count differs from what the cell's
sex leads one to expect (:func:`karyo.karyograms.slots.count_deviations`): the slots a reader would flag.
Only the caller decides which cells are used; build training karyograms from training cases only.

Examples:
    >>> import numpy as np
    >>> from karyo.karyograms.layout import SLOTS
    >>> crops = {s: [np.full((30, 8), 90, np.uint8)] * 2 for s in SLOTS[:23]}   # 46,XX
    >>> changed, labels = make_abnormal(crops, "missing", np.random.default_rng(0))
    >>> sum(labels.values()), sum(map(len, changed.values()))
    (1, 45)
"""

import numpy as np

from karyo.karyograms.assemble import prepare_cell
from karyo.errors import KaryoError
from karyo.karyograms.karyotype import ACROCENTRIC
from karyo.karyograms.layout import SLOTS, WHITE, arrange_karyogram
from karyo.karyograms.slots import count_deviations
from karyo.data.splits import split_rows

#: Kinds of change, numerical first.
NUMERICAL = ("extra", "missing")
STRUCTURAL = ("del_terminal", "del_interstitial", "duplication", "inversion", "translocation",
              "robertsonian")
KINDS = NUMERICAL + STRUCTURAL
#: Shortest crop (rows) a structural change is made on: shorter ones have no room for a segment.
MIN_ROWS = 16


def _pad_width(crop, width, background):
    """Centre ``crop`` on a background strip ``width`` wide."""
    h, w = crop.shape
    if w >= width:
        return crop
    out = np.full((h, width), background, np.uint8)
    left = (width - w) // 2
    out[:, left:left + w] = crop
    return out


def _stack(parts, background):
    """Join crops end to end (top to bottom), centred on a common width."""
    width = max(p.shape[1] for p in parts)
    return np.concatenate([_pad_width(p, width, background) for p in parts], axis=0)


def _segment(rng, h, low, high):
    """Rows ``(a, b)`` of a segment of ``low``..``high`` of the length, inside the chromosome."""
    n = max(2, int(round(h * rng.uniform(low, high))))
    a = int(rng.integers(max(1, int(0.1 * h)), max(2, h - n - int(0.1 * h))))
    return a, min(h, a + n)


def _pick(rng, crops, slots, min_rows=MIN_ROWS):
    """A random ``(slot, index)`` among ``slots`` whose crop has at least ``min_rows`` rows."""
    options = [(s, i) for s in slots for i, c in enumerate(crops.get(s, [])) if c.shape[0] >= min_rows]
    if not options:
        raise KaryoError("no chromosome is long enough for a structural change")
    return options[int(rng.integers(len(options)))]


def _change_one(crops, kind, rng, background):
    """Apply ``kind`` to copies of ``crops``; returns ``(crops, changed slots)``."""
    out = {s: list(cs) for s, cs in crops.items()}
    male = len(out.get("Y", [])) >= 1
    # the Y is small and varies between men: numerical changes only; a man's X has no homologue
    structural_slots = [s for s in SLOTS[:22]] + ([] if male else ["X"])
    if kind == "extra":
        slot, i = _pick(rng, out, [s for s in SLOTS if out.get(s)], 1)
        copy = out[slot][i]
        factor = rng.uniform(0.93, 1.07)
        import cv2

        h, w = copy.shape
        copy = cv2.resize(copy, (max(1, int(w * factor)), max(1, int(h * factor))),
                          interpolation=cv2.INTER_LINEAR)
        if rng.random() < 0.5:
            copy = copy[:, ::-1]
        out[slot].insert(int(rng.integers(len(out[slot]) + 1)), np.ascontiguousarray(copy))
        return out, {slot}
    if kind == "missing":
        slot, i = _pick(rng, out, [s for s in SLOTS if out.get(s)], 1)
        del out[slot][i]
        return out, {slot}
    if kind in ("del_terminal", "del_interstitial", "duplication", "inversion"):
        slot, i = _pick(rng, out, structural_slots)
        c = out[slot][i]
        h = c.shape[0]
        if kind == "del_terminal":
            n = max(2, int(round(h * rng.uniform(0.15, 0.4))))
            c = c[n:] if rng.random() < 0.5 else c[:h - n]
        elif kind == "del_interstitial":
            a, b = _segment(rng, h, 0.15, 0.3)
            c = np.concatenate([c[:a], c[b:]], axis=0)
        elif kind == "duplication":
            a, b = _segment(rng, h, 0.15, 0.3)
            c = np.concatenate([c[:b], c[a:b], c[b:]], axis=0)
        else:
            a, b = _segment(rng, h, 0.3, 0.55)
            c = np.concatenate([c[:a], c[a:b][::-1], c[b:]], axis=0)
        out[slot][i] = np.ascontiguousarray(c)
        return out, {slot}
    if kind == "translocation":
        slot_a, i = _pick(rng, out, structural_slots)
        slot_b, j = _pick(rng, out, [s for s in structural_slots if s != slot_a])
        a, b = out[slot_a][i], out[slot_b][j]
        cut_a = int(a.shape[0] * rng.uniform(0.35, 0.75))
        cut_b = int(b.shape[0] * rng.uniform(0.35, 0.75))
        out[slot_a][i] = _stack([a[:cut_a], b[cut_b:]], background)
        out[slot_b][j] = _stack([b[:cut_b], a[cut_a:]], background)
        return out, {slot_a, slot_b}
    if kind == "robertsonian":
        acro = [s for s in ACROCENTRIC if out.get(s)]
        slot_a, i = _pick(rng, out, acro)
        slot_b, j = _pick(rng, out, [s for s in acro if s != slot_a])
        first, second = sorted((slot_a, slot_b), key=SLOTS.index)
        if first != slot_a:
            i, j = j, i
        a, b = out[first][i], out[second][j]
        # the short arm and satellites (about the top fifth of an acrocentric) are lost
        qa, qb = a[int(0.2 * a.shape[0]):], b[int(0.2 * b.shape[0]):]
        out[first][i] = _stack([qa[::-1], qb], background)
        del out[second][j]
        return out, {first, second}
    raise KaryoError(f"unknown abnormality kind '{kind}' (choose from {', '.join(KINDS)})")


def slot_labels(counts, changed=()):
    """``{slot: 0/1}``: 1 where the count deviates from the expected or the slot was changed."""
    deviations = count_deviations(counts)
    return {s: int(deviations[s] != 0 or s in changed) for s in SLOTS}


def make_abnormal(crops, kind, rng, background=WHITE):
    """A cell's crops with one abnormality of ``kind``, and the per-slot labels.

    Args:
        crops: ``{slot: [gray uint8 crop, ...]}`` (upright, on ``background``).
        kind: one of :data:`KINDS`.
        rng: ``numpy.random.Generator``.
        background: the crops' background level.

    Returns:
        ``(changed crops, {slot: 0/1})``.

    Raises:
        KaryoError: unknown kind, or no chromosome fits the change.
    """
    changed, slots = _change_one(crops, kind, rng, background)
    counts = {s: len(changed.get(s, [])) for s in SLOTS}
    return changed, slot_labels(counts, slots)


def abnormal_karyogram(cells_dir, cell, kind, size, rng, prepared=None):
    """Assemble ``cell`` with one abnormality of ``kind``: ``(rgb image, {slot: 0/1})``.

    ``prepared`` reuses :func:`karyo.karyograms.assemble.prepare_cell`'s result for the cell.
    """
    crops, background = prepared if prepared is not None else prepare_cell(cells_dir, cell)
    changed, labels = make_abnormal(crops, kind, rng, background)
    return arrange_karyogram(changed, size, background=background).image, labels


def cell_slot_labels(cells_dir, cell):
    """``{slot: 0/1}`` of a real cell from its crop counts (count deviations only)."""
    crops, _ = prepare_cell(cells_dir, cell)
    return slot_labels({s: len(crops.get(s, [])) for s in SLOTS})


def split_cells(rows, seed=0):
    """``{part: [cell, ...]}`` of manifest rows (``cell``, ``label``, ``group`` = case), split by case.

    Uses ``karyo.data.splits.split_rows`` (grouped, stratified by label), so no case is in two parts;
    build abnormal training karyograms from the ``train`` cells only.
    """
    parts = split_rows(rows, protocol="grouped", seed=seed)
    out = {"train": [], "val": [], "test": []}
    for row, part in zip(rows, parts):
        out[part].append(row["cell"])
    return out
