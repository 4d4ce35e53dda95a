"""Crops degraded as other laboratories cut them, and the assembly's cleaning of such crops."""

import cv2
import numpy as np
import pytest

from karyo.karyograms.assemble import folder_crops, load_crop, main_object, normalise_contrast, prepare_crops
from karyo.karyograms.degrade import degrade_cell, degrade_crop
from karyo.karyograms.layout import arrange_karyogram
from karyo.karyograms.slots import read_slots, slot_counts
from tests.common import write_cell_folder


def _bar(h=60, w=8):
    crop = np.full((h + 6, w + 6), 255, np.uint8)
    for y in range(3, h + 3):
        crop[y, 3:3 + w] = (60, 140)[(y // 4) % 2]
    return crop


def _components(crop):
    return cv2.connectedComponents((crop < 230).astype(np.uint8))[0] - 1


@pytest.mark.parametrize("effect, check", [
    ("rotation", lambda before, after: after.shape[1] > before.shape[1] + 8),
    # a narrower chromosome holds less ink (the resize keeps each row's mean darkness)
    ("thinning", lambda before, after: (255.0 - after).sum() < 0.92 * (255.0 - before).sum()),
    ("contrast", lambda before, after: after.min() > before.min() + 10),
    ("bending", lambda before, after: after.shape[1] > before.shape[1]),
])
def test_each_effect_changes_the_crop_as_named(effect, check):
    crop = _bar()
    after = degrade_crop(crop, np.random.default_rng(3), effects=(effect,))
    assert after.dtype == np.uint8 and check(crop, after) and _components(after) == 1


def test_a_fragment_enters_the_box_and_main_object_erases_it():
    crop, neighbour = _bar(40), _bar(90, 9)
    for seed in range(20):  # a fragment enters with probability 0.5 at strength 1
        after = degrade_crop(crop, np.random.default_rng(seed), neighbour=neighbour, effects=("fragments",))
        if _components(after) == 2:
            break
    assert _components(after) == 2
    kept = main_object(after, 255)
    assert _components(kept) == 1 and (kept < 230).sum() == (crop < 230).sum()
    assert main_object(crop, 255) is crop  # a clean crop is left as it is


def test_normalise_contrast_stretches_only_pale_chromosomes():
    pale = degrade_crop(_bar(), np.random.default_rng(0), effects=("contrast",))
    dark = np.percentile(255.0 - normalise_contrast(pale, 255)[pale < 230], 95)
    assert dark == pytest.approx(200, abs=3)
    crop = _bar()
    crop[crop < 255] = 20  # darker than the level: unchanged
    assert (normalise_contrast(crop, 255) == crop).all()


def test_cleaning_restores_the_counts_of_a_degraded_cell(tmp_path):
    folder = write_cell_folder(tmp_path / "cell", {"21": 3})
    crops = {s: [load_crop(p) for p in ps] for s, ps in folder_crops(folder).items()}
    truth = {s: len(v) for s, v in crops.items()}
    degraded = degrade_cell(crops, np.random.default_rng(1), strength=0.5)
    assert {s: len(v) for s, v in degraded.items()} == truth

    def counts(cell, clean):
        prepared, background = prepare_crops(cell, clean=clean)
        return slot_counts(read_slots(arrange_karyogram(prepared, 416, background=background).image))

    assert counts(crops, False) == truth == counts(crops, True)
    assert counts(degraded, False) != truth  # neighbours' pieces read as extra chromosomes
    assert counts(degraded, True) == truth


def test_degraded_variants_keep_the_counts_and_label_only_the_built_abnormalities():
    from karyo.experiments.detection import degraded_variants
    from karyo.karyograms.karyotype import get
    from karyo.karyograms.synth import render_karyogram
    from karyo.models.detector import compact

    reading = read_slots(render_karyogram(get("normal_xy"), size=256, rng=np.random.default_rng(0)))
    variants = degraded_variants(reading, 256, np.random.default_rng(2), kinds=("extra", "del_terminal"))
    assert len(variants) == 3
    (normal, labels), *abnormal = variants
    assert not any(labels.values())
    assert {s: len(v) for s, v in normal.items()} == slot_counts(reading)
    assert all(any(lab.values()) for _, lab in abnormal)
    extra = next(r for r, lab in abnormal if sum(len(v) for v in r.values()) == 47)
    assert compact(reading).keys() == extra.keys()
