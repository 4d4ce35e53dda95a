"""The karyotype detector's explanations, crop folders as input, and case-level calls."""

import csv
import json

import cv2
import numpy as np
import pytest

from karyo.karyograms.karyotype import counts, get
from karyo.karyograms.abnormal_cells import slot_labels
from karyo.karyograms.assemble import folder_crops, load_crop
from karyo.karyograms.degrade import degrade_cell
from karyo.karyograms.layout import SLOTS, WHITE, arrange_karyogram
from karyo.karyograms.slots import read_slots
from karyo.karyograms.synth import render_karyogram
from karyo.models.detector import compact, fit_references, karyogram_features
from karyo.models.explain import slot_reasons
from tests.common import write_cell_folder


def _reading(name, seed, size=160):
    return compact(read_slots(render_karyogram(get(name), size=size, rng=np.random.default_rng(seed))))


@pytest.fixture(scope="module")
def references():
    return fit_references([_reading(n, i) for i, n in enumerate(["normal_xx", "normal_xy"] * 4)])


def test_slot_reasons_name_the_extra_chromosome_and_its_count(references):
    reading = _reading("trisomy21_xy", 50)
    probs = np.full(24, 0.05)
    probs[20], probs[4] = 0.9, 0.3  # slot 21 most probable; slot 5 below the default 0.5
    reasons = slot_reasons(karyogram_features(reading, references), probs, reading)
    assert len(reasons) == 1 and reasons[0].startswith("slot 21: 3 chromosomes (expected 2)")
    # a normal karyogram's slots carry no count reason, whatever the probabilities say
    normal = _reading("normal_xy", 51)
    words = slot_reasons(karyogram_features(normal, references), probs, normal, top=24, top_always=True)
    assert len(words) == 24 and not any("expected" in w for w in words)


def test_slot_reasons_quote_the_homologue_length_ratio(references):
    cell = read_slots(render_karyogram(get("normal_xx"), size=160, rng=np.random.default_rng(52)))
    crops = {r.slot: [c.crop for c in r.chromosomes] for r in cell}
    nine = crops["9"][0]
    crops["9"][0] = nine[: int(0.6 * nine.shape[0])]  # a terminal deletion of 40 % of one chromosome 9
    reading = compact(read_slots(arrange_karyogram(crops, 160, background=WHITE).image))
    probs = np.zeros(24)
    probs[8] = 0.8
    (reason,) = slot_reasons(karyogram_features(reading, references), probs, reading)
    ratio = float(reason.split("homologs differ in length (ratio ")[1].split(")")[0])
    assert reason.startswith("slot 9: ") and 0.5 < ratio < 0.7


@pytest.fixture(scope="module")
def detector_run(tmp_path_factory):
    """A tiny fitted detector saved as a run folder (rendered 128 px karyograms, 3 epochs)."""
    from karyo.models.detector import fit_detector, save_detector

    readings, labels = [], []
    names = ["normal_xx", "normal_xy"] * 3 + ["trisomy21_xy", "trisomy13_xx", "monosomyX", "klinefelter"]
    for i, name in enumerate(names):
        readings.append(_reading(name, i, size=128))
        labels.append(slot_labels(counts(get(name))))
    run = tmp_path_factory.mktemp("detector_run")
    save_detector(fit_detector(readings, labels, epochs=3, batch_size=64, seed=0), run)
    (run / "config.json").write_text(json.dumps({"kind": "detector", "experiment": {"image_size": 128},
                                                 "data": {"split_root": str(run)}}))
    return run


def test_predict_explain_draws_each_karyogram_and_writes_its_reasons(detector_run, tmp_path, capsys):
    from karyo.cli import main

    image = tmp_path / "in" / "tri21.png"
    image.parent.mkdir()
    cv2.imwrite(str(image), render_karyogram(get("trisomy21_xx"), size=128, rng=np.random.default_rng(9)))
    out = tmp_path / "out" / "predictions.csv"
    assert main(["predict", "--model", str(detector_run), str(image), "--mc", "10", "--out", str(out),
                 "--explain"]) == 0
    picture = cv2.imread(str(tmp_path / "out" / "explain" / "tri21.png"))
    assert picture is not None and picture.shape[0] > 400 and picture.std() > 10
    (row,) = csv.DictReader(open(tmp_path / "out" / "explanations.csv"))
    assert row["path"] == str(image) and row["picture"] == "explain/tri21.png"
    assert row["pred_label"] in ("normal", "abnormal") and 0 <= float(row["mean_prob"]) <= 1
    # the reasons are those of slot_reasons: whatever the tiny head ranks, each names a slot
    assert all(r.startswith("slot ") for r in row["reasons"].split(" | ") if r)
    assert (tmp_path / "out" / "slot_probabilities.csv").is_file()
    assert not list((tmp_path / "out").rglob(".partial-*"))


def test_predict_explain_with_a_thesis_cnn_run_says_why_in_one_line(tmp_path, capsys):
    from karyo.cli import main

    run = tmp_path / "cnn"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"experiment": {"image_size": 32}, "data": {"split_root": "."}}))
    image = tmp_path / "k.png"
    cv2.imwrite(str(image), np.full((64, 64), 255, np.uint8))
    capsys.readouterr()
    assert main(["predict", "--model", str(run), str(image), "--explain"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--explain" in err and "detector" in err
    assert not (tmp_path / "explain").exists()


def test_predict_scores_cell_folders_of_crops_and_names_bad_ones(detector_run, tmp_path, capsys):
    from karyo.cli import main

    cells = tmp_path / "cells"
    write_cell_folder(cells / "c1")
    write_cell_folder(cells / "c2", {"21": 3})
    (cells / "empty" / "5").mkdir(parents=True)  # a cell folder without a crop
    write_cell_folder(cells / "odd")
    (cells / "odd" / "notes").mkdir()  # a folder that is no chromosome class
    out = tmp_path / "p.csv"
    capsys.readouterr()
    assert main(["predict", "--model", str(detector_run), str(cells), "--mc", "10", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2
    assert "empty" in err[0] and "no crops" in err[0]
    assert "odd" in err[1] and "notes" in err[1] and "not a chromosome class folder" in err[1]
    rows = {r["path"].rsplit("/", 1)[-1]: r for r in csv.DictReader(open(out))}
    assert set(rows) == {"c1", "c2"}
    assert rows["c1"]["count_deviations"] == "" and rows["c2"]["count_deviations"] == "21:3"
    # one cell folder given directly is scored the same way, and so are raw crops of another lab, cleaned
    assert main(["predict", "--model", str(detector_run), str(cells / "c2"), "--mc", "10"]) == 0
    raw = tmp_path / "raw" / "c2"
    degraded = degrade_cell({s: [load_crop(p) for p in ps] for s, ps in folder_crops(cells / "c2").items()},
                            np.random.default_rng(1), strength=0.5)
    for slot, crops in degraded.items():
        for i, crop in enumerate(crops):
            (raw / str(SLOTS.index(slot) + 1)).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(raw / str(SLOTS.index(slot) + 1) / f"{i}.png"), crop)
    for flag, deviations in (([], lambda d: d != "21:3"), (["--clean-crops"], lambda d: d == "21:3")):
        assert main(["predict", "--model", str(detector_run), str(raw), "--mc", "10", "--out", str(out)] + flag) == 0
        (row,) = csv.DictReader(open(out))
        assert deviations(row["count_deviations"]), (flag, row["count_deviations"])


def _cell(group, pred, deviations="", refer=False, prob=None, label=None):
    prob = (0.9 if pred == "abnormal" else 0.1) if prob is None else prob
    return {"group": group, "label": label or ("abnormal" if deviations or pred == "abnormal" else "normal"),
            "pred_label": pred, "mean_prob": prob, "confidence": 0.95, "refer": refer,
            "count_deviations": deviations}


CASES = [
    _cell("trisomy", "abnormal", "21:3"), _cell("trisomy", "abnormal", "21:3"),
    _cell("one_loss", "abnormal", "20:1", label="normal"), _cell("one_loss", "normal"),
    _cell("single", "abnormal", "X:1"),
    _cell("structural", "abnormal"), _cell("structural", "normal", label="abnormal"),
    _cell("referred", "abnormal", "21:3", refer=True, prob=0.6, label="normal"), _cell("referred", "normal"),
    _cell("differ", "abnormal", "21:3", label="normal"), _cell("differ", "abnormal", "18:3", label="normal"),
    _cell("differ", "normal"),
]


def test_case_calls_need_a_repeat_or_a_structural_change():
    from karyo.experiments.cases import case_calls, case_metrics

    calls = {c["group"]: c for c in case_calls(CASES)}
    called = {g for g, c in calls.items() if c["pred_label"] == "abnormal"}
    # a count change in two cells, a single-cell case, a structural change: abnormal; one lost
    # chromosome, a referred cell, or two different changes: not
    assert called == {"trisomy", "single", "structural"}
    assert calls["trisomy"]["findings"] == "21:3x2" and calls["structural"]["findings"] == "structuralx1"
    assert calls["referred"]["refer"] and not calls["one_loss"]["refer"]
    assert calls["differ"]["score"] == pytest.approx(0.9) and calls["one_loss"]["score"] == pytest.approx(0.1)
    stricter = {c["group"] for c in case_calls(CASES, structural_cells=2, min_repeats=3)
                if c["pred_label"] == "abnormal"}
    assert stricter == {"trisomy", "single"}  # a 2-cell case needs both cells even with min_repeats=3
    metrics = case_metrics(case_calls(CASES))
    assert metrics["n_cases"] == 6 and metrics["abnormal_cases"] == 3
    assert metrics["recall"] == 1.0 and metrics["false_positive_rate"] == 0.0
    assert metrics["referral_rate"] == pytest.approx(1 / 6)


def test_evaluate_by_group_reads_cases_from_the_split_and_writes_beside_the_metrics(tmp_path):
    from karyo.atomic import write_csv
    from karyo.errors import KaryoError
    from karyo.experiments.cases import evaluate_by_group
    from karyo.uncertainty.confidence import write_predictions

    rows = [dict(r, path=f"images/{i}.png", std_prob=0.0, entropy=0.0, mutual_info=0.0, votes=10)
            for i, r in enumerate(CASES)]
    write_predictions(tmp_path / "predictions.csv", [{k: v for k, v in r.items() if k != "group"} for r in rows])
    write_csv(tmp_path / "split.csv", rows, ["path", "label", "group"])
    metrics = evaluate_by_group(tmp_path)
    saved = json.loads((tmp_path / "metrics_by_group.json").read_text())
    assert saved["recall"] == metrics["recall"] == 1.0 and saved["min_repeats"] == 2
    cases = list(csv.DictReader(open(tmp_path / "predictions_by_group.csv")))
    assert [c["group"] for c in cases] == ["trisomy", "one_loss", "single", "structural", "referred", "differ"]
    write_csv(tmp_path / "split.csv", rows[1:], ["path", "label", "group"])  # a cell without its case
    with pytest.raises(KaryoError, match="images/0.png"):
        evaluate_by_group(tmp_path)


def test_report_shows_a_gallery_of_confident_calls_and_referred_cells(tmp_path):
    from karyo.experiments.report import gallery_rows, write_report
    from karyo.uncertainty.confidence import write_predictions

    images = tmp_path / "data"
    images.mkdir()
    rows = []
    for i, (pred, prob, conf, refer) in enumerate([("abnormal", 0.99, 1.0, False), ("abnormal", 0.7, 0.9, False),
                                                   ("normal", 0.02, 1.0, False), ("normal", 0.3, 0.95, False),
                                                   ("abnormal", 0.55, 0.6, True), ("normal", 0.45, 0.7, True)]):
        name = f"k{i}.png"
        cv2.imwrite(str(images / name), render_karyogram(get("normal_xx"), size=96, rng=np.random.default_rng(i)))
        rows.append({"path": name, "label": "normal", "pred_label": pred, "confidence": conf, "mean_prob": prob,
                     "std_prob": 0.0, "entropy": 0.0, "mutual_info": 0.0, "refer": refer, "votes": 10})
    picks = gallery_rows(rows, n=3)
    assert [r["path"] for r in picks["confident calls"]] == ["k0.png", "k2.png", "k3.png"]
    assert [r["path"] for r in picks["referred cells"]] == ["k4.png", "k5.png"]
    run = tmp_path / "out" / "runs" / "grouped" / "karyotype_detector"
    run.mkdir(parents=True)
    write_predictions(run / "predictions.csv", rows)
    (run / "metrics.json").write_text(json.dumps({"accuracy": 0.5}))
    (run / "config.json").write_text(json.dumps({"kind": "detector", "data": {"root": str(images)}}))
    report = write_report(tmp_path / "out").read_text()
    figure = tmp_path / "out" / "figures" / "gallery_karyotype_detector_grouped.png"
    assert "Karyotype detector gallery" in report and figure.name in report
    assert cv2.imread(str(figure)).std() > 10
