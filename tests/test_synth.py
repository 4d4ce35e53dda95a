"""Synthetic karyograms: every slot holds exactly the karyotype's chromosomes, and seeds repeat."""

import cv2
import numpy as np
import pytest

from karyo.karyotype import ABNORMAL, NORMAL, make_karyotype, slot_chromosomes
from karyo.layout import SLOTS, slot_boxes
from karyo.manifest import read_manifest, verify_manifest
from karyo.synth import chromosome_length, render_karyogram, synthesize


def count_per_slot(image):
    """Separate chromosomes (8-connected dark components) inside each slot box."""
    gray = image[:, :, 0]
    counts = {}
    for slot, (x0, y0, x1, y1) in slot_boxes(gray.shape[0]).items():
        mask = (gray[y0:y1 + 1, x0:x1 + 1] < 235).astype(np.uint8)
        n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        counts[slot] = int(sum(stats[i, cv2.CC_STAT_AREA] >= 3 for i in range(1, n)))
    return counts


def expected(karyotype):
    return {slot: len(chromosomes) for slot, chromosomes in slot_chromosomes(karyotype).items()}


KARYOTYPES = [NORMAL["46,XX"], NORMAL["46,XY"]] + [make_karyotype(n, s) for n in ABNORMAL for s in ("XX", "XY")] \
    + [make_karyotype("inv9_variant", "XY")]


@pytest.mark.parametrize("karyotype", KARYOTYPES, ids=lambda k: f"{k.iscn}")
@pytest.mark.parametrize("size", [416, 160])
def test_every_slot_holds_the_karyotypes_chromosomes(karyotype, size):
    for seed in range(3):
        image = render_karyogram(karyotype, size, np.random.default_rng(seed))
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        assert count_per_slot(image) == expected(karyotype), (karyotype.iscn, seed)


def test_the_counts_that_make_an_abnormality():
    assert expected(make_karyotype("trisomy21", "XY"))["21"] == 3
    assert expected(make_karyotype("monosomyX"))["X"] == 1 and expected(make_karyotype("monosomyX"))["Y"] == 0
    assert expected(make_karyotype("klinefelter")) | {} == {**expected(NORMAL["46,XX"]), "X": 2, "Y": 1}
    assert expected(NORMAL["46,XY"])["Y"] == 1 and set(expected(NORMAL["46,XY"])) == set(SLOTS)


def test_structural_changes_alter_lengths():
    cri = slot_chromosomes(make_karyotype("cri_du_chat"))["5"]
    assert chromosome_length(cri[0]) < 0.9 * chromosome_length(cri[1])
    ph = slot_chromosomes(make_karyotype("philadelphia"))
    assert chromosome_length(ph["22"][0]) < 0.7 * chromosome_length(ph["22"][1])  # der(22): the small Ph
    assert chromosome_length(ph["9"][0]) > chromosome_length(ph["9"][1])  # der(9) gains 22q
    inv = slot_chromosomes(make_karyotype("inv9_variant"))["9"]
    assert chromosome_length(inv[0]) == chromosome_length(inv[1])  # an inversion moves, not removes


def test_same_seed_same_bytes_and_a_sound_manifest(tmp_path):
    a = synthesize(tmp_path / "a", normal=3, abnormal=3, size=96, seed=5, progress=False)
    b = synthesize(tmp_path / "b", normal=3, abnormal=3, size=96, seed=5, progress=False)
    c = synthesize(tmp_path / "c", normal=3, abnormal=3, size=96, seed=6, progress=False)
    read = [read_manifest(m) for m in (a, b, c)]
    assert [r["sha256"] for r in read[0].rows] == [r["sha256"] for r in read[1].rows]
    assert [r["sha256"] for r in read[0].rows] != [r["sha256"] for r in read[2].rows]
    assert verify_manifest(a) == []
    rows = read[0].rows
    assert [r["label"] for r in rows] == ["normal"] * 3 + ["abnormal"] * 3
    assert {r["sex"] for r in rows[:3]} <= {"XX", "XY"} and all(r["abnormality"] != "none" for r in rows[3:])


def test_q_band_is_bright_on_dark():
    image = render_karyogram(NORMAL["46,XY"], 160, np.random.default_rng(0), stain="q")
    assert np.median(image) < 40
