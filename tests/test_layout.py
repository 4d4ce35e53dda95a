"""The karyogram layout: slot boxes, one global scale, numbers that never touch a chromosome."""

import itertools

import cv2
import numpy as np
import pytest

from karyo.errors import KaryoError
from karyo.karyograms.layout import (ROWS, SLOTS, arrange_karyogram, background_level, fit_scale, gap,
                                     number_boxes, slot_boxes)


def bar(height, width=8, level=60, background=255):
    """A crop: a solid bar of ``level`` with a one-pixel ``background`` border."""
    crop = np.full((height + 2, width + 2), background, np.uint8)
    crop[1:-1, 1:-1] = level
    return crop


def components(mask):
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    return int(sum(stats[i, cv2.CC_STAT_AREA] >= 2 for i in range(1, n)))


def overlap(a, b, margin=0):
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0]
                or a[3] + margin <= b[1] or b[3] + margin <= a[1])


@pytest.mark.parametrize("size", [64, 160, 416, 1000])
def test_slot_boxes_are_the_standard_rows_inside_the_canvas_and_apart(size):
    boxes, numbers = slot_boxes(size), number_boxes(size)
    assert list(boxes) == list(SLOTS) and len(SLOTS) == 24
    for box in boxes.values():
        x0, y0, x1, y1 = box
        assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
    for a, b in itertools.combinations(boxes.values(), 2):
        assert not overlap(a, b, margin=gap(size) - 1)
    # rows 1-5 / 6-12 / 13-18 / 19-22,X,Y: equal tops within a row, rows top to bottom
    tops = [{boxes[s][1] for s in row} for row in ROWS]
    assert all(len(t) == 1 for t in tops)
    assert [t.pop() for t in tops] == sorted(boxes[row[0]][1] for row in ROWS)
    for row in ROWS:
        xs = [boxes[s][0] for s in row]
        assert xs == sorted(xs)
    # the number band lies under its slot and inside no slot box
    for slot, nb in numbers.items():
        assert nb[1] >= boxes[slot][3] and nb[3] <= size
        assert not any(overlap(nb, box) for box in boxes.values())


def test_one_scale_keeps_relative_sizes_and_fills_the_limiting_slot():
    slots = {"1": [bar(100), bar(96)], "21": [bar(25), bar(25), bar(25)], "X": [bar(60)]}
    result = arrange_karyogram(slots, 416)
    heights = {s: [r[3] - r[1] for r in rects] for s, rects in result.rects.items() if rects}
    # relative sizes: 100 : 25 stays 4 : 1 (to a pixel of rounding)
    assert abs(heights["1"][0] / heights["21"][0] - 102 / 27) < 0.2
    assert abs(heights["X"][0] / heights["1"][0] - 62 / 102) < 0.02
    # the scale is the largest that fits: slot 1's tallest crop fills its box's height
    x0, y0, x1, y1 = slot_boxes(416)["1"]
    assert y1 - y0 - 1 <= heights["1"][0] <= y1 - y0
    assert result.scale == pytest.approx(fit_scale({s: [c.shape for c in v] for s, v in slots.items()}, 416))


def test_every_chromosome_stays_inside_its_slot_and_apart_from_its_neighbours():
    rng = np.random.default_rng(0)
    slots = {s: [bar(int(rng.integers(10, 80)), int(rng.integers(4, 20)))
                 for _ in range(int(rng.integers(1, 4)))] for s in SLOTS}
    result = arrange_karyogram(slots, 416)
    boxes = slot_boxes(416)
    for slot, rects in result.rects.items():
        assert len(rects) == len(slots[slot])
        for r in rects:
            assert boxes[slot][0] <= r[0] < r[2] <= boxes[slot][2]
            assert boxes[slot][1] <= r[1] < r[3] == boxes[slot][3]  # standing on the baseline
        for a, b in zip(rects, rects[1:]):
            assert b[0] - a[2] >= gap(416)


@pytest.mark.parametrize("background,level", [(255, 60), (0, 200)])
def test_the_image_shows_each_crop_once_and_numbers_only_in_their_bands(background, level):
    counts = {s: 1 + (i % 3) for i, s in enumerate(SLOTS)}
    slots = {s: [bar(20 + 3 * i, level=level, background=background) for i in range(n)]
             for s, n in counts.items()}
    image = arrange_karyogram(slots, 416, background=background).image
    assert image.shape == (416, 416, 3) and image.dtype == np.uint8
    gray = image[:, :, 0]
    ink = np.abs(gray.astype(int) - background) > 30
    boxes, numbers = slot_boxes(416), number_boxes(416)
    inside = np.zeros_like(ink)
    for slot, (x0, y0, x1, y1) in boxes.items():
        assert components(ink[y0:y1, x0:x1]) == counts[slot], slot
        inside[y0:y1, x0:x1] = True
    for slot, (x0, y0, x1, y1) in numbers.items():
        assert ink[y0:y1, x0:x1].any(), f"no number under slot {slot}"
        inside[y0:y1, x0:x1] = True
    assert not (ink & ~inside).any(), "ink outside the slot boxes and number bands"


def test_numbers_can_be_left_out_and_max_scale_caps_enlargement():
    result = arrange_karyogram({"1": [bar(10)]}, 416, numbers=False, max_scale=1.0)
    assert result.scale == 1.0
    gray = result.image[:, :, 0]
    assert (gray < 200).sum() == 10 * 8


def test_empty_slots_are_allowed():
    result = arrange_karyogram({"Y": []}, 128)
    assert result.rects["Y"] == [] and result.image.shape == (128, 128, 3)


def test_bad_input_is_a_clear_error():
    with pytest.raises(KaryoError, match="too small"):
        slot_boxes(32)
    with pytest.raises(KaryoError, match="unknown slot '25'"):
        arrange_karyogram({"25": [bar(10)]}, 416)
    with pytest.raises(KaryoError, match="2-D uint8"):
        arrange_karyogram({"1": [np.zeros((5, 5, 3), np.uint8)]}, 416)


def test_background_level_reads_the_border():
    assert background_level(bar(30)) == 255
    assert background_level(bar(30, level=220, background=0)) == 0


def test_the_compact_layout_keeps_the_slots_and_draws_larger_chromosomes(tmp_path):
    import csv

    from karyo.karyograms.karyotype import get
    from karyo.karyograms.layout import get_layout, number_boxes
    from karyo.karyograms.synth import render_karyogram, synthesize

    for size in (64, 128, 416):
        standard, compact = slot_boxes(size), slot_boxes(size, "compact")
        assert list(standard) == list(compact)  # same slots, same order
        boxes = list(compact.values())
        for i, (x0, y0, x1, y1) in enumerate(boxes):
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
            for u0, v0, u1, v1 in boxes[i + 1:]:
                assert x1 <= u0 or u1 <= x0 or y1 <= v0 or v1 <= y0  # no two boxes overlap
        # Less paper: every slot is at least as tall, and slot 1 clearly taller.
        assert all(compact[s][3] - compact[s][1] >= standard[s][3] - standard[s][1] for s in standard)
        assert compact["1"][3] - compact["1"][1] >= 1.15 * (standard["1"][3] - standard["1"][1])
    assert number_boxes(128, "compact") == {}
    with pytest.raises(KaryoError, match="unknown karyogram layout 'tight'"):
        get_layout("tight")

    rng = np.random.default_rng
    a = render_karyogram(get("normal_xy"), 128, rng(0))
    b = render_karyogram(get("normal_xy"), 128, rng(0), layout="compact")
    assert (b < 200).sum() > 1.1 * (a < 200).sum()  # the same cell, drawn larger

    manifest = synthesize(tmp_path / "c", normal=1, abnormal=1, size=64, layout="compact", progress=False)
    rows = list(csv.DictReader(open(manifest)))
    assert [r["layout"] for r in rows] == ["compact", "compact"]
    plain = synthesize(tmp_path / "s", normal=1, abnormal=1, size=64, progress=False)
    assert "layout" not in open(plain).readline()


def test_per_pair_augmentation_follows_the_manifests_layout():
    from karyo.experiments.training import manifest_layout

    assert manifest_layout([{"path": "a"}, {"path": "b", "layout": ""}]) == "standard"
    assert manifest_layout([{"layout": "compact"}]) == "compact"
    with pytest.raises(KaryoError, match="mixes karyogram layouts"):
        manifest_layout([{"layout": "compact"}, {"path": "b"}])
