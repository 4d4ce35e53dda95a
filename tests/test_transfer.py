"""Two-step transfer on a small subset of the real cells: intermediate 24-class task, both arms,
splits by case, and the hand-over of the backbone weights."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from karyo.data.splits import split_by_case
from karyo.uncertainty.metrics import chromosome_metrics
from karyo.data.manifest import CHROMOSOME_LABELS, read_manifest
from karyo.data.splits import straddling_groups

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _cases(rows):
    return {r["group"] for r in rows}


def test_chromosome_metrics_macro_f1():
    # F1 of class 0: precision 1, recall 1/2 -> 2/3; class 1: precision 2/3, recall 1 -> 4/5.
    metrics = chromosome_metrics([0, 0, 1, 1], [0, 1, 1, 1])
    assert metrics["accuracy"] == pytest.approx(0.75)
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert metrics["per_class_f1"]["1"] == pytest.approx(2 / 3)
    assert metrics["per_class_f1"]["Y"] is None  # absent class: undefined, not counted


def test_split_by_case_keeps_cases_whole():
    rng = np.random.default_rng(0)
    rows = []
    for case in range(20):
        labels = list(CHROMOSOME_LABELS[:22]) * 2 + (["X", "Y"] if case % 3 == 0 else ["X", "X"])
        rows += [{"path": f"{case}-{i}.png", "label": lab, "group": f"c{case}"}
                 for i, lab in enumerate(rng.permutation(labels))]
    parts = split_by_case(rows, seed=1)
    assert set(parts) == {"train", "val", "test"}
    assert straddling_groups(rows, parts) == []
    y_parts = {p for r, p in zip(rows, parts) if r["label"] == "Y"}
    assert y_parts == {"train", "val", "test"}  # stratified by sex: Y reaches every part


@pytest.fixture(scope="module")
def small_real(tmp_path_factory):
    """Assembled G-band karyograms and G-band / Q-band chromosome crops of a few real cells."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    from karyo.karyograms.assemble import assemble_cells, chromosome_manifest

    tmp = tmp_path_factory.mktemp("real")
    gband = SHARED_DATA / "gband612"
    with open(gband / "cells.csv", newline="") as fh:
        cells = list(csv.DictReader(fh))
    abnormal_cases, normal_cases, chosen = [], [], []
    for cell in cells:  # every abnormal cell of 4 abnormal cases, one cell of 12 normal cases
        case = cell["case"]
        if cell["label"] == "abnormal" and (case in abnormal_cases or len(abnormal_cases) < 4):
            abnormal_cases += [case] if case not in abnormal_cases else []
            chosen.append(cell["cell"])
        elif cell["label"] == "normal" and case not in normal_cases and len(normal_cases) < 12:
            normal_cases.append(case)
            chosen.append(cell["cell"])
    karyograms = assemble_cells(gband, tmp / "kary", size=64, cells=chosen, progress=False)
    chromosomes = chromosome_manifest(gband, tmp / "chrom", size=32, cells=chosen, progress=False)
    qband = assemble_cells(SHARED_DATA / "bioimlab_qband", tmp / "qkary", size=64, cells=5,
                           progress=False)
    return {"karyograms": karyograms, "chromosomes": chromosomes, "qband": qband, "tmp": tmp}


@pytest.fixture(scope="module")
def two_step_run(small_real):
    from karyo.cli import main

    out = small_real["tmp"] / "transfer"
    # Through the command line, as a user runs it.
    assert main(["transfer", "--intermediate", str(small_real["chromosomes"]),
                 "--target", str(small_real["karyograms"]), "--out", str(out),
                 "--experiment", "vgg16_original", "--weights", "none", "--intermediate-size", "32",
                 "--image-size", "32", "--epochs", "1", "--mc", "5", "--intermediate-epochs", "1",
                 "--seed", "0"]) == 0
    return out


@pytest.mark.slow
def test_two_step_runs_and_reports(two_step_run):
    comparison = json.loads((two_step_run / "comparison.json").read_text())
    inter = json.loads((two_step_run / "intermediate" / "metrics.json").read_text())
    assert 0.0 <= inter["macro_f1"] <= 1.0
    assert comparison["intermediate"]["macro_f1"] == inter["macro_f1"]
    assert set(inter["per_class_f1"]) == set(CHROMOSOME_LABELS)
    assert (two_step_run / "intermediate" / "confusion_matrix.png").stat().st_size > 0
    for arm in ("one_step", "two_step"):
        metrics = json.loads((two_step_run / arm / "metrics.json").read_text())
        assert 0.0 <= metrics["auc"] <= 1.0 and 0.0 <= metrics["referral_rate"] <= 1.0
        assert comparison[arm]["recall"] == metrics["recall"]
    assert comparison["two_step"]["weights_used"] == "file"
    assert "Macro-F1" in (two_step_run / "comparison.md").read_text()


@pytest.mark.slow
def test_splits_are_by_case_and_identical_for_both_arms(two_step_run, small_real):
    splits = {}
    for arm in ("one_step", "two_step"):
        rows = read_manifest(two_step_run / arm / "split.csv").rows
        assert straddling_groups(rows, [r["split"] for r in rows]) == []
        splits[arm] = [(r["path"], r["split"]) for r in rows]
    assert splits["one_step"] == splits["two_step"]
    # The intermediate task drew on the same patients: none of the target's val/test cases.
    target = read_manifest(two_step_run / "one_step" / "split.csv").rows
    held_out = {r["group"] for r in target if r["split"] != "train"}
    inter = read_manifest(two_step_run / "intermediate" / "split.csv").rows
    assert held_out and not held_out & _cases(inter)
    assert straddling_groups(inter, [r["split"] for r in inter]) == []


@pytest.mark.slow
def test_hand_over_copies_the_intermediate_backbone(two_step_run):
    from karyo.models.saving import load_model

    def first_kernel(run):
        model = load_model(two_step_run / run / "model.keras")
        return model.get_layer("backbone").get_layer("block1_conv1").get_weights()[0]

    inter, two, one = (first_kernel(r) for r in ("intermediate", "two_step", "one_step"))
    np.testing.assert_array_equal(two, inter)
    # The intermediate task fine-tuned the whole backbone, so it left the starting weights.
    assert not np.allclose(inter, one)


@pytest.mark.slow
def test_cross_stain_on_qband(two_step_run, small_real):
    from karyo.experiments.transfer import cross_stain

    result = cross_stain(two_step_run / "two_step", small_real["qband"], passes=5)
    assert result["n"] == result["n_normal"] == 5 and result["n_abnormal"] == 0
    assert 0.0 <= result["false_positive_rate"] <= 1.0
    assert 0.0 <= result["referral_rate"] <= 1.0
    assert "recall" not in result
