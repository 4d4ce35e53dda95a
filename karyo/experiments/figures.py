"""The thesis' figures and the uncertainty figures, one PNG per function.

Chapter 4 shows, for every experiment, the training metrics (Fig. 4.1: loss, AUC, precision,
recall; train vs validation), the test confusion matrix (Fig. 4.2: x predicted, y actual,
abnormal = positive) and ROC curves (Fig. 4.3, several overlaid in Fig. 4.19); chapter 3 the
hyperparameter search (Figs. 3.3 / 3.4: the hyperparameter vs validation loss, coloured by
validation accuracy). Beyond the thesis: a reliability diagram, the risk-coverage (referral)
curve and confidence histograms of correct vs wrong predictions, and the karyotype detector's
explanation (a karyogram with its slots coloured by P(slot abnormal)).

Figures are drawn on :class:`matplotlib.figure.Figure` objects, never through ``pyplot``: no
global state, no backend switch, safe in notebooks and threads; PNGs are rendered by the Agg
canvas. Each function writes one PNG atomically and returns its path.
"""

import csv
import math
import re
from pathlib import Path

import numpy as np

from karyo.atomic import atomic_path
from karyo.errors import KaryoError
from karyo.karyograms.layout import SLOTS, slot_boxes
from karyo.uncertainty.metrics import expected_calibration_error, reliability_bins, risk_coverage as curve

#: Resolution of every figure (small files, readable text).
DPI = 110
#: Default figure size in inches (704 x 528 pixels at :data:`DPI`).
FIGSIZE = (6.4, 4.8)
#: The thesis' four training metrics (Fig. 4.1), in panel order.
TRAINING_METRICS = ("loss", "auc", "precision", "recall")
_TRAIN_COLOR, _VAL_COLOR = "tab:blue", "tab:orange"
_CORRECT_COLOR, _WRONG_COLOR = "tab:green", "tab:red"


def _figure(figsize=FIGSIZE, **subplots):
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    return fig, fig.subplots(**subplots)


def _null_locator():
    from matplotlib.ticker import NullLocator

    return NullLocator()


def _save(fig, out):
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return out


def _read_history(source):
    """A training history as ``{column: list of floats}`` from a dict or a CSVLogger file."""
    if isinstance(source, dict):
        history = {k: [float(v) for v in values] for k, values in source.items()}
        name = "history"
    else:
        name = Path(source)
        if not name.is_file():
            raise KaryoError(f"{name}: training history not found")
        with open(name, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        history = {}
        try:
            for row in rows:
                for key, value in row.items():
                    # karyo's history.csv names each epoch's phase (head / fine_tune): not a metric.
                    if key and key != "phase":
                        history.setdefault(key, []).append(float(value) if value else math.nan)
        except ValueError as exc:
            raise KaryoError(f"{name}: not a numeric training history ({exc})") from None
    if not history or not any(len(v) for v in history.values()):
        raise KaryoError(f"{name}: the training history is empty")
    return history


def _metric_key(history, metric):
    """The history key of a training metric: ``auc``, or Keras' numbered ``auc_1`` etc."""
    if metric in history:
        return metric
    pattern = re.compile(rf"{metric}(_\d+)?")
    return next((k for k in sorted(history) if pattern.fullmatch(k)), None)


def plot_training_curves(history_csv_or_dict, out, title="Training metrics"):
    """Loss, AUC, precision and recall per epoch, train vs validation, in a 2x2 grid (Fig. 4.1).

    Args:
        history_csv_or_dict: a Keras ``History.history`` dict or a ``history.csv`` written by
            ``keras.callbacks.CSVLogger`` (its 0-based ``epoch`` column is shown from 1).
        out: the PNG to write.
        title: the figure's title.

    Raises:
        KaryoError: the history file is missing, empty or not numeric.
    """
    history = _read_history(history_csv_or_dict)
    length = max(len(v) for v in history.values())
    epochs = (np.asarray(history["epoch"]) + 1 if "epoch" in history
              else np.arange(1, length + 1))
    fig, axes = _figure(figsize=(8.8, 6.4), nrows=2, ncols=2, sharex=True)
    for ax, metric in zip(axes.flat, TRAINING_METRICS):
        key = _metric_key(history, metric)
        label = "AUC" if metric == "auc" else metric.capitalize()
        ax.set_title(label)
        if key is None:
            ax.text(0.5, 0.5, f"{metric} not recorded", ha="center", va="center",
                    transform=ax.transAxes, color="gray")
            continue
        marker = "o" if length <= 30 else None
        ax.plot(epochs[:len(history[key])], history[key], color=_TRAIN_COLOR, marker=marker,
                markersize=3, label="train")
        if f"val_{key}" in history:
            ax.plot(epochs[:len(history[f"val_{key}"])], history[f"val_{key}"],
                    color=_VAL_COLOR, marker=marker, markersize=3, label="validation")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if metric != "loss":
            ax.set_ylim(-0.02, 1.02)
        ax.legend(loc="best", fontsize="small")
    for ax in axes[1]:
        ax.set_xlabel("Epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title)
    return _save(fig, out)


def _class_indices(values, class_names):
    values = list(values)
    index = {name: i for i, name in enumerate(class_names)}
    out = []
    for v in values:
        if isinstance(v, str):
            if v not in index:
                raise ValueError(f"unknown class {v!r} (classes: {', '.join(class_names)})")
            out.append(index[v])
        else:
            out.append(int(v))
    return np.asarray(out, dtype=np.int64)


def plot_confusion_matrix(labels, pred, out, class_names=("normal", "abnormal"),
                          title="Confusion matrix"):
    """Counts of actual (y axis) vs predicted (x axis) labels, annotated (Fig. 4.2).

    Args:
        labels, pred: true and predicted labels, as class indices or class names.
        out: the PNG to write.
        class_names: the classes in index order (abnormal, index 1, is the positive class).
        title: the figure's title.
    """
    from sklearn.metrics import ConfusionMatrixDisplay

    class_names = [str(c) for c in class_names]
    k = len(class_names)
    side = min(max(4.8, 0.38 * k + 2.5), 12)
    fig, ax = _figure(figsize=(side + 1.0, side))
    size = "large" if k <= 4 else ("small" if k <= 12 else "x-small")
    # scikit-learn's display draws the counts, the annotations and the axes; the colour scale
    # starts at 0 (a matrix without a zero cell would otherwise look emptier than it is).
    display = ConfusionMatrixDisplay.from_predictions(
        _class_indices(labels, class_names), _class_indices(pred, class_names), labels=list(range(k)),
        display_labels=class_names, ax=ax, cmap="Blues", colorbar=False, values_format="d",
        xticks_rotation=0 if k <= 4 else 90, text_kw={"fontsize": size}, im_kw={"vmin": 0})
    fig.colorbar(display.im_, ax=ax, shrink=0.8, label="images")
    ax.set_ylabel("Actual label")
    ax.set_title(f"{title} (n = {int(display.confusion_matrix.sum())})")
    return _save(fig, out)


def plot_roc_curves(curves, out, title="ROC curve"):
    """One or several ROC curves overlaid, with each AUC in the legend (Figs. 4.3, 4.19).

    Args:
        curves: ``{name: (labels01, scores)}``, e.g. ``{"train": ..., "test": ...}`` or one
            entry per VGG16 variant; scores are the probabilities of abnormal.
        out: the PNG to write.
        title: the figure's title.
    """
    from sklearn.metrics import RocCurveDisplay

    fig, ax = _figure(figsize=(5.6, 5.2))
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1, label="chance")
    for name, (labels, scores) in curves.items():
        labels = np.asarray(labels).astype(np.int64)
        scores = np.asarray(scores, dtype=np.float64)
        if len(np.unique(labels)) < 2:
            # No ROC exists for one class; keep the entry visible so its absence is explained.
            ax.plot([], [], label=f"{name} (one class: no ROC)")
            continue
        # scikit-learn's display draws the curve and sets the square unit axes.
        display = RocCurveDisplay.from_predictions(labels, scores, pos_label=1, ax=ax)
        display.line_.set(linewidth=2, label=f"{name} (AUC = {display.roc_auc:.3f})")
    ax.set_xlabel("False positive rate (1 - specificity)")
    ax.set_ylabel("True positive rate (recall)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    ax.set_title(title)
    return _save(fig, out)


def plot_reliability_diagram(labels, mean_prob, out, n_bins=15, title="Reliability diagram"):
    """Accuracy vs confidence of the MC mean probability's predicted class, with the ECE.

    Bars are the accuracy in each of ``n_bins`` equal-width confidence bins (those of
    :func:`karyo.uncertainty.metrics.reliability_bins`), the diagonal is perfect calibration, and the
    panel below counts the images per bin. Bars below the diagonal mean over-confidence.

    Args:
        labels: true labels (0/1, or class indices with ``mean_prob`` of shape (N, C)).
        mean_prob: MC mean probability of abnormal, or (N, C) class probabilities.
        out: the PNG to write.
    """

    bins = reliability_bins(mean_prob, labels, n_bins)
    ece = expected_calibration_error(mean_prob, labels, n_bins)
    edges, count = bins["edges"], bins["count"]
    width = edges[1] - edges[0]
    filled = count > 0
    fig, (ax, ax_count) = _figure(figsize=(5.6, 6.0), nrows=2, sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1]})
    ax.bar(edges[:-1][filled], bins["accuracy"][filled], width=width, align="edge",
           color=_TRAIN_COLOR, alpha=0.75, edgecolor="black", linewidth=0.5,
           label="accuracy in bin")
    # The gap |accuracy - confidence| is what the ECE averages: draw it as a red segment.
    centers = edges[:-1][filled] + width / 2
    ax.vlines(centers, bins["accuracy"][filled], bins["confidence"][filled],
              color=_WRONG_COLOR, linewidth=2)
    ax.hlines(bins["confidence"][filled], edges[:-1][filled] + 0.15 * width,
              edges[1:][filled] - 0.15 * width, color=_WRONG_COLOR, linewidth=2.5,
              label="mean confidence in bin")
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    binary = np.asarray(mean_prob).ndim == 1
    # Binary top-label confidence is max(p, 1 - p) >= 0.5: show only that half.
    low = edges[np.searchsorted(edges, 0.5, side="right") - 1] if binary else 0.0
    ax.set_xlim(low, 1.0)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("Accuracy")
    ax.legend(loc="upper left", fontsize="small")
    ax.grid(alpha=0.3)
    ece_text = "n/a" if ece is None else f"{ece:.3f}"
    ax.set_title(f"{title} (ECE = {ece_text}, {n_bins} bins, n = {int(count.sum())})")
    ax_count.bar(edges[:-1], count, width=width, align="edge", color="gray",
                 edgecolor="black", linewidth=0.5)
    ax_count.set_xlabel("Confidence of the predicted class (MC mean probability)")
    ax_count.set_ylabel("Images")
    return _save(fig, out)


def plot_risk_coverage(confidence, correct, out, threshold=0.8,
                       title="Referral: error vs share referred"):
    """Error on the retained images vs share referred to manual review, least confident first.

    The thesis refers a karyogram when its confidence is below 0.8; that operating point is
    marked. The dashed line is an oracle that refers exactly the wrong predictions first (the
    best any confidence score could do), so the gap shows what a better score could gain.

    Args:
        confidence: the confidence score per image (share of MC votes for the prediction).
        correct: True where the prediction is right.
        out: the PNG to write.
        threshold: the referral threshold to mark.
    """

    correct = np.asarray(correct, dtype=bool)
    confidence = np.asarray(confidence, dtype=np.float64)
    coverage, risk = curve(confidence, correct)
    fig, ax = _figure()
    if coverage.size:
        referred = 1 - coverage
        ax.plot(referred, risk, marker="o", markersize=4, color=_TRAIN_COLOR,
                label="refer least confident first")
        n, errors = correct.size, int((~correct).sum())
        share = np.linspace(0, 1, 201)[:-1]
        oracle = np.maximum(errors - share * n, 0) / ((1 - share) * n)
        ax.plot(share, oracle, linestyle="--", color="gray", label="oracle (refer errors first)")
        kept = confidence >= threshold
        if kept.any():
            point_referred = 1 - kept.mean()
            point_risk = (~correct[kept]).mean()
            ax.plot([point_referred], [point_risk], marker="*", markersize=16, color=_WRONG_COLOR,
                    linestyle="none",
                    label=f"threshold {threshold:g}: refer {point_referred:.0%}, "
                          f"error {point_risk:.1%}")
        else:
            ax.plot([], [], linestyle="none",
                    label=f"threshold {threshold:g}: every image referred")
        top = max(float(risk.max()), 0.01)
        ax.set_ylim(-0.03 * top, top * 1.15)
    else:
        ax.text(0.5, 0.5, "no predictions", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlim(-0.02, 1.02)
    ax.set_xlabel("Share of images referred to manual review")
    ax.set_ylabel("Error rate on the retained images")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    ax.set_title(title)
    return _save(fig, out)


def plot_confidence_histogram(confidence, correct, out, threshold=0.8,
                              title="Confidence score of correct and wrong predictions"):
    """Histograms of the confidence score for correct (top) and wrong (bottom) predictions.

    Separate panels with their own count axis, because wrong predictions are few. The
    referral threshold is drawn as a vertical line.
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    low = 0.5 if confidence.size == 0 or confidence.min() >= 0.5 else 0.0
    # 2.5 % wide bins: with 100 votes each bin holds 2-3 possible scores.
    bins = np.linspace(low, 1.0, int(round((1.0 - low) / 0.025)) + 1)
    fig, axes = _figure(figsize=(6.4, 5.2), nrows=2, sharex=True)
    for ax, mask, color, name in ((axes[0], correct, _CORRECT_COLOR, "correct"),
                                  (axes[1], ~correct, _WRONG_COLOR, "wrong")):
        ax.hist(confidence[mask], bins=bins, color=color, alpha=0.8, edgecolor="black",
                linewidth=0.5)
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1,
                   label=f"referral threshold {threshold:g}")
        ax.set_ylabel("Images")
        ax.set_title(f"{name} predictions (n = {int(mask.sum())})", fontsize="medium")
        ax.yaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper left", fontsize="small")
    axes[1].set_xlabel("Confidence score (share of MC Dropout votes for the prediction)")
    axes[1].set_xlim(low - 0.01, 1.01)
    fig.suptitle(title)
    return _save(fig, out)


def plot_tuning_scatter(values, val_loss, val_acc, out, xlabel, log=False, title=None):
    """A hyperparameter vs validation loss, coloured by validation accuracy (Figs. 3.3 / 3.4).

    Trials with a missing (NaN/None) loss are left out, as the thesis filtered failed runs.

    Args:
        values: the hyperparameter of each trial (e.g. learning rate, batch size).
        val_loss, val_acc: each trial's best validation loss and its validation accuracy.
        out: the PNG to write.
        xlabel: the hyperparameter's name.
        log: log-scale x axis (learning rates are searched on a log scale).
    """
    def floats(seq):
        return np.array([np.nan if v is None else float(v) for v in seq], dtype=np.float64)

    values, val_loss, val_acc = floats(values), floats(val_loss), floats(val_acc)
    if not values.shape == val_loss.shape == val_acc.shape:
        raise ValueError("tuning_scatter: values, val_loss and val_acc differ in length")
    ok = np.isfinite(values) & np.isfinite(val_loss)
    if log:
        ok &= values > 0
    fig, ax = _figure()
    colored = ok & np.isfinite(val_acc)
    if colored.any():
        points = ax.scatter(values[colored], val_loss[colored], c=val_acc[colored],
                            cmap="viridis", s=45, edgecolors="black", linewidths=0.5)
        fig.colorbar(points, ax=ax, label="Validation accuracy")
    if (ok & ~colored).any():
        ax.scatter(values[ok & ~colored], val_loss[ok & ~colored], marker="x", color="gray",
                   label="no accuracy recorded")
        ax.legend(fontsize="small")
    if log:
        ax.set_xscale("log")
    shown = np.unique(values[ok])
    if shown.size and shown.size <= 12 and np.all(shown == np.round(shown)):
        # Integer hyperparameters (batch size 16, 32, ...): tick exactly the tried values.
        ax.set_xticks(shown, [str(int(v)) for v in shown])
        ax.xaxis.set_minor_locator(_null_locator())
    ax.set_xlabel(xlabel)
    ax.set_ylabel("Validation loss")
    ax.grid(alpha=0.3, which="both" if log else "major")
    failed = int((~ok).sum())
    note = f"{int(ok.sum())} trials" + (f"; {failed} failed trial(s) left out" if failed else "")
    ax.set_title(f"{title or f'Validation loss vs {xlabel}'}\n{note}", fontsize="medium")
    return _save(fig, out)


def plot_explanation(image, slot_probs, reasons, out, title=None, cmap="RdYlBu_r"):
    """A karyogram with each slot's box coloured by P(slot abnormal), and the top reasons under it.

    Args:
        image: the karyogram (gray or RGB ``uint8``, square, karyo's layout).
        slot_probs: ``(24,)`` P(slot abnormal), slot order 1..22, X, Y.
        reasons: the lines to print under the picture (e.g. :func:`karyo.models.explain.slot_reasons`).
        out: the PNG to write.
        title: the figure's title (e.g. the file, the call and its confidence).
    """
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    image = np.asarray(image)
    gray = image[:, :, 0] if image.ndim == 3 else image
    probs = np.asarray(slot_probs, np.float64)
    fig, ax = _figure(figsize=(6.4, 7.2))
    ax.imshow(gray, cmap="gray", vmin=0, vmax=255)
    colours, norm = colormaps[cmap], Normalize(0.0, 1.0)
    # the most probable slots are drawn last, so that their edges lie on top
    boxes = slot_boxes(gray.shape[0])
    for i in np.argsort(probs, kind="stable"):
        x0, y0, x1, y1 = boxes[SLOTS[i]]
        colour = colours(norm(probs[i]))
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, facecolor=colour, alpha=0.18,
                               edgecolor="none"))
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=colour,
                               linewidth=1.0 + 2.0 * probs[i]))
    ax.set_xticks([])
    ax.set_yticks([])
    fig.colorbar(ScalarMappable(norm=norm, cmap=colours), ax=ax, shrink=0.7, label="P(slot abnormal)")
    text = "\n".join(reasons) if reasons else "no slot stands out"
    ax.set_xlabel(text, fontsize="small", loc="left", linespacing=1.4)
    if title:
        ax.set_title(title, fontsize="medium")
    return _save(fig, out)


def plot_gallery(rows, out, title=None, thumb=1.9):
    """Rows of captioned karyogram thumbnails, e.g. a detector's confident calls and its referred cells.

    Args:
        rows: ``{row title: [(image, caption), ...]}`` (images gray or RGB ``uint8``); an empty row
            says "none".
        out: the PNG to write.
        title: the figure's title.
        thumb: inches per thumbnail.
    """
    rows = {k: list(v) for k, v in rows.items()}
    width = max([len(v) for v in rows.values()] + [1])
    fig, axes = _figure(figsize=(thumb * width + 0.4, (thumb + 1.0) * max(len(rows), 1)), nrows=max(len(rows), 1),
                        ncols=width, squeeze=False)
    for r, (name, items) in enumerate(rows.items()):
        for c in range(width):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(items):
                image, caption = items[c]
                image = np.asarray(image)
                ax.imshow(image if image.ndim == 3 else image, cmap=None if image.ndim == 3 else "gray",
                          vmin=0, vmax=255)
                ax.set_xlabel(caption, fontsize="x-small")
            else:
                ax.axis("off")
                if not items and c == 0:
                    ax.text(0.0, 0.5, "none", transform=ax.transAxes, fontsize="small")
            if c == 0:
                ax.set_title(name, fontsize="small", loc="left")
    if title:
        fig.suptitle(title, fontsize="medium")
    return _save(fig, out)


def plot_block_rates(recipes, blocks, out, base_lr=None, title=None):
    """Which blocks each fine-tuning recipe trains, and at which learning rate (a heat map).

    One row per recipe (e.g. the thesis' fixed ones beside a search's best trials), one column per
    block; a trained block's cell is coloured by log10 of its rate and labelled with it, a frozen
    block's cell is left white.

    Args:
        recipes: ``[(label, {block: rate or None})]``, drawn top to bottom.
        blocks: the backbone's block names, input to output.
        out: the PNG to write.
        base_lr: the base rate, named in the title (the head trains at it).
    """
    from matplotlib.colors import Normalize

    if not recipes:
        raise ValueError("block_rates: no recipe to draw")
    rates = np.array([[np.nan if (r := config.get(b)) is None else math.log10(r) for b in blocks]
                      for _, config in recipes], dtype=np.float64)
    shown = rates[np.isfinite(rates)]
    low, high = (shown.min(), shown.max()) if shown.size else (-6.0, -4.0)
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    width = max(4.0, 0.55 * len(blocks) + 2.5)
    fig, ax = _figure(figsize=(width, max(2.0, 0.5 * len(recipes) + 1.4)))
    image = ax.imshow(np.ma.masked_invalid(rates), cmap="viridis", norm=Normalize(low, high), aspect="auto")
    for i, j in zip(*np.nonzero(np.isfinite(rates))):
        ax.text(j, i, f"{10 ** rates[i, j]:.0e}", ha="center", va="center", fontsize="x-small",
                color="white" if rates[i, j] < (low + high) / 2 else "black")
    ax.set_xticks(range(len(blocks)), blocks, rotation=45, ha="right", fontsize="small")
    ax.set_yticks(range(len(recipes)), [label for label, _ in recipes], fontsize="small")
    ax.set_xticks(np.arange(len(blocks) + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(len(recipes) + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="lightgray", linewidth=0.5)
    ax.tick_params(which="minor", length=0)
    fig.colorbar(image, ax=ax, label="log10 learning rate")
    note = f"white: frozen; the head trains at {base_lr:.0e}" if base_lr else "white: frozen"
    ax.set_title(f"{title or 'Fine-tuned blocks and their learning rates'}\n{note}", fontsize="medium")
    return _save(fig, out)
