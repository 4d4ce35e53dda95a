"""Metrics, calibration, referral and wrong-prediction tables against hand computations."""

import csv
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from karyo.errors import KaryoError
from karyo.uncertainty.metrics import (
    auc_statistic,
    metric_intervals,
    WRONG_COLUMNS,
    area_under_risk_coverage,
    compute_metrics,
    expected_calibration_error,
    metrics_from_predictions,
    per_group_recall,
    reliability_bins,
    risk_coverage,
    wrong_predictions,
    wrong_predictions_markdown,
    write_wrong_predictions,
)
from karyo.uncertainty.confidence import (
    predictions_table,
    read_predictions,
    summarize_passes,
    write_predictions,
)

# Ten test images: four abnormal (1), six normal (0).
LABELS = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
PRED = [1, 1, 1, 0, 1, 0, 0, 0, 0, 0]
PROB = [0.9, 0.8, 0.7, 0.4, 0.6, 0.3, 0.2, 0.1, 0.2, 0.05]
CONF = [1.0, 0.95, 0.9, 0.6, 0.7, 0.85, 1.0, 1.0, 1.0, 1.0]
REFER = [c < 0.8 for c in CONF]

SPEC_KEYS = ("accuracy precision recall auc f1 specificity g_mean mcc ece brier nll referral_rate "
             "retained_accuracy retained_recall aurc tp fp tn fn n n_referred").split()


def test_confusion_counts_and_rates_by_hand():
    m = compute_metrics(LABELS, PROB, PRED, CONF, REFER)
    assert set(SPEC_KEYS) <= set(m)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (3, 1, 1, 5)
    assert m["accuracy"] == pytest.approx(8 / 10)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(5 / 6)
    assert m["g_mean"] == pytest.approx(math.sqrt(3 / 4 * 5 / 6))
    assert m["f1"] == pytest.approx(3 / 4)
    assert m["mcc"] == pytest.approx((3 * 5 - 1 * 1) / math.sqrt(4 * 4 * 6 * 6))
    # AUC: of the 4 x 6 abnormal/normal pairs only (0.4, 0.6) is ordered wrongly.
    assert m["auc"] == pytest.approx(23 / 24)
    assert m["brier"] == pytest.approx(np.mean([(p - y) ** 2 for p, y in zip(PROB, LABELS)]))
    assert m["nll"] == pytest.approx(
        -np.mean([math.log(p if y else 1 - p) for p, y in zip(PROB, LABELS)]))


def test_referral_by_hand():
    m = compute_metrics(LABELS, PROB, PRED, CONF, REFER)
    # Referred: image 3 (a missed abnormal, confidence 0.6) and image 4 (a false alarm, 0.7).
    assert m["n_referred"] == 2 and m["n_retained"] == 8
    assert m["referral_rate"] == pytest.approx(0.2)
    assert m["retained_accuracy"] == 1.0
    assert m["retained_recall"] == 1.0
    json.dumps(m, allow_nan=False)
    assert all(v is None or type(v) in (int, float) for v in m.values())


def test_undefined_metrics():
    only_abnormal = compute_metrics([1, 1], [0.9, 0.2], [1, 0], [1.0, 0.5], [False, True])
    assert only_abnormal["auc"] is None
    assert only_abnormal["specificity"] == 0.0  # no normal images: zero_division=0
    everything_referred = compute_metrics([0, 1], [0.4, 0.6], [0, 1], [0.5, 0.5], [True, True])
    assert everything_referred["retained_accuracy"] is None
    assert everything_referred["retained_recall"] is None
    assert everything_referred["referral_rate"] == 1.0
    with pytest.raises(ValueError):
        compute_metrics([], [], [], [], [])
    with pytest.raises(ValueError):
        compute_metrics([0, 2], [0.1, 0.2], [0, 0], [1, 1], [False, False])


def test_ece_by_hand():
    # Top-label confidences 0.93 (right), 0.9 (wrong), 0.7 (right), 0.55 (wrong); 15 bins of
    # width 1/15: 0.93 and 0.9 share bin 13, 0.7 is in bin 10, 0.55 in bin 8.
    prob, labels = [0.93, 0.9, 0.3, 0.45], [1, 0, 0, 1]
    bins = reliability_bins(prob, labels)
    assert bins["count"].tolist() == [0] * 8 + [1, 0, 1, 0, 0, 2, 0]
    assert bins["accuracy"][13] == 0.5 and bins["confidence"][13] == pytest.approx(0.915)
    expected = 2 / 4 * abs(0.5 - 0.915) + 1 / 4 * abs(1 - 0.7) + 1 / 4 * abs(0 - 0.55)
    assert expected_calibration_error(prob, labels) == pytest.approx(expected)
    assert expected == pytest.approx(0.42)
    assert compute_metrics(labels, prob, [1, 1, 0, 0], [1, 1, 1, 1],
                           [False] * 4)["ece"] == pytest.approx(0.42)


def test_ece_of_perfectly_calibrated_bins_is_zero():
    # 10 images at 0.8 of which 8 are abnormal, 10 at 0.1 of which 1 is abnormal.
    prob = [0.8] * 10 + [0.1] * 10
    labels = [1] * 8 + [0] * 2 + [1] + [0] * 9
    assert expected_calibration_error(prob, labels) == pytest.approx(0, abs=1e-12)


def test_risk_coverage_by_hand():
    coverage, risk = risk_coverage([1, 1, 0.9, 0.5, 0.5], [1, 0, 1, 0, 1])
    np.testing.assert_allclose(coverage, [0.4, 0.6, 1.0])
    np.testing.assert_allclose(risk, [1 / 2, 1 / 3, 2 / 5])
    assert area_under_risk_coverage([1, 1, 0.9, 0.5, 0.5], [1, 0, 1, 0, 1]) == pytest.approx(
        0.4 * 1 / 2 + 0.2 * 1 / 3 + 0.4 * 2 / 5)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.booleans()), min_size=1, max_size=30,
                unique_by=lambda t: t[0]))
def test_aurc_with_distinct_confidences_is_mean_selective_risk(pairs):
    confidence = np.array([c for c, _ in pairs])
    correct = np.array([ok for _, ok in pairs])
    order = np.argsort(-confidence)
    wrong = ~correct[order]
    expected = np.mean([wrong[:k].mean() for k in range(1, len(pairs) + 1)])
    assert area_under_risk_coverage(confidence, correct) == pytest.approx(expected)


def test_metrics_from_written_predictions_equal_metrics_from_arrays(tmp_path):
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 2, 40)
    passes = np.clip(labels * 0.5 + rng.random((30, 40)) * 0.6, 0, 1)
    s = summarize_passes(passes)
    rows = predictions_table([f"k{i}.png" for i in range(40)], labels, s)
    back = read_predictions(write_predictions(tmp_path / "predictions.csv", rows))
    direct = compute_metrics(labels, s["mean_prob"], s["pred"], s["confidence"], s["refer"])
    assert metrics_from_predictions(back) == direct
    assert 0 < direct["referral_rate"] < 1  # the example exercises referral


def test_metrics_from_predictions_needs_labels():
    rows = [{"path": "x.png", "label": "", "pred_label": "normal", "mean_prob": 0.1,
             "confidence": 1.0, "refer": False}]
    with pytest.raises(KaryoError, match="x.png.*empty 'label'"):
        metrics_from_predictions(rows)


def _row(path, label, pred, karyotype, confidence=1.0, mean_prob=0.5):
    return {"path": path, "label": label, "pred_label": pred, "karyotype": karyotype,
            "confidence": confidence, "mean_prob": mean_prob, "refer": confidence < 0.8}


ROWS = [
    _row("a.png", "abnormal", "abnormal", "47,XY,+21", mean_prob=0.97),
    _row("b.png", "abnormal", "normal", "47,XY,+21", 0.6, 0.45),
    _row("c.png", "abnormal", "normal", "45,X", 1.0, 0.13),
    _row("d.png", "abnormal", "normal", "45,X", 0.9, 0.2),
    _row("e.png", "normal", "normal", "46,XX", mean_prob=0.02),
    _row("f.png", "normal", "abnormal", "46,XX", 0.99, 0.69),
    _row("g.png", "normal", "normal", "46,XX", mean_prob=0.01),
]


def test_per_group_recall_finds_the_missed_karyotype():
    table = per_group_recall(ROWS, "karyotype")
    assert [g["karyotype"] for g in table] == ["45,X", "47,XY,+21", "46,XX"]
    worst = table[0]
    assert (worst["n"], worst["n_correct"], worst["recall"]) == (2, 0, 0.0)
    assert worst["n_missed"] == 2  # both wrong and confident: nobody would look at them
    trisomy = table[1]
    assert trisomy["recall"] == 0.5 and trisomy["n_referred"] == 1 and trisomy["n_missed"] == 0
    assert table[2]["recall"] == pytest.approx(2 / 3) and table[2]["label"] == "normal"
    with pytest.raises(KaryoError, match="abnormality"):
        per_group_recall(ROWS, "abnormality")


def test_wrong_predictions_tables(tmp_path):
    wrong = wrong_predictions(ROWS + [_row("new.png", "", "normal", "")])
    assert [w["image"] for w in wrong] == ["b.png", "c.png", "d.png", "f.png"]
    assert wrong[3] == {"image": "f.png", "predicted_label": "abnormal",
                        "actual_label": "normal", "mean_softmax": 0.69,
                        "confidence_score": 0.99, "refer": False}
    text = wrong_predictions_markdown(ROWS, title="VGG16, 100 MC passes")
    lines = text.splitlines()
    assert lines[0] == "### VGG16, 100 MC passes"
    assert lines[2].startswith("| Image | Predicted label | Actual label | Mean softmax |")
    assert "| f.png | abnormal | normal | 0.690 | 99% | no |" in lines
    assert "| b.png | normal | abnormal | 0.450 | 60% | yes |" in lines
    assert len(lines) == 4 + len(wrong)
    assert "No wrongly predicted" in wrong_predictions_markdown(ROWS[:1])
    out = write_wrong_predictions(tmp_path / "wrong.csv", ROWS)
    with open(out, newline="") as fh:
        back = list(csv.DictReader(fh))
    assert tuple(back[0]) == WRONG_COLUMNS
    assert [r["image"] for r in back] == ["b.png", "c.png", "d.png", "f.png"]
    assert float(back[1]["mean_softmax"]) == 0.13


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.sampled_from([0.0, 0.2, 0.5, 0.7, 1.0])), min_size=2, max_size=40))
def test_rank_auc_equals_scikit_learn(pairs):
    from sklearn.metrics import roc_auc_score

    y = np.array([int(a) for a, _ in pairs])
    prob = np.array([p for _, p in pairs])
    if len(set(y.tolist())) < 2:
        assert math.isnan(auc_statistic(y, prob))
    else:
        assert auc_statistic(y, prob) == pytest.approx(roc_auc_score(y, prob))


def _prediction_rows(n_groups, copies, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for g in range(n_groups):
        label = "abnormal" if g % 3 == 0 else "normal"
        prob = float(rng.uniform(0.3, 1.0) if label == "abnormal" else rng.uniform(0.0, 0.7))
        for c in range(copies):
            rows.append({"path": f"g{g}_{c}.png", "group": f"g{g}", "label": label, "mean_prob": prob,
                         "pred_label": "abnormal" if prob > 0.5 else "normal", "confidence": 1.0, "refer": False})
    return rows


def test_bootstrap_draws_whole_groups():
    # Four identical copies per group carry no more evidence than one: resampled by group, the
    # intervals are those of the one-copy set; resampled per image they would be narrower.
    one = metric_intervals(_prediction_rows(24, 1), n_resamples=400)
    four = metric_intervals(_prediction_rows(24, 4), n_resamples=400)
    assert four["auc"] == pytest.approx(one["auc"]) and four["recall"] == pytest.approx(one["recall"])
    assert one["n_groups"] == four["n_groups"] == 24
    point = metrics_from_predictions(_prediction_rows(24, 1))
    low, high = one["auc"]
    assert low < point["auc"] < high and high - low > 0.05
    per_image = [dict(r, group=r["path"]) for r in _prediction_rows(24, 4)]
    narrow = metric_intervals(per_image, n_resamples=400)["auc"]
    assert narrow[1] - narrow[0] < high - low


def test_bootstrap_of_a_perfect_and_of_a_one_class_test_set():
    rows = [{"path": str(i), "label": lab, "pred_label": lab, "mean_prob": float(lab == "abnormal"),
             "confidence": 1.0, "refer": False} for i, lab in enumerate(["abnormal", "normal"] * 5)]
    ci = metric_intervals(rows, n_resamples=100)
    assert ci["auc"] == (1.0, 1.0) and ci["recall"] == (1.0, 1.0) and ci["n_groups"] == 10
    normal_only = [r for r in rows if r["label"] == "normal"]
    assert metric_intervals(normal_only, n_resamples=100)["auc"] == (None, None)
