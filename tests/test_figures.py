"""Every figure function writes one PNG that decodes at the size it promises."""

import csv

import cv2
import numpy as np
import pytest

from karyo.experiments import figures
from karyo.errors import KaryoError
from karyo.uncertainty.confidence import summarize_passes


def decoded(path, figsize):
    """Decode a written PNG and check its size is figsize x DPI; return the pixels."""
    assert path.is_file() and path.stat().st_size > 0
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, f"{path} does not decode"
    width, height = (round(side * figures.DPI) for side in figsize)
    assert image.shape == (height, width, 3)
    # A blank canvas would mean nothing was drawn.
    assert image.std() > 10
    # Nothing half-written is left beside the figure.
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []
    return image


@pytest.fixture(scope="module")
def mc():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 60)
    logit = (2 * labels - 1) * rng.normal(2, 1.5, 60)
    passes = 1 / (1 + np.exp(-(logit + rng.normal(0, 1.2, (40, 60)))))
    summary = summarize_passes(passes)
    return labels, summary, summary["pred"] == labels


def test_training_curves_from_keras_csv(tmp_path):
    # A CSVLogger file with Keras' numbered metric names and no recall column.
    history = tmp_path / "history.csv"
    with open(history, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["epoch", "auc_1", "loss", "precision_1", "val_auc_1", "val_loss",
                         "val_precision_1"])
        for epoch in range(6):
            writer.writerow([epoch, 0.6 + epoch * 0.05, 1 / (epoch + 1), 0.5 + epoch * 0.08,
                             0.55 + epoch * 0.05, 1.2 / (epoch + 1), 0.45 + epoch * 0.07])
    out = figures.plot_training_curves(history, tmp_path / "figs" / "training.png")
    decoded(out, (8.8, 6.4))


def test_training_curves_from_history_dict_and_bad_input(tmp_path):
    history = {"loss": [0.9, 0.5, 0.3], "val_loss": [1.0, 0.7, 0.6], "auc": [0.7, 0.8, 0.9],
               "recall": [0.5, 0.6, 0.8], "precision": [0.6, 0.7, 0.8]}
    decoded(figures.plot_training_curves(history, tmp_path / "t.png"), (8.8, 6.4))
    with pytest.raises(KaryoError, match="not found"):
        figures.plot_training_curves(tmp_path / "none.csv", tmp_path / "x.png")
    empty = tmp_path / "empty.csv"
    empty.write_text("epoch,loss\n")
    with pytest.raises(KaryoError, match="empty"):
        figures.plot_training_curves(empty, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_confusion_matrix_binary_and_many_classes(tmp_path, mc):
    labels, summary, _ = mc
    first = decoded(figures.plot_confusion_matrix(labels, summary["pred"], tmp_path / "cm.png"),
                    (5.8, 4.8))
    names = [str(k) for k in range(1, 23)] + ["X", "Y"]
    rng = np.random.default_rng(1)
    decoded(figures.plot_confusion_matrix(rng.integers(0, 24, 100), rng.integers(0, 24, 100),
                                          tmp_path / "cm24.png", class_names=names),
            (0.38 * 24 + 3.5, 0.38 * 24 + 2.5))
    # Labels given as names draw the same counts as indices; other counts draw another image.
    as_names = [("normal", "abnormal")[k] for k in labels]
    same = decoded(figures.plot_confusion_matrix(as_names, summary["pred"], tmp_path / "cm2.png"),
                   (5.8, 4.8))
    np.testing.assert_array_equal(first, same)
    other = decoded(figures.plot_confusion_matrix(labels, 1 - summary["pred"], tmp_path / "cm3.png"),
                    (5.8, 4.8))
    assert not np.array_equal(first, other)


def test_roc_curves(tmp_path, mc):
    labels, summary, _ = mc
    curves = {"train": (labels, summary["mean_prob"]),
              "test": (labels[:20], summary["mean_prob"][:20]),
              "one class": ([1, 1, 1], [0.2, 0.5, 0.9])}
    decoded(figures.plot_roc_curves(curves, tmp_path / "roc.png", title="VGG16"), (5.6, 5.2))


def test_reliability_diagram(tmp_path, mc):
    labels, summary, _ = mc
    decoded(figures.plot_reliability_diagram(labels, summary["mean_prob"], tmp_path / "rel.png"),
            (5.6, 6.0))


def test_risk_coverage_and_confidence_histogram(tmp_path, mc):
    _, summary, correct = mc
    assert 0 < correct.mean() < 1 and summary["refer"].any()
    decoded(figures.plot_risk_coverage(summary["confidence"], correct, tmp_path / "rc.png"),
            figures.FIGSIZE)
    # A threshold that refers everything still draws.
    decoded(figures.plot_risk_coverage(summary["confidence"], correct, tmp_path / "rc1.png",
                                       threshold=1.01), figures.FIGSIZE)
    decoded(figures.plot_confidence_histogram(summary["confidence"], correct,
                                              tmp_path / "hist.png"), (6.4, 5.2))


def test_tuning_scatter(tmp_path):
    rng = np.random.default_rng(2)
    lr = 10 ** rng.uniform(-5, -1, 12)
    loss = list(np.abs(np.log10(lr) + 3) * 0.3 + rng.random(12) * 0.2)
    decoded(figures.plot_tuning_scatter(list(lr) + [1e-3], loss + [None], list(rng.random(13)),
                                        tmp_path / "lr.png", "Learning rate", log=True),
            figures.FIGSIZE)
    decoded(figures.plot_tuning_scatter([16, 32, 64, 128], [0.3, 0.35, 0.5, 0.7],
                                        [0.9, 0.88, 0.8, 0.6], tmp_path / "bs.png", "Batch size",
                                        log=True), figures.FIGSIZE)
    with pytest.raises(ValueError):
        figures.plot_tuning_scatter([1, 2], [0.1], [0.5, 0.6], tmp_path / "bad.png", "x")
