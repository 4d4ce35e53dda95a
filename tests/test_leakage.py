"""Leakage guard: copies across split parts are found, distinct karyograms are not."""

import csv
import json

import numpy as np
import pytest

from karyo.karyograms import karyotype as kt
from karyo.data import leakage
from karyo.data.augment import augment_image, augment_manifest
from karyo.errors import KaryoError, SplitError
from karyo.data.imageio import decode_image, write_image
from karyo.data.leakage import (
    DEFAULT_THRESHOLD,
    check_leakage,
    hamming_distances,
    hash_bits,
    near_duplicates,
    perceptual_hash,
    write_pairs,
)
from karyo.data.manifest import Manifest, read_manifest, write_manifest
from karyo.data.splits import split_rows
from karyo.karyograms.synth import render_karyogram, synthesize

SIZE = 224  # small, but above the ~160 px where the hash stays reliable (see the module's table)


def karyogram(seed, stain="g", abnormality="none"):
    return render_karyogram(kt.for_abnormality(abnormality, "XY"), SIZE, np.random.default_rng(seed), stain)


def distance(a, b):
    return float(hamming_distances(perceptual_hash(a), perceptual_hash(b))[0, 0])


@pytest.mark.parametrize("stain", ["g", "q"])
def test_copies_are_near_and_distinct_karyograms_are_far(stain):
    original = karyogram(1, stain)
    assert distance(original, original.copy()) == 0.0
    copies = [augment_image(original, np.random.default_rng(k)) for k in range(6)]
    # the ends of the thesis' brightness range (+25 % saturates the paper), then noise
    for factor in (0.75, 1.25):
        scaled = np.clip(original.astype(np.float32) * factor, 0, 255).round().astype(np.uint8)
        copies.append(augment_image(scaled, np.random.default_rng(7), brightness=0.0))
    for copy in copies:
        assert distance(original, copy) <= DEFAULT_THRESHOLD
    # same karyotype, same layout, another cell: never a near-duplicate
    for seed in (2, 3, 4):
        assert distance(original, karyogram(seed, stain)) > DEFAULT_THRESHOLD
    assert distance(original, karyogram(5, stain, "trisomy21")) > DEFAULT_THRESHOLD


def test_a_classic_phash_would_not_separate_these():
    """The design's reason: a 64-bit pHash calls distinct synthetic karyograms duplicates."""
    import cv2

    def classic(image):
        gray = cv2.resize(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32), (32, 32),
                          interpolation=cv2.INTER_AREA)
        c = cv2.dct(gray)[:8, :8].ravel()[1:]
        return c > np.median(c)

    images = [karyogram(seed) for seed in range(8)]
    classic_d = hamming_distances(np.stack([classic(x) for x in images]), np.stack([classic(x) for x in images]))
    ours = hamming_distances(np.stack([perceptual_hash(x) for x in images]),
                             np.stack([perceptual_hash(x) for x in images]))
    off = ~np.eye(len(images), dtype=bool)
    assert (classic_d[off] <= DEFAULT_THRESHOLD).any()
    assert (ours[off] > DEFAULT_THRESHOLD).all()


def test_hamming_distances_match_a_plain_count(monkeypatch):
    rng = np.random.default_rng(0)
    for bits in (7, 64, 100, hash_bits()):
        a, b = rng.random((5, bits)) < 0.5, rng.random((3, bits)) < 0.5
        expected = (a[:, None, :] != b[None, :, :]).sum(-1) / bits
        np.testing.assert_allclose(hamming_distances(a, b), expected)
        if hasattr(np, "bitwise_count"):  # the numpy < 2 path gives the same
            with monkeypatch.context() as m:
                m.delattr(np, "bitwise_count")
                np.testing.assert_allclose(hamming_distances(a, b), expected)
    with pytest.raises(KaryoError, match="differ in length"):
        hamming_distances(a, b[:, :-1])


def test_hash_is_fixed_length_for_any_size_and_rejects_non_images():
    for shape in ((50, 70), (300, 200, 3), (900, 900)):
        image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
        assert perceptual_hash(image).shape == (hash_bits(),)
    with pytest.raises(KaryoError, match="uint8"):
        perceptual_hash(np.zeros((40, 40), np.float32))
    with pytest.raises(KaryoError, match="uint8"):
        perceptual_hash(np.zeros((2, 40), np.uint8))
    with pytest.raises(KaryoError, match="gray or RGB"):
        perceptual_hash(np.zeros((40, 40, 2), np.uint8))
    gray = np.random.default_rng(1).integers(0, 256, (60, 60), dtype=np.uint8)
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    assert (perceptual_hash(gray) == perceptual_hash(rgb)).all()
    assert (perceptual_hash(gray[:, :, None]) == perceptual_hash(rgb)).all()


@pytest.fixture
def split_folder(tmp_path):
    """Six distinct karyograms in three parts, with planted copies.

    train: a, b, c, c_aug          val: d, b_aug          test: e, f, a_copy (same bytes as a)
    Expected pairs across parts: (train a, test a_copy), (train b, val b_aug). c_aug is a copy
    in the same part (not leakage).
    """
    images = {name: karyogram(seed, abnormality="trisomy21" if name in "ce" else "none")
              for seed, name in enumerate("abcdef", start=10)}
    images["b_aug"] = augment_image(images["b"], np.random.default_rng(1))
    images["c_aug"] = augment_image(images["c"], np.random.default_rng(2))
    parts = {"a": "train", "b": "train", "c": "train", "c_aug": "train", "d": "val", "b_aug": "val",
             "e": "test", "f": "test"}
    rows = []
    for name, image in images.items():
        write_image(tmp_path / f"{name}.png", image)
        rows.append({"path": f"{name}.png", "label": "abnormal" if name[0] in "ce" else "normal",
                     "group": name, "split": parts[name]})
    (tmp_path / "a_copy.png").write_bytes((tmp_path / "a.png").read_bytes())
    rows.append({"path": "a_copy.png", "label": "normal", "group": "a_copy", "split": "test"})
    write_manifest(tmp_path / "manifest.csv", rows)
    return tmp_path


def test_near_duplicates_finds_exactly_the_planted_pairs(split_folder):
    manifest = read_manifest(split_folder / "manifest.csv")
    pairs = near_duplicates(manifest.rows, manifest.root)
    assert [(a, pa, b, pb) for a, pa, b, pb, _ in pairs] == [
        ("train", "a.png", "test", "a_copy.png"),  # distance 0 comes first
        ("train", "b.png", "val", "b_aug.png"),
    ]
    assert pairs[0][4] == 0.0 and 0 < pairs[1][4] <= DEFAULT_THRESHOLD


def test_grouped_raises_naming_both_files_and_the_fix(split_folder):
    manifest = read_manifest(split_folder / "manifest.csv")
    with pytest.raises(SplitError) as info:
        check_leakage(manifest, "grouped")
    message = str(info.value)
    assert "2 near-identical image pair(s)" in message
    assert "a.png (train)" in message and "a_copy.png (test)" in message
    assert "distance 0.000" in message and "'group' column" in message
    assert [(p[1], p[3]) for p in info.value.pairs] == [("a.png", "a_copy.png"), ("b.png", "b_aug.png")]


def test_thesis_returns_a_warning_that_quantifies_the_leakage(split_folder):
    manifest = read_manifest(split_folder / "manifest.csv")
    summary = check_leakage(manifest, "thesis")
    assert summary["pairs"] == 2
    assert summary["parts"]["test"] == {"images": 3, "with_train_match": 1, "with_val_match": 0}
    assert summary["parts"]["val"] == {"images": 2, "with_train_match": 1}
    assert summary["warning"].startswith(
        "1 of 3 test images (33.3 %) and 1 of 2 validation images (50.0 %) have a near-identical image "
        "in the training part")
    assert [e["path_b"] for e in summary["examples"]] == ["a_copy.png", "b_aug.png"]
    json.dumps(summary)  # goes into a run's config.json


def test_distinct_images_pass_both_protocols_and_a_zero_threshold_keeps_exact_copies(split_folder):
    manifest = read_manifest(split_folder / "manifest.csv")
    clean = manifest.subset(r for r in manifest.rows if r["path"] not in ("a_copy.png", "b_aug.png"))
    for protocol in ("grouped", "thesis"):
        summary = check_leakage(clean, protocol)
        assert summary["pairs"] == 0 and summary["warning"] is None
    exact = near_duplicates(manifest.rows, manifest.root, threshold=0.0)
    assert [(p[1], p[3]) for p in exact] == [("a.png", "a_copy.png")]


def test_bad_input_is_one_clear_error(split_folder):
    manifest = read_manifest(split_folder / "manifest.csv")
    rows = [dict(r) for r in manifest.rows]
    rows[0]["split"] = "holdout"
    with pytest.raises(SplitError, match="a.png: split 'holdout'"):
        near_duplicates(rows, manifest.root)
    with pytest.raises(SplitError, match="unknown split protocol"):
        check_leakage(manifest, "random")
    with pytest.raises(KaryoError, match="threshold"):
        near_duplicates(manifest.rows, manifest.root, threshold=0.7)


def test_write_pairs_round_trips(split_folder, tmp_path):
    manifest = read_manifest(split_folder / "manifest.csv")
    pairs = near_duplicates(manifest.rows, manifest.root)
    out = write_pairs(tmp_path / "leakage.csv", pairs)
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["path_a"], r["path_b"]) for r in rows] == [(p[1], p[3]) for p in pairs]
    assert float(rows[1]["distance"]) == pytest.approx(pairs[1][4], abs=1e-4)


def test_augment_then_split_leaks_exactly_where_sources_straddle(tmp_path):
    """The thesis protocol on a small augmented set: the guard finds the truth, grouped is clean."""
    manifest_path = synthesize(tmp_path / "syn", normal=6, abnormal=6, size=SIZE, seed=3, progress=False)
    augmented = read_manifest(augment_manifest(manifest_path, tmp_path / "aug", progress=False))
    hashes = leakage.hash_files([augmented.resolve(r) for r in augmented.rows])
    for protocol in ("thesis", "grouped"):
        rows = [dict(r) for r in augmented.rows]
        for row, part in zip(rows, split_rows(rows, protocol, seed=0)):
            row["split"] = part
        found = {(p[1], p[3]) for p in near_duplicates(rows, augmented.root, hashes=hashes)}
        truth = {(a["path"], b["path"]) for a in rows for b in rows
                 if a["source"] == b["source"] and a["split"] != b["split"]
                 and ("train", "val", "test").index(a["split"]) < ("train", "val", "test").index(b["split"])}
        assert found == truth
        if protocol == "thesis":
            assert truth  # the thesis protocol does leak here
        else:
            assert not truth
            check_leakage(Manifest(rows, augmented.root, augmented.columns), "grouped")


@pytest.mark.realdata
def test_real_karyograms_of_other_patients_are_never_near_duplicates(shared_data, tmp_path):
    from karyo.karyograms.assemble import assemble_cells

    manifest_path = assemble_cells(shared_data / "gband612", tmp_path / "real", cells=40, progress=False)
    manifest = read_manifest(manifest_path)
    hashes = leakage.hash_files([manifest.resolve(r) for r in manifest.rows])
    d = hamming_distances(hashes, hashes)
    cases = np.array([r["group"] for r in manifest.rows])
    other_patient = cases[:, None] != cases[None, :]
    assert d[other_patient].min() > DEFAULT_THRESHOLD
    original = decode_image(manifest.resolve(manifest.rows[0]))
    for k in range(4):
        assert distance(original, augment_image(original, np.random.default_rng(k))) <= DEFAULT_THRESHOLD


def drawing(seed, abnormal, size=64):
    """Bars of flat tones on white; abnormal ones carry a black block (like the training tests' data)."""
    rng = np.random.default_rng(seed)
    image = np.full((size, size), 255, np.uint8)
    for k in range(6):
        image[4:4 + int(rng.integers(20, 50)), 4 + 10 * k:8 + 10 * k] = rng.integers(0, 90)
    if abnormal:
        image[44:60, 44:60] = 0
    return image


def test_drawings_of_a_few_flat_tones_are_not_taken_for_copies():
    # Clipped at their 5th percentile these would all keep the black block alone (distance 0).
    images = [drawing(seed, abnormal=seed % 2 == 0) for seed in range(16)]
    hashes = np.stack([perceptual_hash(x) for x in images])
    d = hamming_distances(hashes, hashes)
    assert d[~np.eye(len(images), dtype=bool)].min() > DEFAULT_THRESHOLD
    darker = (images[0] * 0.8).astype(np.uint8)
    assert distance(images[0], darker) <= DEFAULT_THRESHOLD
