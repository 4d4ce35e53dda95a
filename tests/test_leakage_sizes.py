"""Leakage guard at every image size: distinct karyograms are never refused, copies are caught.

Stored images below :data:`karyo.leakage.MIN_REFUSE_SIDE` are too small for the hash to tell
distinct synthetic karyograms from augmented copies (docs/reliability.md), so there a grouped
split only warns; from that size on a copy across the split is refused.
"""

import cv2
import numpy as np
import pytest

from karyo.data.augment import augment_image
from karyo.errors import SplitError
from karyo.data.imageio import write_image
from karyo.data.leakage import MIN_REFUSE_SIDE, check_leakage
from karyo.data.manifest import Manifest
from karyo.karyograms.synth import MIN_SIZE, plan_dataset, render_karyogram

SIZES = (32, 64, 96, 160, 416)
DISTINCT = 30


def render(karyotype, size, seed):
    """A synthetic karyogram stored at ``size`` px (rendered at synth's minimum, then shrunk, below it)."""
    image = render_karyogram(karyotype, max(size, MIN_SIZE), np.random.default_rng([seed, 7]), "g")
    if size < MIN_SIZE:
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    return image


def folder(tmp_path, images, parts):
    rows = []
    for name, image in images.items():
        write_image(tmp_path / f"{name}.png", image)
        rows.append({"path": f"{name}.png", "label": "normal", "group": name, "split": parts[name]})
    return Manifest(rows, tmp_path, source=tmp_path / "manifest.csv")


@pytest.mark.parametrize("size", SIZES)
def test_distinct_karyograms_pass_and_copies_are_refused_or_warned_about(tmp_path, size):
    plan = plan_dataset(DISTINCT * 2 // 3, DISTINCT - DISTINCT * 2 // 3, seed=3)
    images = {f"k{i:02d}": render(karyotype, size, i) for i, karyotype in enumerate(plan)}
    parts = {name: ("train", "val", "test")[i % 3] for i, name in enumerate(images)}
    distinct = folder(tmp_path / "distinct", images, parts)
    summary = check_leakage(distinct, "grouped")  # never raises, at any size
    assert summary["smallest_side"] == size
    if size >= MIN_REFUSE_SIDE:
        assert summary["pairs"] == 0 and summary["warning"] is None

    # k00 (train) copied byte for byte into test: refused at every size
    exact = folder(tmp_path / "exact", {**images, "k00_same": images["k00"].copy()}, {**parts, "k00_same": "test"})
    with pytest.raises(SplitError, match=r"k00.png \(train\) and k00_same.png \(test\), hash distance 0.000"):
        check_leakage(exact, "grouped")

    # three augmented copies of k00 in test: refused from MIN_REFUSE_SIDE on, warned about below
    copies = dict(images)
    for k in range(3):
        copies[f"k00_aug{k}"] = augment_image(images["k00"], np.random.default_rng(k))
    parts.update({name: "test" for name in copies if name.startswith("k00_")})
    leaky = folder(tmp_path / "leaky", copies, parts)
    if size >= MIN_REFUSE_SIDE:
        with pytest.raises(SplitError, match=r"k00.png \(train\) and k00_aug\d.png \(test\)") as caught:
            check_leakage(leaky, "grouped")
        caught_copies = {p[3] for p in caught.value.pairs if p[1] == "k00.png"}
        assert caught_copies == {"k00_aug0.png", "k00_aug1.png", "k00_aug2.png"}
    else:
        summary = check_leakage(leaky, "grouped")
        assert summary["small_image_pairs"] == summary["pairs"] >= 1
        assert f"below the {MIN_REFUSE_SIDE} px" in summary["warning"] and "not refused" in summary["warning"]
