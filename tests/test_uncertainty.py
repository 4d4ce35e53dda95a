"""MC Dropout summaries on hand-made per-pass probabilities whose answers are known by hand."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from karyo.errors import KaryoError
from karyo.uncertainty.confidence import (
    PREDICTION_COLUMNS,
    predictions_table,
    read_predictions,
    summarize_passes,
    write_predictions,
)


def h2(p):
    """Binary entropy in nats, written out by hand."""
    return -sum(q * math.log(q) for q in (p, 1 - p) if q > 0)


# Columns are images, rows are the T = 4 passes.
PASSES = np.array([
    # sure abnormal, 2-2 tie, 3 of 4 normal, one pass sure each way
    [0.9, 0.9, 0.1, 0.0],
    [0.8, 0.6, 0.2, 1.0],
    [0.7, 0.2, 0.3, 0.0],
    [0.6, 0.1, 0.6, 1.0],
])


def test_binary_votes_labels_and_confidence_by_hand():
    s = summarize_passes(PASSES)
    assert s["votes_abnormal"].tolist() == [4, 2, 1, 2]
    # Ties (images 1 and 3) go to abnormal, even when the mean probability (0.45) is below 0.5.
    assert s["pred"].tolist() == [1, 1, 0, 1]
    assert s["votes"].tolist() == [4, 2, 3, 2]
    assert s["confidence"].tolist() == [1.0, 0.5, 0.75, 0.5]
    assert s["refer"].tolist() == [False, True, True, True]
    np.testing.assert_allclose(s["mean_prob"], [0.75, 0.45, 0.3, 0.5])
    np.testing.assert_allclose(s["std_prob"][0], math.sqrt((0.15**2 * 2 + 0.05**2 * 2) / 4))


def test_binary_entropy_and_mutual_information_by_hand():
    s = summarize_passes(PASSES)
    for i in range(PASSES.shape[1]):
        column = PASSES[:, i]
        entropy = h2(column.mean())
        expected_mi = entropy - np.mean([h2(p) for p in column])
        assert s["entropy"][i] == pytest.approx(entropy, abs=1e-12)
        assert s["mutual_info"][i] == pytest.approx(expected_mi, abs=1e-12)
    # Passes saying 0 and 1 in turn: all the uncertainty is the model's (BALD = ln 2).
    assert s["entropy"][3] == pytest.approx(math.log(2))
    assert s["mutual_info"][3] == pytest.approx(math.log(2))


def test_agreeing_passes_have_no_mutual_information():
    s = summarize_passes(np.full((7, 2), [0.7, 0.2]))
    np.testing.assert_allclose(s["mutual_info"], 0, atol=1e-15)
    assert s["entropy"] == pytest.approx([h2(0.7), h2(0.2)])
    assert s["std_prob"] == pytest.approx([0, 0], abs=1e-15)


def test_certain_passes_have_zero_entropy_without_a_warning():
    import warnings

    # 0 * log(0) is taken as its limit 0 (scipy's xlogy), not computed as 0 * -inf = nan.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        binary = summarize_passes(np.array([[0.0, 1.0], [0.0, 1.0]]))
        multi = summarize_passes(np.array([[[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]]]))
    assert binary["entropy"].tolist() == [0.0, 0.0] and binary["mutual_info"].tolist() == [0.0, 0.0]
    assert multi["entropy"][0] == pytest.approx(math.log(2)) and multi["mutual_info"][0] == pytest.approx(math.log(2))


def test_single_pass():
    s = summarize_passes([[0.3, 0.8, 0.5]])
    assert s["pred"].tolist() == [0, 1, 1]  # p = 0.5 votes abnormal: p >= decision
    assert s["confidence"].tolist() == [1.0, 1.0, 1.0]
    assert s["mutual_info"].tolist() == [0.0, 0.0, 0.0]
    assert s["std_prob"].tolist() == [0.0, 0.0, 0.0]
    assert not s["refer"].any()


def test_threshold_is_strict_and_decision_moves_votes():
    # 4 of 5 votes = exactly 0.8: kept (the thesis refers *below* 80 %); 7 of 10 is referred.
    five = np.array([[0.9], [0.9], [0.9], [0.9], [0.1]])
    assert not summarize_passes(five)["refer"][0]
    ten = np.array([[0.9]] * 7 + [[0.1]] * 3)
    assert summarize_passes(ten)["refer"][0]
    assert summarize_passes(ten, threshold=0.7)["refer"][0] == np.False_
    # With decision 0.95 every pass votes normal.
    strict = summarize_passes(ten, decision=0.95)
    assert strict["pred"][0] == 0 and strict["votes_abnormal"][0] == 0


def test_multiclass_by_hand():
    passes = np.array([
        # image 0: votes 2/1/0; image 1: three-way tie; image 2: a 0.5/0.5 pass votes class 0
        [[0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.6, 0.4, 0.0]],
        [[0.6, 0.3, 0.1], [0.2, 0.6, 0.2], [0.4, 0.6, 0.0]],
        [[0.2, 0.5, 0.3], [0.1, 0.3, 0.6], [0.5, 0.5, 0.0]],
    ])
    s = summarize_passes(passes)
    assert s["votes_per_class"].tolist() == [[2, 1, 0], [1, 1, 1], [2, 1, 0]]
    assert s["pred"][2] == 0
    np.testing.assert_allclose(s["mean_probs"][1], [0.8 / 3, 1.2 / 3, 1.0 / 3])
    # Image 1: the tie goes to the highest mean probability (class 1).
    assert s["pred"].tolist()[:2] == [0, 1]
    np.testing.assert_allclose(s["confidence"][:2], [2 / 3, 1 / 3])
    np.testing.assert_allclose(s["mean_prob"][:2], [0.5, 0.4])
    mean0 = passes[:, 0].mean(axis=0)
    entropy0 = -sum(p * math.log(p) for p in mean0)
    pass_entropy0 = np.mean([-sum(p * math.log(p) for p in q if p > 0) for q in passes[:, 0]])
    assert s["entropy"][0] == pytest.approx(entropy0)
    assert s["mutual_info"][0] == pytest.approx(entropy0 - pass_entropy0)
    assert s["refer"].tolist()[:2] == [True, True]


def test_multiclass_tie_with_equal_means_goes_to_lowest_index():
    s = summarize_passes([[[0.6, 0.4, 0.0]], [[0.4, 0.6, 0.0]]])
    assert s["votes_per_class"].tolist() == [[1, 1, 0]]
    assert s["pred"].tolist() == [0]
    assert s["confidence"].tolist() == [0.5]


@settings(max_examples=40, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(1, 12), st.integers(1, 6)),
              elements=st.floats(0, 1)))
def test_binary_invariants(probs):
    s = summarize_passes(probs)
    assert (s["confidence"] >= 0.5).all() and (s["confidence"] <= 1).all()
    np.testing.assert_array_equal(s["refer"], s["confidence"] < 0.8)
    assert (s["mutual_info"] >= 0).all()
    assert (s["mutual_info"] <= s["entropy"] + 1e-12).all()
    assert (s["entropy"] <= math.log(2) + 1e-12).all()
    np.testing.assert_array_equal(s["votes"], np.round(s["confidence"] * probs.shape[0]))
    # The same passes written as two-class softmax give the same entropy and BALD.
    two = summarize_passes(np.stack([1 - probs, probs], axis=-1))
    np.testing.assert_allclose(two["entropy"], s["entropy"], atol=1e-9)
    np.testing.assert_allclose(two["mutual_info"], s["mutual_info"], atol=1e-9)


@pytest.mark.parametrize("bad", [
    [0.2, 0.3],  # one dimension: ambiguous
    [[0.2, 1.3]],  # not a probability
    [[0.2, float("nan")]],
    np.zeros((0, 3)),  # no passes
    [[[0.5, 0.2, 0.1]]],  # multi-class rows that do not sum to 1 (logits?)
])
def test_rejects_what_is_not_passes_of_probabilities(bad):
    with pytest.raises(ValueError):
        summarize_passes(bad)


def test_predictions_table_columns_and_labels():
    s = summarize_passes(PASSES)
    rows = predictions_table(["a.png", "b.png", "c.png", "d.png"], [1, "normal", None, 0], s,
                             extra={"karyotype": ["47,XY,+21", "46,XX", "", "46,XY"]})
    assert list(rows[0])[:len(PREDICTION_COLUMNS)] == list(PREDICTION_COLUMNS)
    assert [r["label"] for r in rows] == ["abnormal", "normal", "", "normal"]
    assert [r["pred_label"] for r in rows] == ["abnormal", "abnormal", "normal", "abnormal"]
    assert rows[1]["votes"] == 2 and rows[1]["refer"] is True
    assert rows[0]["karyotype"] == "47,XY,+21"
    assert all(type(r["confidence"]) is float for r in rows)
    with pytest.raises(ValueError, match="3 labels"):
        predictions_table(["a", "b", "c", "d"], [0, 1, 0], s)


def test_predictions_csv_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    s = summarize_passes(rng.random((9, 5)))
    rows = predictions_table([f"img{i}.png" for i in range(5)], rng.integers(0, 2, 5), s,
                             extra={"karyotype": ["46,XX"] * 5})
    out = write_predictions(tmp_path / "run" / "predictions.csv", rows)
    header = out.read_text().splitlines()[0].split(",")
    assert header == list(PREDICTION_COLUMNS) + ["votes", "karyotype"]
    back = read_predictions(out)
    assert back == rows  # floats at full precision, bools and ints typed again
    assert [p.name for p in out.parent.iterdir()] == ["predictions.csv"]


def test_read_predictions_names_file_line_and_column(tmp_path):
    with pytest.raises(KaryoError, match="not found"):
        read_predictions(tmp_path / "missing.csv")
    partial = tmp_path / "partial.csv"
    partial.write_text("path,label,pred_label,confidence\nx.png,normal,normal,1.0\n")
    with pytest.raises(KaryoError, match="missing column.*mean_prob"):
        read_predictions(partial)
    bad = tmp_path / "bad.csv"
    bad.write_text(",".join(PREDICTION_COLUMNS) + "\n"
                   "x.png,normal,normal,1.0,0.1,0.0,0.3,0.0,False\n"
                   "y.png,normal,normal,1.0,0.1,0.0,0.3,0.0,maybe\n")
    with pytest.raises(KaryoError, match=r"bad.csv: line 3: column 'refer'"):
        read_predictions(bad)
