"""The karyotype detector: slot reading, abnormal karyograms from crops, the MC Dropout slot head."""

import csv

import numpy as np
import pytest

from karyo.karyograms.abnormal_cells import KINDS, make_abnormal, slot_labels, split_cells
from karyo.errors import KaryoError
from karyo.karyograms.karyotype import counts, get
from karyo.karyograms.layout import SLOTS, arrange_karyogram
from karyo.karyograms.slots import count_deviations, read_slots, slot_counts
from karyo.karyograms.synth import render_karyogram


@pytest.mark.parametrize("name", ["normal_xy", "trisomy21_xx", "monosomyX", "klinefelter"])
def test_read_slots_counts_rendered_karyograms(name):
    image = render_karyogram(get(name), size=160, rng=np.random.default_rng(3))
    assert slot_counts(read_slots(image)) == counts(get(name))


def test_read_slots_reads_q_band_polarity():
    image = render_karyogram(get("trisomy18_xy"), size=160, rng=np.random.default_rng(1), stain="q")
    readings = read_slots(image)
    assert slot_counts(readings) == counts(get("trisomy18_xy"))
    chromosome = readings[0].chromosomes[0]
    # polarity normalised: the crop is dark on white whatever the stain
    assert chromosome.crop[chromosome.mask].mean() < chromosome.crop[~chromosome.mask].mean()
    assert chromosome.length > chromosome.width > 0 and chromosome.profile.max() > 0


def test_read_slots_keeps_lengths_in_order():
    readings = read_slots(render_karyogram(get("normal_xx"), size=256, rng=np.random.default_rng(0)))
    length = {r.slot: np.mean([c.length for c in r.chromosomes]) for r in readings if r.chromosomes}
    assert length["1"] > length["10"] > length["21"]


def test_sex_is_read_from_the_y_slot():
    normal_xy = counts(get("normal_xy"))
    assert not any(count_deviations(normal_xy).values())
    assert count_deviations(counts(get("monosomyX")))["X"] == -1
    assert count_deviations(counts(get("klinefelter")))["X"] == 1
    assert count_deviations(counts(get("xyy")))["Y"] == 1


def test_read_slots_bad_file_is_one_line(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(KaryoError) as info:
        read_slots(bad)
    assert "broken.png" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(KaryoError, match="not a square"):
        read_slots(np.full((100, 120), 255, np.uint8))


def _banded(rng, h, w=7):
    """A vertical crop with random bands, dark on white."""
    bands = rng.integers(40, 200, size=h // 4 + 1).repeat(4)[:h]
    crop = np.full((h, w + 2), 255, np.uint8)
    crop[:, 1:-1] = bands[:, None]
    return crop


def _cell(rng, sex="XX"):
    lengths = {s: int(70 - 2.2 * i) for i, s in enumerate(SLOTS[:22])}
    lengths.update({"X": 52, "Y": 20})
    crops = {s: [_banded(rng, lengths[s]) for _ in range(2)] for s in SLOTS[:22]}
    crops["X"] = [_banded(rng, 52) for _ in range(2 if sex == "XX" else 1)]
    crops["Y"] = [] if sex == "XX" else [_banded(rng, 20)]
    return crops


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sex", ["XX", "XY"])
def test_each_abnormality_lies_in_its_labelled_slots(kind, sex):
    rng = np.random.default_rng(11)
    crops = _cell(rng, sex)
    changed, labels = make_abnormal(crops, kind, np.random.default_rng(5))
    differs = {s for s in SLOTS if len(changed[s]) != len(crops[s])
               or any(a.shape != b.shape or (a != b).any() for a, b in zip(changed[s], crops[s]))}
    assert differs and {s for s, v in labels.items() if v} == differs
    assert slot_labels({s: len(crops[s]) for s in SLOTS}) == {s: 0 for s in SLOTS}
    # laid out and read back, the count changes show in the labelled slots and nowhere else
    image = arrange_karyogram(changed, size=320).image
    read = slot_counts(read_slots(image))
    assert read == {s: len(changed[s]) for s in SLOTS}
    assert {s for s, d in count_deviations(read).items() if d} <= differs


def test_split_cells_keeps_each_case_in_one_part():
    rows = [{"cell": f"c{i}", "label": "abnormal" if (i // 3) % 4 == 0 else "normal", "group": f"case{i // 3}"}
            for i in range(60)]
    parts = split_cells(rows, seed=1)
    case_of = {r["cell"]: r["group"] for r in rows}
    seen = {}
    for part, cells in parts.items():
        for cell in cells:
            assert seen.setdefault(case_of[cell], part) == part
    assert sorted(sum(parts.values(), [])) == sorted(r["cell"] for r in rows)


@pytest.fixture(scope="module")
def tiny_detector():
    from karyo.models.detector import compact, fit_detector

    readings, labels = [], []
    names = ["normal_xx", "normal_xy"] * 3 + ["trisomy21_xy", "trisomy13_xx", "monosomyX", "klinefelter"]
    for i, name in enumerate(names):
        image = render_karyogram(get(name), size=128, rng=np.random.default_rng(i))
        readings.append(compact(read_slots(image)))
        labels.append(slot_labels(counts(get(name))))
    return fit_detector(readings, labels, epochs=3, batch_size=64, seed=0)


def test_detector_predicts_with_an_empty_slot_and_reloads(tiny_detector, tmp_path):
    from karyo.models.detector import load_detector, predict_karyograms, save_detector

    rng = np.random.default_rng(0)
    crops = _cell(rng)
    crops["5"] = []  # a karyogram whose slot 5 is empty
    path = tmp_path / "empty5.png"
    import cv2

    cv2.imwrite(str(path), arrange_karyogram(crops, size=128).image)
    out = tmp_path / "run" / "predictions.csv"
    rows, slots = predict_karyograms(tiny_detector, [path], ["abnormal"], out=out, T=20, seed=4)
    assert slots.shape == (1, 24) and 0 <= rows[0]["mean_prob"] <= 1 and rows[0]["pred_label"]
    header = out.read_text().splitlines()[0].split(",")
    assert header[:9] == ["path", "label", "pred_label", "confidence", "mean_prob", "std_prob",
                          "entropy", "mutual_info", "refer"]
    with open(out.with_name("slot_probabilities.csv")) as fh:
        slot_rows = list(csv.DictReader(fh))
    assert len(slot_rows) == 1 and set(slot_rows[0]) == {"path"} | {f"p_{s}" for s in SLOTS}
    assert "5:0" in rows[0]["count_deviations"]
    save_detector(tiny_detector, tmp_path / "saved")
    again, _ = predict_karyograms(load_detector(tmp_path / "saved"), [path], T=20, seed=4)
    assert again[0]["mean_prob"] == pytest.approx(rows[0]["mean_prob"], abs=1e-6)


def test_load_detector_refuses_a_folder_without_one(tmp_path):
    from karyo.models.detector import load_detector

    with pytest.raises(KaryoError, match="detector.json"):
        load_detector(tmp_path)


@pytest.mark.realdata
def test_read_slots_counts_real_assembled_cells(shared_data):
    from karyo.karyograms.assemble import assemble_cell, cell_crops, read_cells

    cells_dir = shared_data / "gband612"
    rows = [r for r in read_cells(cells_dir) if r["label"] in ("normal", "abnormal")][:: 60]
    for row in rows:
        image, _, _ = assemble_cell(cells_dir, row["cell"], 416)
        expected = {s: len(v) for s, v in cell_crops(cells_dir, row["cell"]).items()}
        assert slot_counts(read_slots(image)) == expected, row["cell"]


def test_calibrated_decision_flags_the_requested_share_of_normals(tiny_detector):
    from karyo.models.detector import calibrate_decision, compact, predict_passes

    normals = [compact(read_slots(render_karyogram(get(n), size=128, rng=np.random.default_rng(20 + i))))
               for i, n in enumerate(["normal_xx", "normal_xy"] * 5)]
    before = tiny_detector.decision
    try:
        decision = calibrate_decision(tiny_detector, normals, fpr=0.1, T=20, seed=0)
        _, probs = predict_passes(tiny_detector, normals, T=20, seed=0)
        assert 0.5 <= decision < 1 and (probs.mean(axis=0) > decision).mean() <= 0.1
    finally:
        tiny_detector.decision = before


@pytest.mark.slow
def test_karyotype_detector_trains_predicts_and_evaluates_by_name(tmp_path, capsys):
    """The registered experiment end to end through the CLI, on rendered karyograms split by group."""
    import json

    from karyo.cli import main

    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--normal", "14", "--abnormal", "10", "--size", "128",
                 "--seed", "4"]) == 0
    run = tmp_path / "run"
    assert main(["train", "karyotype_detector", "--data", str(data / "manifest.csv"), "--out", str(run),
                 "--epochs", "2", "--mc", "10"]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["kind"] == "detector" and config["data"]["protocol"] == "grouped"
    split = list(csv.DictReader(open(run / "split.csv")))
    groups = {p: {r["group"] for r in split if r["split"] == p} for p in ("train", "val", "test")}
    assert not (groups["train"] & groups["test"]) and not (groups["val"] & groups["test"])
    predictions = list(csv.DictReader(open(run / "predictions.csv")))
    assert len(predictions) == sum(r["split"] == "test" for r in split)
    assert {"path", "label", "pred_label", "confidence", "mean_prob", "refer"} <= set(predictions[0])
    slots = list(csv.DictReader(open(run / "slot_probabilities.csv")))
    assert len(slots) == len(predictions) and len(slots[0]) == 1 + 24
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"accuracy", "auc", "recall", "referral_rate"} <= set(metrics) and metrics["mc_passes"] == 10
    # karyo evaluate rewrites the same predictions; karyo predict names and skips a bad file.
    before = (run / "predictions.csv").read_bytes()
    assert main(["evaluate", str(run), "--mc", "10", "--by-group"]) == 0
    assert (run / "predictions.csv").read_bytes() == before
    cases = json.loads((run / "metrics_by_group.json").read_text())
    assert cases["n_cases"] == len(groups["test"]) and cases["n_cells"] == len(predictions)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 20)
    first = data / split[0]["path"]
    capsys.readouterr()
    code = main(["predict", "--model", str(run), str(first), str(bad), "--mc", "10",
                 "--out", str(tmp_path / "new.csv")])
    err = capsys.readouterr().err
    assert code == 1 and "bad.png" in err
    assert len(list(csv.DictReader(open(tmp_path / "new.csv")))) == 1
    # Under the thesis protocol the detector refuses to train: one line, no run folder.
    assert main(["train", "karyotype_detector", "--data", str(data / "manifest.csv"), "--out",
                 str(tmp_path / "thesis"), "--split", "thesis"]) == 2
    assert not (tmp_path / "thesis").exists()
