"""Synthetic karyograms: every slot shows exactly the karyotype's chromosomes, structural changes
change lengths, the bands follow the stain classes, and a seed gives the same bytes."""

import collections
import csv

import cv2
import numpy as np
import pytest

from karyo.karyograms import karyotype as kt
from karyo.karyograms import synth
from karyo.errors import KaryoError
from karyo.karyograms.layout import slot_boxes
from karyo.data.manifest import read_manifest, sha256_file, verify_manifest
from karyo.karyograms.synth import plan_dataset, render_chromosome, render_karyogram, synthesize

#: Foreground thresholds: below this on white (G-band), above this on black (Q-band).
THRESHOLD = {"g": 238, "q": 35}


def foreground(image, stain):
    gray = image[:, :, 0]
    return gray < THRESHOLD["g"] if stain == "g" else gray > THRESHOLD["q"]


def slot_components(image, stain):
    """{slot: [(x, y, w, h), ...]}: separate chromosomes (8-connected) inside each slot box."""
    mask = foreground(image, stain).astype(np.uint8)
    found = {}
    for slot, (x0, y0, x1, y1) in slot_boxes(image.shape[0]).items():
        n, _, stats, _ = cv2.connectedComponentsWithStats(mask[y0:y1, x0:x1], connectivity=8)
        boxes = [tuple(stats[i, :4]) for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= 4]
        found[slot] = sorted(boxes)  # left to right
    return found


@pytest.mark.parametrize("stain", ["g", "q"])
@pytest.mark.parametrize("name", list(kt.KARYOTYPES))
def test_every_slot_shows_the_karyotypes_chromosomes(name, stain):
    karyotype = kt.get(name)
    expected = kt.counts(karyotype)
    for seed in range(3):
        image = render_karyogram(karyotype, 416, np.random.default_rng(seed), stain)
        assert image.shape == (416, 416, 3) and image.dtype == np.uint8
        found = {slot: len(boxes) for slot, boxes in slot_components(image, stain).items()}
        assert found == expected, (name, stain, seed)


@pytest.mark.parametrize("size", [224, 299])
def test_counts_hold_at_the_backbones_sizes(size):
    for seed, name in enumerate(["trisomy13_xy", "triplex", "philadelphia_xx"]):
        image = render_karyogram(kt.get(name), size, np.random.default_rng(seed))
        found = {s: len(b) for s, b in slot_components(image, "g").items()}
        assert found == kt.counts(kt.get(name))


def test_the_counts_that_make_each_abnormality():
    normal = kt.counts(kt.get("normal_xy"))
    assert sum(normal.values()) == 46 and normal["X"] == normal["Y"] == 1
    assert sum(kt.counts(kt.get("normal_xx")).values()) == 46
    assert kt.counts(kt.get("trisomy21_xy")) == {**normal, "21": 3}
    assert kt.counts(kt.get("trisomy18_xx"))["18"] == 3
    assert kt.counts(kt.get("trisomy13_xx"))["13"] == 3
    assert kt.counts(kt.get("monosomyX")) == {**normal, "Y": 0}
    assert kt.counts(kt.get("klinefelter")) == {**normal, "X": 2}
    assert kt.counts(kt.get("triplex")) == {**normal, "X": 3, "Y": 0}
    assert kt.counts(kt.get("xyy")) == {**normal, "Y": 2}
    for name in ("cri_du_chat_xy", "philadelphia_xy", "inv9_variant_xy"):
        assert kt.counts(kt.get(name)) == normal
    labels = {k.abnormality: k.label for k in kt.KARYOTYPES.values()}
    assert labels["inv9_variant"] == labels["none"] == "normal"
    assert all(labels[a] == "abnormal" for a in kt.ABNORMALITIES)


def test_structural_changes_alter_band_lists_and_lengths():
    length, cen = kt.chromosome_length, kt.centromere_position
    five, nine, twentytwo = kt.whole("5"), kt.whole("9"), kt.whole("22")
    # del(5)(p14): shorter, and the loss is all on the short arm
    assert length(kt.DEL_5P) < 0.9 * length(five)
    assert cen(five) - cen(kt.DEL_5P) == pytest.approx(length(five) - length(kt.DEL_5P))
    assert not any(b.name.startswith("p15") for b, _ in kt.chromosome_bands(kt.DEL_5P))
    # t(9;22): der(22) is the short Philadelphia chromosome ending in 9q34; der(9) gains 22q
    assert length(kt.DER_22) < 0.7 * length(twentytwo)
    assert length(kt.DER_9) > 1.1 * length(nine)
    assert length(kt.DER_9) + length(kt.DER_22) == length(nine) + length(twentytwo)
    last = kt.chromosome_bands(kt.DER_22)[-1][0]
    assert (last.chrom, last.name) == ("9", "q34.3")
    last = kt.chromosome_bands(kt.DER_9)[-1][0]
    assert (last.chrom, last.name) == ("22", "q13.33")
    # inv(9)(p12q13): same length, the centromere and the 9q12 heterochromatin move
    assert length(kt.INV_9) == length(nine)
    assert cen(kt.INV_9) > cen(nine) + 5e6
    bands = [b.name for b, _ in kt.chromosome_bands(kt.INV_9)]
    assert bands.index("q12") < bands.index("p11.2")


def test_iscn_band_points():
    assert kt.point("5", "pter") == 0
    assert kt.point("5", "p14") == (18_400_000 + 28_900_000) // 2  # p14.3 .. p14.1
    assert 127_500_000 < kt.point("9", "q34") < 138_394_717
    with pytest.raises(KaryoError, match="no band 'q99'"):
        kt.point("9", "q99")
    with pytest.raises(KaryoError, match="unknown karyotype"):
        kt.get("trisomy99")


def _heights(name, slot, seeds=range(4)):
    """Drawn heights (left, right) of the two chromosomes of ``slot``, per seed."""
    out = []
    for seed in seeds:
        boxes = slot_components(render_karyogram(kt.get(name), 416, np.random.default_rng(seed)), "g")
        assert len(boxes[slot]) == 2
        out.append([b[3] for b in boxes[slot]])
    return np.array(out, dtype=float)


def test_structural_changes_are_measurable_in_the_image():
    # The derivative stands right of its normal homologue (ISCN order).
    cri = _heights("cri_du_chat_xx", "5")
    assert (cri[:, 1] / cri[:, 0] < 0.93).all()  # 5p deleted: about 13 % shorter
    ph9, ph22 = _heights("philadelphia_xy", "9"), _heights("philadelphia_xy", "22")
    assert (ph9[:, 1] / ph9[:, 0] > 1.08).all()  # der(9) carries 22q: longer
    assert (ph22[:, 1] / ph22[:, 0] < 0.75).all()  # der(22): the short Philadelphia chromosome
    normal = _heights("normal_xx", "5")
    assert (np.abs(normal[:, 1] / normal[:, 0] - 1) < 0.06).all()  # homologues differ a little


def _straight(name, px_per_mb, stain="g"):
    """One chromosome drawn upright (no tilt or bend) and its sampled parameters."""
    rng = np.random.default_rng(0)
    cell = synth.sample_cell(rng, stain)
    c = synth.sample_chromosome(rng, kt.whole(name), cell, stain)
    c.update(tilt=0.0, bend=0.0, contrast=1.0)
    crop = render_chromosome(c, px_per_mb, stain, 255 if stain == "g" else 0, 1.0, 0.0)
    return crop, c


def test_band_darkness_follows_the_stain_classes():
    crop, c = _straight("1", 3.0)
    centre = crop[:, crop.shape[1] // 2].astype(float)
    rows = np.nonzero(centre < 250)[0]
    top, bottom = rows.min(), rows.max() + 1
    # stain class of each row, from the band list scaled to the drawn length
    lengths = np.array([b[0] for b in c["bands"]])
    edges = np.cumsum(lengths) / lengths.sum() * (bottom - top)
    stains = [b.stain for b, _ in kt.chromosome_bands(kt.whole("1"))]
    row_stain = [stains[min(np.searchsorted(edges, y + 0.5), len(stains) - 1)]
                 for y in range(bottom - top)]
    level = {s: np.mean([centre[top + y] for y, r in enumerate(row_stain) if r == s])
             for s in ("gneg", "gpos50", "gpos100")}
    assert level["gneg"] > level["gpos50"] + 20 > level["gpos100"] + 40


def test_centromere_constriction_and_acrocentric_stalk():
    crop, c = _straight("1", 3.0)
    width = (crop < 245).sum(axis=1)
    lengths = np.array([b[0] for b in c["bands"]])
    acen = [i for i, b in enumerate(c["bands"]) if b[3]]
    rows = np.nonzero(width)[0]
    scale = (rows.max() + 1 - rows.min()) / lengths.sum()
    cen_row = rows.min() + int(lengths[:acen[-1]].sum() * scale)
    assert width[cen_row - 1:cen_row + 2].min() < 0.8 * np.median(width[rows])
    crop, c = _straight("21", 6.0)
    width = (crop < 245).sum(axis=1)
    rows = np.nonzero(width)[0]
    p_arm = width[rows.min():rows.min() + int(0.2 * len(rows))]
    above = np.maximum.accumulate(p_arm)  # widest row from the tip down to here
    below = np.maximum.accumulate(p_arm[::-1])[::-1]  # widest row from here down the p arm
    # a neck: rows narrower than half the chromosome, between a wider satellite and the arm
    neck = (p_arm < 0.5 * np.median(width[rows])) & (above > 1.5 * p_arm) & (below > 1.5 * p_arm)
    assert neck.sum() >= 3


def test_q_band_is_bright_on_a_dark_field():
    image = render_karyogram(kt.get("normal_xy"), 416, np.random.default_rng(1), "q")[:, :, 0]
    assert np.median(image) < 30
    x0, y0, x1, y1 = slot_boxes(416)["1"]
    assert image[y0:y1, x0:x1].max() > 150


def test_same_seed_same_bytes_and_another_seed_other_bytes(tmp_path):
    a = synthesize(tmp_path / "a", normal=3, abnormal=3, size=128, seed=5, progress=False)
    b = synthesize(tmp_path / "b", normal=3, abnormal=3, size=128, seed=5, progress=False)
    c = synthesize(tmp_path / "c", normal=3, abnormal=3, size=128, seed=6, progress=False)
    assert a.read_bytes() == b.read_bytes()
    files = sorted(p.name for p in (tmp_path / "a" / "images").iterdir())
    assert len(files) == 6
    for name in files:
        assert (tmp_path / "a" / "images" / name).read_bytes() == \
            (tmp_path / "b" / "images" / name).read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert all((tmp_path / "a" / "images" / n).read_bytes() != (tmp_path / "c" / "images" / n).read_bytes()
               for n in files)
    one = render_karyogram(kt.get("xyy"), 160, np.random.default_rng(3))
    assert np.array_equal(one, render_karyogram(kt.get("xyy"), 160, np.random.default_rng(3)))


def test_manifest_records_karyotype_abnormality_sex_and_verifies(tmp_path):
    manifest = synthesize(tmp_path / "set", normal=4, abnormal=9, size=96, seed=0, progress=False)
    with open(manifest, newline="") as fh:
        header = next(csv.reader(fh))
    assert set(header) == set(synth.COLUMNS)
    rows = read_manifest(manifest).rows
    assert len(rows) == 13
    assert verify_manifest(manifest) == []
    for row in rows:
        assert row["group"] == f"{row['path'][len('images/'):-len('.png')]}"
        assert row["sha256"] == sha256_file(tmp_path / "set" / row["path"])
        registered = [k for k in kt.KARYOTYPES.values() if k.iscn == row["karyotype"]]
        assert registered and registered[0].abnormality == row["abnormality"]
        assert registered[0].sex == row["sex"] and registered[0].label == row["label"]
        if row["label"] == "normal":
            assert row["abnormality"] == "none"
    # nine abnormal images: each abnormality exactly once
    assert sorted(r["abnormality"] for r in rows if r["label"] == "abnormal") == sorted(kt.ABNORMALITIES)
    image = cv2.imread(str(tmp_path / "set" / rows[0]["path"]), cv2.IMREAD_UNCHANGED)
    assert image.shape == (96, 96)


def test_plan_is_balanced_seeded_and_offers_the_variant():
    plan = plan_dataset(normal=105, abnormal=41, seed=0)
    normal = [k for k in plan if k.label == "normal"]
    abnormal = collections.Counter(k.abnormality for k in plan if k.label == "abnormal")
    assert len(normal) == 105 and sum(abnormal.values()) == 41
    assert abs(sum(k.sex == "XX" for k in normal) - sum(k.sex == "XY" for k in normal)) == 1
    assert set(abnormal) == set(kt.ABNORMALITIES) and max(abnormal.values()) - min(abnormal.values()) <= 1
    assert [k.name for k in plan] == [k.name for k in plan_dataset(105, 41, seed=0)]
    assert [k.name for k in plan] != [k.name for k in plan_dataset(105, 41, seed=1)]
    # autosomal abnormalities come in both sexes
    sexes = {k.sex for k in plan if k.abnormality == "trisomy21"}
    assert sexes == {"XX", "XY"}
    variants = [k for k in plan_dataset(40, 0, seed=0, variants=True) if k.abnormality == "inv9_variant"]
    assert len(variants) == 4 and all(k.label == "normal" for k in variants)
    assert not any(k.abnormality == "inv9_variant" for k in plan)


def test_bad_arguments_are_clear_errors_and_leave_nothing(tmp_path):
    for kwargs, message in [(dict(stain="x"), "unknown stain"), (dict(size=32), "too small"),
                            (dict(seed=-1), "non-negative"), (dict(normal=0, abnormal=0), "nothing")]:
        with pytest.raises(KaryoError, match=message):
            synthesize(tmp_path / "out", **{"normal": 1, "abnormal": 1, **kwargs}, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_run_leaves_no_half_written_folder(tmp_path, monkeypatch):
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return np.zeros((96, 96, 3), np.uint8)

    monkeypatch.setattr(synth, "render_karyogram", failing)
    with pytest.raises(KeyboardInterrupt):
        synthesize(tmp_path / "out", normal=3, abnormal=2, size=96, progress=False)
    assert list(tmp_path.iterdir()) == []
