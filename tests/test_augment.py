"""The thesis' augmentation: pixel values change, the layout never does; counts, groups, seeds."""

import csv
import hashlib
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from karyo.data.augment import (
    augment_image,
    augment_manifest,
    augment_rows,
    balance_counts,
    copy_rng,
    default_targets,
)
from karyo.errors import ImageError, KaryoError, ManifestError
from karyo.data.imageio import decode_image
from karyo.data.manifest import read_manifest, verify_manifest, write_manifest


def karyogram_like(seed=0, h=96, w=128):
    """Dark banded 'chromosomes' of different sizes on white, placed asymmetrically."""
    rng = np.random.default_rng(seed)
    image = np.full((h, w), 255, np.uint8)
    boxes = [(6, 8, 30, 7), (8, 24, 24, 6), (10, 40, 18, 6), (50, 10, 36, 8),
             (54, 70, 20, 5), (12, 95, 40, 9), (60, 104, 14, 5)]
    for y, x, bh, bw in boxes:
        image[y:y + bh, x:x + bw] = rng.integers(30, 90)
        for band in range(y + 3, y + bh - 2, 5):  # lighter bands, like G-bands
            image[band:band + 2, x:x + bw] = rng.integers(110, 160)
    return image


def centroids(image):
    """Centroids of the chromosomes: Otsu foreground after a median filter (removes impulses)."""
    gray = image if image.ndim == 2 else image[:, :, 0]
    clean = cv2.medianBlur(gray, 3)
    _, mask = cv2.threshold(clean, 0, 255, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8))
    n, _, stats, cents = cv2.connectedComponentsWithStats(mask)
    keep = [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= 20]
    return sorted(map(tuple, np.round(cents[keep], 1)))


def same_layout(source, copy, tolerance=1.5):
    """True when the copy has the same chromosomes at the same places as the source."""
    a, b = centroids(source), centroids(copy)
    if len(a) != len(b):
        return False
    return all(np.hypot(p[0] - q[0], p[1] - q[1]) <= tolerance for p, q in zip(a, b))


def test_layout_check_can_fail_on_geometric_changes():
    source = karyogram_like()
    assert len(centroids(source)) == 7
    assert same_layout(source, source.copy())
    assert not same_layout(source, source[:, ::-1])  # mirrored
    assert not same_layout(source, np.ascontiguousarray(source[::-1]))  # flipped
    assert not same_layout(source, np.roll(source, 4, axis=1))  # shifted by 4 px (a crop)
    rotated = cv2.warpAffine(source, cv2.getRotationMatrix2D((64, 48), 8, 1.0), (128, 96),
                             borderValue=255)
    assert not same_layout(source, rotated)


@pytest.mark.parametrize("blur", [0.0, 1.5])
def test_augmented_copies_keep_the_layout(blur):
    source = karyogram_like(3)
    for seed in range(25):
        copy = augment_image(source, np.random.default_rng(seed), blur=blur)
        assert copy.shape == source.shape and copy.dtype == np.uint8
        assert same_layout(source, copy), f"seed {seed} moved a chromosome"


def test_color_input_keeps_shape_and_stays_gray_when_gray():
    source = np.repeat(karyogram_like(1)[:, :, None], 3, axis=2)
    copy = augment_image(source, np.random.default_rng(0), blur=1.0)
    assert copy.shape == source.shape
    assert (copy[:, :, 0] == copy[:, :, 1]).all() and (copy[:, :, 0] == copy[:, :, 2]).all()


def test_brightness_stays_within_25_percent_and_uses_the_range():
    # Mid-gray values so that no pixel clips at +25 % and the mean ratio is the factor.
    source = np.random.default_rng(0).integers(40, 200, size=(64, 64)).astype(np.uint8)
    ratios = [augment_image(source, np.random.default_rng(s), noise=0.0).mean() / source.mean()
              for s in range(200)]
    assert min(ratios) >= 0.75 - 0.005 and max(ratios) <= 1.25 + 0.005
    assert min(ratios) < 0.8 and max(ratios) > 1.2  # both directions, near the ends
    tight = [augment_image(source, np.random.default_rng(s), brightness=0.1, noise=0.0).mean()
             / source.mean() for s in range(50)]
    assert 0.895 <= min(tight) and max(tight) <= 1.105


def test_noise_touches_at_most_5_percent_of_pixels():
    source = np.full((100, 120), 128, np.uint8)  # every salt or pepper pixel differs from 128
    shares = []
    for seed in range(60):
        copy = augment_image(source, np.random.default_rng(seed), brightness=0.0)
        changed = copy != source
        assert set(np.unique(copy[changed])) <= {0, 255}
        shares.append(changed.mean())
    assert max(shares) <= 0.05
    assert max(shares) > 0.04 and min(shares) < 0.01  # the share is drawn in [0, 5 %]
    none = augment_image(source, np.random.default_rng(0), brightness=0.0, noise=0.0)
    assert (none == source).all()


def test_blur_softens_edges_only_when_asked():
    source = karyogram_like(2)
    sharp = augment_image(source, np.random.default_rng(1), brightness=0.0, noise=0.0)
    assert (sharp == source).all()
    soft = [augment_image(source, np.random.default_rng(s), brightness=0.0, noise=0.0, blur=2.0)
            for s in range(5)]

    def energy(image):  # squared gradient: a blur can only lower it
        return (np.diff(image.astype(float), axis=1) ** 2).sum()

    assert all(energy(s) <= energy(source) for s in soft)
    assert sum(energy(s) < 0.9 * energy(source) for s in soft) >= 4  # sigma ~ U[0, 2]


@pytest.mark.parametrize("kwargs", [{"brightness": 1.0}, {"brightness": -0.1}, {"noise": 1.5},
                                    {"blur": -1}, {"noise": float("nan")}, {"blur": "big"}])
def test_bad_parameters_name_the_value(kwargs):
    with pytest.raises(KaryoError, match=next(iter(kwargs))):
        augment_image(karyogram_like(), np.random.default_rng(0), **kwargs)


def test_balance_counts_reproduces_the_thesis_and_scales():
    assert balance_counts(105, 41) == {"normal": 376, "abnormal": 316}
    assert balance_counts(210, 82) == {"normal": 752, "abnormal": 632}
    skewed = balance_counts(558, 26)
    assert skewed["normal"] >= 558 and abs(skewed["normal"] / skewed["abnormal"] - 376 / 316) < 0.01
    assert balance_counts(500, 10)["normal"] >= 500  # never below the originals
    assert balance_counts(105, 41, normal=400, abnormal=None) == {"normal": 400, "abnormal": 316}
    assert balance_counts(7, 0) == {"normal": 18, "abnormal": 0}  # 376 * 7 / 146
    with pytest.raises(KaryoError, match="below its 105"):
        balance_counts(105, 41, normal=100)
    with pytest.raises(KaryoError, match="no 'abnormal'"):
        balance_counts(7, 0, abnormal=5)


def test_default_targets_balance_other_class_sets():
    # 44 images grow by the thesis' 692 / 146 to ~208.5, shared equally by 3 classes.
    assert default_targets({"1": 30, "2": 10, "X": 4}) == {"1": 70, "2": 70, "X": 70}
    assert default_targets({"1": 90, "2": 10}) == {"1": 237, "2": 237}
    # 105 images -> ~83 per class for 6 classes: the big class keeps its 100 originals.
    rare = default_targets({"a": 100, "b": 1, "c": 1, "d": 1, "e": 1, "f": 1})
    assert rare == {"a": 100, "b": 83, "c": 83, "d": 83, "e": 83, "f": 83}


# --------------------------------------------------------------------------- manifests


@pytest.fixture
def small_manifest(tmp_path):
    """6 normal images (3 cases) and 2 abnormal (2 cases), in sub-folders, with sha256."""
    root = tmp_path / "data"
    rows = []
    for i in range(8):
        label = "normal" if i < 6 else "abnormal"
        rel = f"{label}/k{i}.png"
        (root / label).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / rel), karyogram_like(i, 48, 64))
        digest = hashlib.sha256((root / rel).read_bytes()).hexdigest()
        rows.append({"path": rel, "label": label, "group": f"case{i // 2}", "karyotype": "46,XX",
                     "sha256": digest})
    path = write_manifest(root / "manifest.csv", rows)
    return path


def test_augment_rows_counts_groups_sources_and_originals(small_manifest, tmp_path):
    manifest = read_manifest(small_manifest)
    out = tmp_path / "out"
    rows = augment_rows(manifest, manifest.rows, out, {"normal": 14, "abnormal": 9}, seed=3)
    assert Counter(r["label"] for r in rows) == {"normal": 14, "abnormal": 9}
    by_path = {r["path"]: r for r in manifest.rows}
    originals = [r for r in rows if r["augmented"] == "0"]
    assert sorted(r["source"] for r in originals) == sorted(by_path)
    for row in originals:  # copied byte for byte
        assert (out / row["path"]).read_bytes() == (manifest.root / row["source"]).read_bytes()
    copies = [r for r in rows if r["augmented"] == "1"]
    assert len(copies) == 23 - 8
    for row in copies:
        source = by_path[row["source"]]
        assert row["group"] == source["group"] and row["label"] == source["label"]
        assert row["karyotype"] == source["karyotype"]
        assert hashlib.sha256((out / row["path"]).read_bytes()).hexdigest() == row["sha256"]
        assert same_layout(decode_image(manifest.root / row["source"]),
                           decode_image(out / row["path"]))
    per_source = Counter(r["source"] for r in copies)
    normal = [per_source[p] for p, r in by_path.items() if r["label"] == "normal"]
    abnormal = [per_source[p] for p, r in by_path.items() if r["label"] == "abnormal"]
    assert max(normal) - min(normal) <= 1 and sorted(abnormal) == [3, 4]  # round-robin
    assert len({r["path"] for r in rows}) == len(rows)


def test_augment_manifest_writes_a_sound_self_contained_manifest(small_manifest, tmp_path):
    out = augment_manifest(small_manifest, tmp_path / "aug", normal=10, abnormal=8, seed=0,
                           progress=False)
    assert out == tmp_path / "aug" / "manifest.csv"
    manifest = read_manifest(out)
    assert Counter(r["label"] for r in manifest.rows) == {"normal": 10, "abnormal": 8}
    assert {"source", "augmented", "sha256", "karyotype"} <= set(manifest.columns)
    assert verify_manifest(out) == []
    assert (tmp_path / "aug" / "augment.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers


def test_default_targets_follow_the_thesis_rule(small_manifest, tmp_path):
    out = augment_manifest(small_manifest, tmp_path / "aug", progress=False)
    counts = Counter(r["label"] for r in read_manifest(out).rows)
    assert counts == balance_counts(6, 2)


def files_of(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(Path(folder).rglob("*")) if p.is_file() and p.name != "augment.json"}


def test_same_seed_same_bytes_other_seed_other_bytes(small_manifest, tmp_path):
    kwargs = {"normal": 12, "abnormal": 6, "blur": 1.0, "progress": False}
    a = files_of(augment_manifest(small_manifest, tmp_path / "a", seed=7, **kwargs).parent)
    b = files_of(augment_manifest(small_manifest, tmp_path / "b", seed=7, **kwargs).parent)
    c = files_of(augment_manifest(small_manifest, tmp_path / "c", seed=8, **kwargs).parent)
    assert a == b
    assert a.keys() == c.keys()
    augmented = [k for k in a if ".aug" in k]
    assert augmented and all(a[k] != c[k] for k in augmented)
    assert all(a[k] == c[k] for k in a if ".aug" not in k and k != "manifest.csv")


def test_a_copy_does_not_depend_on_row_order(small_manifest, tmp_path):
    manifest = read_manifest(small_manifest)
    targets = {"normal": 12, "abnormal": 4}  # whole multiples: every source gets 1 copy
    forward = augment_rows(manifest, manifest.rows, tmp_path / "f", targets, seed=5)
    backward = augment_rows(manifest, manifest.rows[::-1], tmp_path / "r", targets, seed=5)
    assert {r["path"]: r["sha256"] for r in forward} == {r["path"]: r["sha256"] for r in backward}
    assert copy_rng(5, "a.png", 1).random() == copy_rng(5, "a.png", 1).random()
    assert copy_rng(5, "a.png", 1).random() != copy_rng(5, "a.png", 2).random()


def test_errors_name_the_file_or_value(small_manifest, tmp_path):
    with pytest.raises(ManifestError, match="below its 6"):
        augment_manifest(small_manifest, tmp_path / "o", normal=3, progress=False)
    with pytest.raises(ManifestError, match="replace the input"):
        augment_manifest(small_manifest, small_manifest.parent, progress=False)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "thesis.pdf").write_text("x")
    with pytest.raises(ManifestError, match="not an earlier karyo output"):
        augment_manifest(small_manifest, busy, progress=False)
    (small_manifest.parent / "normal" / "k1.png").write_bytes(b"changed")
    with pytest.raises(ImageError, match="k1.png: sha256 mismatch"):
        augment_manifest(small_manifest, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()  # atomic: nothing half-written
    (small_manifest.parent / "normal" / "k1.png").unlink()
    with pytest.raises(ImageError, match="k1.png: file not found"):
        augment_manifest(small_manifest, tmp_path / "o", progress=False)


def test_normal_abnormal_targets_only_for_the_karyogram_task(tmp_path):
    root = tmp_path / "crops"
    root.mkdir()
    rows = []
    for i, label in enumerate(["1", "1", "X"]):
        cv2.imwrite(str(root / f"c{i}.png"), karyogram_like(i, 32, 32))
        rows.append({"path": f"c{i}.png", "label": label, "group": f"case{i}"})
    path = write_manifest(root / "m.csv", rows)
    with pytest.raises(ManifestError, match="karyogram task"):
        augment_manifest(path, tmp_path / "o", normal=5, progress=False)
    out = augment_manifest(path, tmp_path / "o", progress=False)
    counts = Counter(r["label"] for r in read_manifest(out).rows)
    assert counts["1"] == counts["X"] == default_targets({"1": 2, "X": 1})["X"]
    with open(out, newline="") as fh:
        assert {r["augmented"] for r in csv.DictReader(fh)} == {"0", "1"}
