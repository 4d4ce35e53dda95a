"""Per-pair augmentation (thesis 5.3): pairs move inside their slots, the layout and counts stay."""

import numpy as np
import pytest

from karyo.data.augment import augment_rows
from karyo.data.manifest import read_manifest
from karyo.errors import KaryoError
from karyo.experiments.registry import get_experiment
from karyo.karyograms.karyotype import get
from karyo.karyograms.layout import slot_boxes
from karyo.karyograms.pair_augment import augment_pairs
from karyo.karyograms.slots import slot_counts, read_slots
from karyo.karyograms.synth import render_karyogram
from tests.common import write_karyograms


def _outside_boxes(image):
    mask = np.ones(image.shape[:2], bool)
    for x0, y0, x1, y1 in slot_boxes(image.shape[0]).values():
        mask[y0:y1, x0:x1] = False
    return image[mask]


@pytest.mark.parametrize("name", ["normal_xy", "trisomy21_xx", "monosomyX"])
def test_pairs_move_but_stay_in_their_slots(name):
    image = render_karyogram(get(name), size=256, rng=np.random.default_rng(0))
    moved = augment_pairs(image, np.random.default_rng(1))
    assert moved.shape == image.shape and moved.dtype == np.uint8
    # The pair numbers and the paper between the slots are untouched ...
    np.testing.assert_array_equal(_outside_boxes(moved), _outside_boxes(image))
    # ... every slot moved ...
    for x0, y0, x1, y1 in slot_boxes(256).values():
        box, new = image[y0:y1, x0:x1], moved[y0:y1, x0:x1]
        if (box < 200).any():
            assert np.abs(box.astype(int) - new.astype(int)).max() > 30
    # ... and a cytogeneticist still counts the same chromosomes in each slot.
    assert slot_counts(read_slots(moved)) == slot_counts(read_slots(image))


def test_mirror_only_mirrors_each_slot_and_the_rng_decides_everything():
    image = render_karyogram(get("normal_xx"), size=128, rng=np.random.default_rng(2))
    mirrored = augment_pairs(image, np.random.default_rng(0), max_angle=0, max_shift=0, mirror=1)
    for x0, y0, x1, y1 in slot_boxes(128).values():
        np.testing.assert_array_equal(mirrored[y0:y1, x0:x1], image[y0:y1, x0:x1][:, ::-1])
    a = augment_pairs(image, np.random.default_rng(5))
    np.testing.assert_array_equal(a, augment_pairs(image, np.random.default_rng(5)))
    assert not np.array_equal(a, augment_pairs(image, np.random.default_rng(6)))


def test_bad_karyograms_and_settings_are_refused():
    with pytest.raises(KaryoError, match="square uint8 karyogram"):
        augment_pairs(np.zeros((64, 96, 3), np.uint8), np.random.default_rng(0))
    with pytest.raises(KaryoError, match="square uint8 karyogram"):
        augment_pairs(np.zeros((32, 32), np.uint8), np.random.default_rng(0))
    with pytest.raises(KaryoError, match="out of range"):
        augment_pairs(np.zeros((64, 64), np.uint8), np.random.default_rng(0), max_angle=90)
    with pytest.raises(KaryoError, match="augmented copies"):
        get_experiment("vgg16_original", per_pair=True)
    assert get_experiment("vgg16_per_pair").per_pair


def test_a_transform_draws_from_its_own_generator(tmp_path):
    # Switching the per-pair transform on must not change a copy's brightness, noise and blur:
    # with a transform that returns its input, the copies are byte for byte those without one.
    manifest_path = write_karyograms(tmp_path / "src", normal=2, abnormal=2, size=64)
    manifest = read_manifest(manifest_path)
    targets = {"normal": 4, "abnormal": 4}
    plain = augment_rows(manifest, manifest.rows, tmp_path / "plain", targets, seed=3)
    same = augment_rows(manifest, manifest.rows, tmp_path / "same", targets, seed=3,
                        transform=lambda image, rng: image)
    assert [r["sha256"] for r in plain] == [r["sha256"] for r in same]
    pairs = augment_rows(manifest, manifest.rows, tmp_path / "pairs", targets, seed=3, transform=augment_pairs)
    changed = [a["sha256"] != b["sha256"] for a, b in zip(plain, pairs)]
    assert changed == [r["augmented"] == "1" for r in plain]  # copies differ, originals do not
