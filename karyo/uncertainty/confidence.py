"""Confidence of a karyogram's label from Monte Carlo Dropout passes (thesis 3.4 and 4.4).

The thesis keeps dropout on at prediction, runs 100 forward passes per image, takes the label
most passes vote for as the prediction and the share of passes voting for it as the
"confidence score"; it also reports the mean of the passes' softmax ("mean softmax"). A
confidence below 80 % refers the karyogram to a cytogeneticist ("we regard this situation as
impossible to predict and require manual processing").

The thesis' future work asks for a confidence that also uses the softmax values, so every
image also gets the standard Bayesian summaries of the passes (Gal & Ghahramani 2016):
the spread of the passes (``std_prob``), the predictive entropy of their mean (total
uncertainty) and the mutual information between the label and the dropout mask (BALD: the
model's own, epistemic, uncertainty), both in nats.

This module is pure numpy: it does not import TensorFlow. ``mc_predict`` produces the input.
"""

import csv
import io
import math
from pathlib import Path

import numpy as np
from scipy.special import xlogy

from karyo import thesis
from karyo.atomic import write_csv
from karyo.errors import KaryoError

#: The thesis' referral threshold and number of MC Dropout passes per image (3.4).
DEFAULT_THRESHOLD, DEFAULT_PASSES = thesis.REFERRAL_THRESHOLD, thesis.MC_PASSES
#: Columns of ``predictions.csv`` fixed by SPEC 4, in order; ``votes`` follows them.
PREDICTION_COLUMNS = (
    "path", "label", "pred_label", "confidence", "mean_prob", "std_prob",
    "entropy", "mutual_info", "refer",
)
_FLOAT_COLUMNS = ("confidence", "mean_prob", "std_prob", "entropy", "mutual_info")
# Softmax outputs of float32 models sum to 1 within ~1e-6; a larger gap means logits were passed.
_SUM_TOLERANCE = 1e-3


def _check_probs(probs):
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim not in (2, 3):
        raise ValueError(
            f"MC passes must have shape (T, N) for the binary task or (T, N, C) for C classes, "
            f"got shape {probs.shape}"
        )
    if probs.shape[0] < 1:
        raise ValueError("MC passes: need at least one pass (T >= 1)")
    if probs.ndim == 3 and probs.shape[2] < 2:
        raise ValueError(f"MC passes: a multi-class array needs C >= 2 classes, got {probs.shape}")
    if not np.all(np.isfinite(probs)):
        raise ValueError("MC passes: probabilities contain NaN or infinity")
    if probs.size and (probs.min() < 0 or probs.max() > 1):
        raise ValueError(
            f"MC passes: probabilities must lie in [0, 1], got [{probs.min():g}, {probs.max():g}]"
            " (logits instead of probabilities?)"
        )
    if probs.ndim == 3 and probs.size:
        worst = np.abs(probs.sum(axis=2) - 1).max()
        if worst > _SUM_TOLERANCE:
            raise ValueError(
                f"MC passes: class probabilities must sum to 1 per pass (off by {worst:g})"
            )
    return probs


def summarize_passes(probs, threshold=DEFAULT_THRESHOLD, decision=0.5):
    """Per-image votes, majority label, confidence score and uncertainty of MC Dropout passes.

    Args:
        probs: per-pass probabilities, shape ``(T, N)`` for the binary karyogram task (the
            probability of ``abnormal``, the positive class) or ``(T, N, C)`` for C classes.
        threshold: refer an image to manual review when its confidence is below this
            (thesis: 0.8).
        decision: a binary pass votes ``abnormal`` when its probability is ``>= decision``.
            Ignored for multi-class input, where each pass votes for its most probable class.

    Returns:
        dict of numpy arrays, one entry per image:

        - ``pred``: the majority label (binary: 1 abnormal, 0 normal; else the class index).
          Ties: a binary tie (possible for even T) goes to **abnormal**. A tie has
          confidence 0.5, so it is referred at any threshold above 0.5; of the two provisional
          labels, calling a normal karyogram abnormal costs a second look (the thesis' workflow
          has a cytogeneticist check every predicted abnormal, section 5.1), while calling an
          abnormal one normal may let it through: the missed abnormal is the costly error
          (section 4.3.5). So even at a threshold <= 0.5 a tie is looked at.
          A multi-class tie goes to the tied class with the highest mean probability, then to
          the lowest class index.
        - ``votes``: passes voting for ``pred``; ``confidence`` = ``votes / T`` (the thesis'
          confidence score, always >= 0.5 for the binary task, >= 1/C in general).
        - ``votes_abnormal`` (binary) or ``votes_per_class`` ``(N, C)`` (multi-class).
        - ``mean_prob``: binary, the mean probability of abnormal (the thesis' "mean
          softmax"); multi-class, the mean probability of the predicted class, with all
          classes' means in ``mean_probs`` ``(N, C)``.
        - ``std_prob``: standard deviation over the passes of the same probability
          (population form, 0 for T = 1).
        - ``entropy``: predictive entropy of the mean probabilities, in nats
          (at most ln 2 = 0.693 for two classes).
        - ``mutual_info``: BALD, the entropy of the mean minus the mean of the passes'
          entropies (>= 0; 0 when all passes agree exactly, hence 0 for T = 1).
        - ``refer``: ``confidence < threshold``.

    Raises:
        ValueError: the array has the wrong shape or does not hold probabilities.

    Examples:
        >>> s = summarize_passes([[0.9, 0.2], [0.7, 0.6], [0.4, 0.1]])
        >>> s["pred"].tolist(), s["votes"].tolist(), s["refer"].tolist()
        ([1, 0], [2, 2], [True, True])
    """
    probs = _check_probs(probs)
    passes = probs.shape[0]
    if probs.ndim == 2:
        votes_abnormal = (probs >= decision).sum(axis=0)
        # 2 * votes >= T: the majority votes abnormal, or a tie (documented above).
        pred = (2 * votes_abnormal >= passes).astype(np.int64)
        votes = np.where(pred == 1, votes_abnormal, passes - votes_abnormal)
        mean_prob = probs.mean(axis=0)
        std_prob = probs.std(axis=0)
        entropy = -(xlogy(mean_prob, mean_prob) + xlogy(1 - mean_prob, 1 - mean_prob))
        pass_entropy = -(xlogy(probs, probs) + xlogy(1 - probs, 1 - probs)).mean(axis=0)
        extra = {"votes_abnormal": votes_abnormal.astype(np.int64)}
    else:
        classes = probs.shape[2]
        pass_labels = probs.argmax(axis=2)
        votes_per_class = np.stack([(pass_labels == k).sum(axis=0) for k in range(classes)],
                                   axis=-1)
        mean_probs = probs.mean(axis=0)
        tied = votes_per_class == votes_per_class.max(axis=-1, keepdims=True)
        # argmax returns the first maximum: the lowest index among equally probable ties.
        pred = np.where(tied, mean_probs, -1.0).argmax(axis=-1).astype(np.int64)
        votes = np.take_along_axis(votes_per_class, pred[:, None], axis=-1)[:, 0]
        mean_prob = np.take_along_axis(mean_probs, pred[:, None], axis=-1)[:, 0]
        std_prob = np.take_along_axis(probs.std(axis=0), pred[:, None], axis=-1)[:, 0]
        entropy = -xlogy(mean_probs, mean_probs).sum(axis=-1)
        pass_entropy = -xlogy(probs, probs).sum(axis=-1).mean(axis=0)
        extra = {"votes_per_class": votes_per_class.astype(np.int64), "mean_probs": mean_probs}
    confidence = votes / passes
    # Jensen: H(mean) >= mean(H); the difference can be -1e-17 from rounding.
    mutual_info = np.maximum(entropy - pass_entropy, 0.0)
    summary = {
        "pred": pred,
        "votes": votes.astype(np.int64),
        "confidence": confidence,
        "mean_prob": mean_prob,
        "std_prob": std_prob,
        "entropy": entropy,
        "mutual_info": mutual_info,
        "refer": confidence < threshold,
    }
    summary.update(extra)
    return summary


def _label_name(label, class_names):
    if label is None:
        return ""
    if isinstance(label, (int, np.integer)) and not isinstance(label, (bool, np.bool_)):
        if not 0 <= int(label) < len(class_names):
            raise ValueError(f"label index {label} is outside the classes {list(class_names)}")
        return class_names[int(label)]
    return str(label)


def predictions_table(paths, labels, summary, class_names=("normal", "abnormal"), extra=None):
    """Rows of ``predictions.csv`` (SPEC 4) from image paths, true labels and a summary.

    Args:
        paths: one path (or name) per image.
        labels: the true labels, as class names or class indices; ``None`` (or ``None``
            entries) for images whose label is unknown, e.g. new karyograms given to
            ``karyo predict``: their ``label`` is empty.
        summary: the dict returned by :func:`summarize_passes`.
        class_names: names of the class indices in ``summary["pred"]``; index 1 of the
            binary task is the positive class, ``abnormal``.
        extra: optional mapping of column name -> one value per image, appended after the
            standard columns (e.g. ``karyotype`` for :func:`karyo.uncertainty.metrics.per_group_recall`).

    Returns:
        list of dicts with the columns ``path,label,pred_label,confidence,mean_prob,std_prob,
        entropy,mutual_info,refer,votes`` (+ ``extra``'s), values as plain Python types.
    """
    paths = [str(p) for p in paths]
    n = len(paths)
    if labels is None:
        labels = [None] * n
    labels = list(labels)
    extra = dict(extra or {})
    lengths = {"labels": len(labels), "summary": len(summary["pred"])}
    lengths.update({f"extra column {k!r}": len(v) for k, v in extra.items()})
    for what, length in lengths.items():
        if length != n:
            raise ValueError(f"predictions table: {n} paths but {length} {what}")
    rows = []
    for i in range(n):
        row = {
            "path": paths[i],
            "label": _label_name(labels[i], class_names),
            "pred_label": _label_name(int(summary["pred"][i]), class_names),
        }
        for column in _FLOAT_COLUMNS:
            row[column] = float(summary[column][i])
        row["refer"] = bool(summary["refer"][i])
        row["votes"] = int(summary["votes"][i])
        for column, values in extra.items():
            value = values[i]
            row[column] = value.item() if isinstance(value, np.generic) else value
        rows.append(row)
    return rows


def _columns(rows):
    columns = list(PREDICTION_COLUMNS) + ["votes"]
    for row in rows:
        columns += [k for k in row if k not in columns]
    return columns


def write_predictions(path, rows):
    """Write prediction rows as ``predictions.csv``, atomically; returns the path.

    Floats are written at full precision (Python's shortest round-trip form), so metrics
    recomputed from the file equal those computed from the arrays.
    """
    return write_csv(path, rows, _columns(rows))


_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}


def read_predictions(path):
    """Read a ``predictions.csv`` back into rows with typed values.

    ``confidence`` .. ``mutual_info`` become floats, ``refer`` a bool, ``votes`` an int;
    other columns stay strings.

    Raises:
        KaryoError: the file is missing, lacks a SPEC column or has an unreadable value;
            the message names the file, the line and the column.
    """
    path = Path(path)
    if not path.is_file():
        raise KaryoError(f"{path}: predictions file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise KaryoError(f"{path}: cannot be read as a UTF-8 CSV ({exc})") from None
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in PREDICTION_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise KaryoError(f"{path}: missing column(s) {', '.join(missing)} of predictions.csv")
    rows = []
    for number, raw in enumerate(reader, start=2):
        # A line with too many fields puts the surplus under the key None: drop it.
        row = {k: ("" if v is None else v) for k, v in raw.items() if k is not None}
        for column in (*_FLOAT_COLUMNS, "refer", "votes"):
            cell = row.get(column, "").strip()
            if column == "votes" and not cell:
                continue
            try:
                row[column] = _parse(column, cell)
            except ValueError:
                raise KaryoError(
                    f"{path}: line {number}: column '{column}': unreadable value {cell!r}"
                ) from None
        rows.append(row)
    return rows


def _parse(column, text):
    if column == "refer":
        if text.lower() not in _TRUE | _FALSE:
            raise ValueError(text)
        return text.lower() in _TRUE
    if column == "votes":
        return int(text)
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value
