"""Assembling karyograms from chromosome crops, and the single-chromosome manifest."""

import collections
import csv

import cv2
import numpy as np
import pytest

from karyo.karyograms.assemble import assemble_cells, chromosome_manifest, read_cells, upright
from karyo.errors import ImageError, ManifestError
from karyo.karyograms.layout import slot_boxes
from karyo.data.manifest import CHROMOSOME_LABELS, read_manifest, sha256_file, verify_manifest

#: hg38 lengths (Mb) of chromosomes 1..22, X, Y: the crops' relative sizes.
LENGTH_MB = (249, 242, 198, 190, 182, 171, 159, 145, 138, 134, 135, 133, 114, 107, 102, 90, 83, 80,
             59, 64, 47, 51, 156, 57)
CELLS = [  # cell, case, karyotype, label, n per slot changes, dark field
    ("c1", "p1", "46,XX", "normal", {"Y": 0}, False),
    ("c2", "p1", "46,XX", "normal", {"Y": 0}, False),
    ("c3", "p2", "47,XY,+21", "abnormal", {"21": 3, "X": 1, "Y": 1}, False),
    ("c4", "p3", "45,XX,-20", "uncertain", {"20": 1, "Y": 0}, False),
    ("q1", "p4", "46,XY", "normal", {"X": 1, "Y": 1}, True),
]


def write_crop(path, slot_index, dark_field, slant=False):
    """A crop like the real sets': a banded bar of the chromosome's relative length."""
    height = 8 + LENGTH_MB[slot_index] // 4
    background = 0 if dark_field else 255
    ink = (200, 120) if dark_field else (60, 140)
    crop = np.full((height + 6, 16), background, np.uint8)
    for y in range(3, height + 3):
        crop[y, 4:12] = ink[(y // 4) % 2]
    if slant:  # a chromosome lying at 40 degrees, as in the BioImLab crops
        crop = np.full((70, 70), background, np.uint8)
        cv2.line(crop, (12, 60), (55, 10), int(ink[0]), 7)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), crop)


@pytest.fixture
def cell_set(tmp_path):
    """A small set in the layout of ../shared/data: cells.csv + cells/<cell>/<k>/<i>.png."""
    root = tmp_path / "set"
    rows = []
    for cell, case, karyotype, label, changes, dark in CELLS:
        n = 0
        for k, slot in enumerate(CHROMOSOME_LABELS):
            count = changes.get(slot, 2 if k < 23 else 0)
            if slot == "X" and "X" not in changes:
                count = 2
            for i in range(count):
                write_crop(root / "cells" / cell / str(k + 1) / f"{i}.png", k, dark,
                           slant=dark and slot == "1" and i == 0)
                n += 1
        rows.append({"cell": cell, "case": case, "karyotype": karyotype, "label": label,
                     "status": "test", "n_chromosomes": n})
    with open(root / "cells.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def slot_counts(gray, dark_field):
    mask = (gray > 60) if dark_field else (gray < 200)
    out = {}
    for slot, (x0, y0, x1, y1) in slot_boxes(gray.shape[0]).items():
        n, _, stats, _ = cv2.connectedComponentsWithStats(mask[y0:y1, x0:x1].astype(np.uint8), 8)
        out[slot] = int(sum(stats[i, cv2.CC_STAT_AREA] >= 4 for i in range(1, n)))
    return out


def test_assembled_karyograms_match_cells_csv(cell_set, tmp_path):
    manifest = assemble_cells(cell_set, tmp_path / "out", size=416, progress=False)
    rows = read_manifest(manifest).rows
    cells = {r["cell"]: r for r in read_cells(cell_set)}
    assert [r["cell"] for r in rows] == ["c1", "c2", "c3", "q1"]  # the uncertain cell is left out
    for row in rows:
        source = cells[row["cell"]]
        assert (row["label"], row["group"], row["karyotype"], row["n_chromosomes"]) == \
            (source["label"], source["case"], source["karyotype"], source["n_chromosomes"])
        assert row["sha256"] == sha256_file(tmp_path / "out" / row["path"])
    assert verify_manifest(manifest) == []


def test_each_slot_shows_its_crops_on_the_crops_background(cell_set, tmp_path):
    assemble_cells(cell_set, tmp_path / "out", size=416, progress=False)
    for cell, _, _, _, changes, dark in CELLS[:3] + CELLS[4:]:
        gray = cv2.imread(str(tmp_path / "out" / "images" / f"{cell}.png"), cv2.IMREAD_GRAYSCALE)
        assert gray.shape == (416, 416)
        border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
        assert (np.median(border) < 20) if dark else (np.median(border) > 235)
        expected = {s: changes.get(s, 2 if k < 23 else 0) for k, s in enumerate(CHROMOSOME_LABELS)}
        if "X" not in changes:
            expected["X"] = 2
        assert slot_counts(gray, dark) == expected, cell


def test_relative_sizes_are_kept(cell_set, tmp_path):
    assemble_cells(cell_set, tmp_path / "out", size=416, cells=["c1"], progress=False)
    gray = cv2.imread(str(tmp_path / "out" / "images" / "c1.png"), cv2.IMREAD_GRAYSCALE)
    heights = {}
    for slot in ("1", "9", "21", "X"):
        x0, y0, x1, y1 = slot_boxes(416)[slot]
        rows = np.nonzero((gray[y0:y1, x0:x1] < 200).any(axis=1))[0]
        heights[slot] = rows.max() - rows.min() + 1
    for slot in ("9", "21", "X"):
        k = CHROMOSOME_LABELS.index(slot)
        assert heights[slot] / heights["1"] == pytest.approx((8 + LENGTH_MB[k] // 4) / (8 + 249 // 4),
                                                             abs=0.03)


def test_slanted_crops_are_turned_upright():
    crop = np.zeros((70, 70), np.uint8)
    cv2.line(crop, (12, 60), (55, 10), 200, 7)
    turned = upright(crop, 0)
    assert turned.shape[0] > 2.5 * turned.shape[1]
    assert (turned > 100).sum() == pytest.approx((crop > 100).sum(), rel=0.15)  # same size
    standing = np.full((60, 20), 255, np.uint8)
    standing[5:55, 6:14] = 50
    assert upright(standing, 255) is standing


def test_uncertain_cells_only_on_request_and_cells_selects(cell_set, tmp_path):
    rows = read_manifest(assemble_cells(cell_set, tmp_path / "a", include_uncertain=True,
                                        progress=False)).rows
    labels = collections.Counter(r["label"] for r in rows)
    assert labels == {"normal": 3, "abnormal": 1, "uncertain": 1}
    rows = read_manifest(assemble_cells(cell_set, tmp_path / "b", cells=2, progress=False)).rows
    assert [r["cell"] for r in rows] == ["c1", "c2"]
    rows = read_manifest(assemble_cells(cell_set, tmp_path / "c", cells=["c3"], progress=False)).rows
    assert [r["cell"] for r in rows] == ["c3"]
    with pytest.raises(ManifestError, match="no cell"):
        assemble_cells(cell_set, tmp_path / "d", cells=["c4"], progress=False)  # uncertain: excluded


def test_a_bad_crop_names_the_file_and_writes_nothing(cell_set, tmp_path):
    out = tmp_path / "out"
    assemble_cells(cell_set, out, cells=["c1"], progress=False)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    victim = cell_set / "cells" / "c2" / "7" / "1.png"
    victim.write_bytes(victim.read_bytes()[:40])
    with pytest.raises(ImageError, match=str(victim)):
        assemble_cells(cell_set, out, progress=False)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "set"]  # no partial folder


def test_malformed_sets_are_clear_errors(cell_set, tmp_path):
    with pytest.raises(ManifestError, match="folder not found"):
        assemble_cells(tmp_path / "nowhere", tmp_path / "out", progress=False)
    (cell_set / "cells" / "c2" / "5" / "1.png").unlink()
    with pytest.raises(ManifestError, match="c2: 45 crops, but cells.csv says n_chromosomes=46"):
        assemble_cells(cell_set, tmp_path / "out", progress=False)
    (cell_set / "cells" / "c1" / "25").mkdir()
    with pytest.raises(ManifestError, match="not a chromosome class folder"):
        assemble_cells(cell_set, tmp_path / "out", progress=False)
    text = (cell_set / "cells.csv").read_text()
    (cell_set / "cells.csv").write_text(text.replace("n_chromosomes", "count"))
    with pytest.raises(ManifestError, match="missing column"):
        assemble_cells(cell_set, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_chromosome_manifest_pads_squares_on_the_crops_background(cell_set, tmp_path):
    manifest = chromosome_manifest(cell_set, tmp_path / "chr", size=32, progress=False)
    rows = read_manifest(manifest).rows
    total = sum(int(r["n_chromosomes"]) for r in read_cells(cell_set))
    assert len(rows) == total  # every cell, the uncertain one included
    assert set(r["label"] for r in rows) == set(CHROMOSOME_LABELS)
    assert collections.Counter(r["label"] for r in rows)["21"] == 11
    assert {r["group"] for r in rows} == {"p1", "p2", "p3", "p4"}
    assert verify_manifest(manifest) == []
    for row in rows[:: max(1, len(rows) // 20)]:
        image = cv2.imread(str(tmp_path / "chr" / row["path"]), cv2.IMREAD_GRAYSCALE)
        assert image.shape == (32, 32)
        assert image[0, 0] == (0 if row["cell"] == "q1" else 255)
    # without a size, crops keep their resolution and become squares
    rows = read_manifest(chromosome_manifest(cell_set, tmp_path / "raw", cells=["c1"],
                                             progress=False)).rows
    first = cv2.imread(str(tmp_path / "raw" / rows[0]["path"]), cv2.IMREAD_GRAYSCALE)
    assert first.shape == (8 + 249 // 4 + 6,) * 2


@pytest.mark.realdata
def test_real_gband_subset_matches_cells_csv(shared_data, tmp_path):
    source = shared_data / "gband612"
    cells = read_cells(source)
    chosen = [r["cell"] for r in cells if r["label"] == "abnormal"][:12] + \
        [r["cell"] for r in cells if r["label"] == "normal"][:8]
    rows = read_manifest(assemble_cells(source, tmp_path / "k", cells=chosen, progress=False)).rows
    by_id = {r["cell"]: r for r in cells}
    assert len(rows) == 20
    for row in rows:
        assert (row["label"], row["karyotype"], row["group"]) == \
            (by_id[row["cell"]]["label"], by_id[row["cell"]]["karyotype"], by_id[row["cell"]]["case"])
        gray = cv2.imread(str(tmp_path / "k" / row["path"]), cv2.IMREAD_GRAYSCALE)
        assert gray.shape == (416, 416) and np.median(gray) > 230  # G-band: white paper


@pytest.mark.realdata
@pytest.mark.slow
def test_real_sets_give_the_documented_karyogram_counts(shared_data, tmp_path):
    gband = read_manifest(assemble_cells(shared_data / "gband612", tmp_path / "g", progress=False))
    assert collections.Counter(r["label"] for r in gband.rows) == {"normal": 558, "abnormal": 26}
    by_id = {r["cell"]: r for r in read_cells(shared_data / "gband612")}
    assert all(r["label"] == by_id[r["cell"]]["label"] for r in gband.rows)
    assert len({r["group"] for r in gband.rows}) < len(gband.rows)  # cases hold several cells
    qband = read_manifest(assemble_cells(shared_data / "bioimlab_qband", tmp_path / "q",
                                         progress=False))
    assert len(qband.rows) == 119 and {r["label"] for r in qband.rows} == {"normal"}
    gray = cv2.imread(str(tmp_path / "q" / qband.rows[0]["path"]), cv2.IMREAD_GRAYSCALE)
    assert np.median(gray) < 30  # Q-band: dark field
