"""Test-set metrics, calibration, referral and the thesis' wrong-prediction tables.

The thesis reports accuracy, precision, recall and AUC on the test set (Table 5.1, abnormal =
positive) and lists the wrongly predicted images with their mean softmax and confidence
score (Tables 4.1, 4.2). Beyond it (SPEC 5): F1, specificity, G-mean, MCC, calibration of
the MC mean probability (ECE, Brier, NLL) and what referring low-confidence karyograms to a
cytogeneticist buys (referral rate, accuracy and recall on the retained cases, area under the
risk-coverage curve). Pure numpy and scikit-learn.
"""

import math

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import accuracy_score, f1_score

from karyo.atomic import write_csv
from karyo.data.manifest import CHROMOSOME_LABELS
from karyo.errors import KaryoError

#: Bins of the expected calibration error (15 equal-width bins, as in Guo et al. 2017).
ECE_BINS = 15
#: Columns of the wrong-prediction tables (thesis Tables 4.1 / 4.2, plus whether it was referred).
WRONG_COLUMNS = ("image", "predicted_label", "actual_label", "mean_softmax", "confidence_score",
                 "refer")
_WRONG_HEADERS = ("Image", "Predicted label", "Actual label", "Mean softmax", "Confidence score",
                  "Referred")


def _float(value):
    """A JSON-safe float: None for NaN (an undefined metric)."""
    value = float(value)
    return None if math.isnan(value) else value


def _as_labels01(labels):
    labels = np.asarray(labels)
    if labels.dtype.kind not in "biu" and labels.size:
        raise ValueError("labels must be 0/1 (1 = abnormal)")
    labels = labels.astype(np.int64)
    if labels.size and not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0/1 (1 = abnormal), got {sorted(set(labels.tolist()))}")
    return labels


def _top_label(prob):
    """(confidence, predicted class) of the mean probabilities, binary or (N, C)."""
    prob = np.asarray(prob, dtype=np.float64)
    if prob.ndim == 1:
        pred = (prob >= 0.5).astype(np.int64)
        return np.where(pred == 1, prob, 1 - prob), pred
    return prob.max(axis=1), prob.argmax(axis=1)


def reliability_bins(prob, labels, n_bins=ECE_BINS):
    """Top-label reliability: per confidence bin, the mean confidence and the accuracy.

    The predicted class is the most probable class of the MC mean probability and its
    confidence is that probability (for the binary task ``max(p, 1 - p)``, so only bins above
    0.5 fill). Bins are ``n_bins`` equal-width intervals ``[k/n, (k+1)/n)`` of [0, 1], the last
    one closed.

    Args:
        prob: mean probability of abnormal, shape ``(N,)``, or class probabilities ``(N, C)``.
        labels: true labels, 0/1 or class indices.
        n_bins: number of bins (thesis-independent; 15 is the usual choice).

    Returns:
        dict of arrays: ``edges`` ``(n_bins + 1,)``, ``count``, ``confidence`` (mean confidence
        in the bin) and ``accuracy`` (share of correct predictions in it), the last two NaN for
        empty bins.
    """
    confidence, pred = _top_label(prob)
    correct = (pred == np.asarray(labels)).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.floor(confidence * n_bins).astype(np.int64), 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(index, weights=confidence, minlength=n_bins) / count
        accuracy = np.bincount(index, weights=correct, minlength=n_bins) / count
    return {"edges": edges, "count": count, "confidence": mean_conf, "accuracy": accuracy}


def expected_calibration_error(prob, labels, n_bins=ECE_BINS):
    """Top-label ECE: sum over bins of (share of images) x |accuracy - mean confidence|.

    See :func:`reliability_bins` for the bins; returns None for no images.
    """
    bins = reliability_bins(prob, labels, n_bins)
    total = bins["count"].sum()
    if total == 0:
        return None
    filled = bins["count"] > 0
    gaps = np.abs(bins["accuracy"][filled] - bins["confidence"][filled])
    return float((bins["count"][filled] / total * gaps).sum())


def risk_coverage(confidence, correct):
    """Risk-coverage curve of referring the least confident images first.

    Each distinct confidence value is one operating point: keep the images at or above it
    (coverage = their share) and measure the error rate among them (risk). Tied confidences
    stay together: with 100 MC votes many images share a confidence of 1.0, and no threshold
    can keep half of a tie.

    Returns:
        ``(coverage, risk)``, arrays ordered by increasing coverage; the last point keeps
        every image (coverage 1, risk = overall error rate).
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    wrong = ~np.asarray(correct, dtype=bool)
    if confidence.shape != wrong.shape:
        raise ValueError(f"risk_coverage: {confidence.shape} confidences, {wrong.shape} outcomes")
    if confidence.size == 0:
        return np.zeros(0), np.zeros(0)
    order = np.argsort(-confidence, kind="stable")
    conf_sorted = confidence[order]
    errors = np.cumsum(wrong[order])
    # The last image of each run of equal confidences closes an operating point.
    ends = np.flatnonzero(np.r_[conf_sorted[1:] != conf_sorted[:-1], True])
    kept = ends + 1
    return kept / confidence.size, errors[ends] / kept


def area_under_risk_coverage(confidence, correct):
    """AURC: the risk integrated over coverage (step rule), lower is better.

    With distinct confidences this is the usual mean over k of the risk of the k most
    confident images (Geifman & El-Yaniv 2017); tied confidences form one step.
    """
    coverage, risk = risk_coverage(confidence, correct)
    if coverage.size == 0:
        return None
    return float(np.sum(risk * np.diff(np.r_[0.0, coverage])))


def compute_metrics(labels01, mean_prob, pred, confidence, refer):
    """Metrics of a binary test set (abnormal = 1 = positive), JSON-safe.

    Args:
        labels01: true labels, 1 abnormal, 0 normal.
        mean_prob: MC mean probability of abnormal (the thesis' "mean softmax"); scores the
            AUC and the calibration metrics.
        pred: predicted labels (the MC majority vote).
        confidence: the thesis' confidence score (share of votes for ``pred``); orders the
            risk-coverage curve.
        refer: True where the image goes to manual review.

    Returns:
        dict of plain floats/ints/None: ``accuracy precision recall auc f1 specificity g_mean
        mcc ece brier nll referral_rate retained_accuracy retained_recall aurc tp fp tn fn n
        n_referred n_retained``. Conventions where a metric is undefined on these data:
        ``precision``, ``recall``, ``f1`` and ``specificity`` (and their retained
        counterparts) are 0.0 when their denominator is empty (scikit-learn's
        ``zero_division=0``) and ``mcc`` is 0.0 (scikit-learn's convention); ``auc`` is None
        when the test set holds one class only (no ROC curve exists); ``retained_*`` are None
        when every image is referred. ``ece`` uses 15 bins (:func:`expected_calibration_error`),
        ``brier`` and ``nll`` (natural log) score ``mean_prob``.

    Raises:
        ValueError: empty or mismatched inputs, labels other than 0/1.
    """
    from sklearn import metrics as skm

    y = _as_labels01(labels01)
    prob = np.asarray(mean_prob, dtype=np.float64)
    pred = _as_labels01(pred)
    confidence = np.asarray(confidence, dtype=np.float64)
    refer = np.asarray(refer, dtype=bool)
    n = y.size
    if n == 0:
        raise ValueError("compute_metrics: no predictions to score")
    shapes = {a.shape for a in (y, prob, pred, confidence, refer)}
    if len(shapes) != 1:
        raise ValueError(f"compute_metrics: inputs of different shapes {sorted(shapes)}")
    if not (np.isfinite(prob).all() and prob.min() >= 0 and prob.max() <= 1):
        raise ValueError("compute_metrics: mean_prob must be probabilities in [0, 1]")

    tn, fp, fn, tp = (int(v) for v in skm.confusion_matrix(y, pred, labels=[0, 1]).ravel())
    recall = skm.recall_score(y, pred, labels=[0, 1], zero_division=0)
    specificity = skm.recall_score(y, pred, labels=[0, 1], pos_label=0, zero_division=0)
    auc = skm.roc_auc_score(y, prob) if len(np.unique(y)) == 2 else None
    retained = ~refer
    n_retained = int(retained.sum())
    if n_retained:
        retained_accuracy = skm.accuracy_score(y[retained], pred[retained])
        retained_recall = skm.recall_score(y[retained], pred[retained], labels=[0, 1],
                                           zero_division=0)
    else:
        retained_accuracy = retained_recall = None
    result = {
        "accuracy": skm.accuracy_score(y, pred),
        "precision": skm.precision_score(y, pred, labels=[0, 1], zero_division=0),
        "recall": recall,
        "auc": auc,
        "f1": skm.f1_score(y, pred, labels=[0, 1], zero_division=0),
        "specificity": specificity,
        "g_mean": math.sqrt(recall * specificity),
        "mcc": skm.matthews_corrcoef(y, pred),
        "ece": expected_calibration_error(prob, y),
        "brier": skm.brier_score_loss(y, prob, pos_label=1),
        "nll": skm.log_loss(y, prob, labels=[0, 1]),
        "referral_rate": float(refer.mean()),
        "retained_accuracy": retained_accuracy,
        "retained_recall": retained_recall,
        "aurc": area_under_risk_coverage(confidence, pred == y),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "n": int(n),
        "n_referred": int(refer.sum()),
        "n_retained": n_retained,
    }
    return {k: (v if v is None or isinstance(v, int) else _float(v)) for k, v in result.items()}


def _labels01_of_rows(rows, positive):
    labels = []
    for number, row in enumerate(rows, start=1):
        for column in ("label", "pred_label"):
            if not row.get(column):
                raise KaryoError(f"prediction row {number} ({row.get('path', '?')}): "
                                 f"empty '{column}' (metrics need labelled images)")
        labels.append((row["label"] == positive, row["pred_label"] == positive))
    return np.array(labels, dtype=np.int64).reshape(-1, 2)


def metrics_from_predictions(rows, positive="abnormal"):
    """:func:`compute_metrics` recomputed from the rows of a ``predictions.csv``.

    Args:
        rows: dicts with ``label pred_label mean_prob confidence refer`` (as written by
            :func:`karyo.uncertainty.confidence.write_predictions` and read back by ``read_predictions``).
        positive: the label of the positive class (the thesis: abnormal).

    Raises:
        KaryoError: a row without a true or predicted label.
    """
    rows = list(rows)
    labels = _labels01_of_rows(rows, positive)
    return compute_metrics(
        labels[:, 0],
        [float(r["mean_prob"]) for r in rows],
        labels[:, 1],
        [float(r["confidence"]) for r in rows],
        [_as_bool(r["refer"]) for r in rows],
    )


def _as_bool(value):
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


#: Bootstrap resamples behind every interval the report prints.
BOOTSTRAP_RESAMPLES = 2000


def group_bootstrap(labels01, scores, groups, statistic, n_resamples=BOOTSTRAP_RESAMPLES, level=0.95, seed=0):
    """Percentile interval of ``statistic`` when whole groups (cases) are resampled.

    Images of one group (a case, or a karyogram and its augmented copies) are not independent, so
    they are drawn together: each resample draws, with replacement, as many groups as there are,
    separately among the groups holding an abnormal image and among the others (the stratified
    bootstrap pROC uses for AUC intervals), so that every resample has both classes and the
    statistic is defined. ``scipy.stats.bootstrap`` resamples single observations and cannot
    stratify, hence this short loop.

    Args:
        labels01: true labels, 1 abnormal.
        scores: what ``statistic`` reads beside the labels (probabilities, or predicted labels).
        groups: each image's group; images without one should pass their path.
        statistic: ``f(labels01, scores) -> float``.
        level: coverage of the interval (0.95: the 2.5th and 97.5th percentiles).

    Returns:
        ``(low, high)`` floats, or ``(None, None)`` when the test set holds one class only.
    """
    y = _as_labels01(labels01)
    scores = np.asarray(scores)
    groups = np.asarray([str(g) for g in groups])
    if len(np.unique(y)) < 2:
        return None, None
    names, index = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(index == i) for i in range(len(names))]
    positive = np.array([y[m].max() == 1 for m in members])
    strata = [np.flatnonzero(positive), np.flatnonzero(~positive)]
    rng = np.random.default_rng(seed)
    values = np.empty(n_resamples)
    for b in range(n_resamples):
        drawn = np.concatenate([rng.choice(s, size=len(s)) for s in strata if len(s)])
        rows = np.concatenate([members[g] for g in drawn])
        values[b] = statistic(y[rows], scores[rows])
    tail = (1 - level) / 2 * 100
    low, high = np.nanpercentile(values, [tail, 100 - tail])
    return float(low), float(high)


def auc_statistic(labels01, prob):
    """ROC AUC as the Mann-Whitney U statistic over ranks (ties averaged); NaN with one class.

    Equal to ``sklearn.metrics.roc_auc_score`` (tested), at a twentieth of its cost, which the
    thousands of bootstrap resamples feel.
    """
    n_pos = int(labels01.sum())
    n_neg = labels01.size - n_pos
    if not n_pos or not n_neg:
        return float("nan")
    ranks = rankdata(prob)
    return float((ranks[labels01 == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def recall_statistic(labels01, pred):
    """Recall of the abnormal class: caught abnormal images over abnormal images."""
    abnormal = labels01 == 1
    return float(pred[abnormal].mean()) if abnormal.any() else float("nan")


def metric_intervals(rows, positive="abnormal", n_resamples=BOOTSTRAP_RESAMPLES, level=0.95, seed=0):
    """95 % intervals of AUC and recall from ``predictions.csv`` rows, resampled by ``group``.

    Rows without a ``group`` column (or with an empty one) count as their own group.

    Returns:
        ``{"auc": (low, high), "recall": (low, high), "n_groups": int}``; ``(None, None)``
        where the test set holds one class only.
    """
    rows = list(rows)
    labels = _labels01_of_rows(rows, positive)
    groups = [r.get("group") or r.get("path", str(i)) for i, r in enumerate(rows)]
    prob = np.array([float(r["mean_prob"]) for r in rows])
    kwargs = dict(n_resamples=n_resamples, level=level, seed=seed)
    return {
        "auc": group_bootstrap(labels[:, 0], prob, groups, auc_statistic, **kwargs),
        "recall": group_bootstrap(labels[:, 0], labels[:, 1], groups, recall_statistic, **kwargs),
        "n_groups": len(set(groups)),
    }


def per_group_recall(rows, key):
    """Detection per group of images, e.g. per karyotype: which abnormalities the model misses.

    Args:
        rows: prediction rows (``label``, ``pred_label``, ``confidence``, ``refer`` and ``key``).
        key: the column to group by, e.g. ``karyotype`` or ``abnormality``.

    Returns:
        list of dicts, worst group first: ``key`` (the group's value), ``label`` (the true
        label(s) in the group), ``n``, ``n_correct``, ``recall`` (``n_correct / n``: the recall
        of an abnormal group, the specificity of a normal one), ``n_referred``,
        ``n_missed`` (wrong and *not* referred: the errors nobody would look at) and
        ``mean_confidence``.

    Raises:
        KaryoError: a row lacks the column ``key``.
    """
    groups = {}
    for number, row in enumerate(rows, start=1):
        if key not in row:
            raise KaryoError(f"prediction row {number} ({row.get('path', '?')}): "
                             f"no column '{key}' to group by")
        groups.setdefault(str(row[key]), []).append(row)
    table = []
    for value, members in groups.items():
        correct = [r["label"] == r["pred_label"] for r in members]
        referred = [_as_bool(r["refer"]) for r in members]
        table.append({
            key: value,
            "label": "/".join(sorted({r["label"] for r in members})),
            "n": len(members),
            "n_correct": int(sum(correct)),
            "recall": sum(correct) / len(members),
            "n_referred": int(sum(referred)),
            "n_missed": int(sum(not c and not f for c, f in zip(correct, referred))),
            "mean_confidence": float(np.mean([float(r["confidence"]) for r in members])),
        })
    return sorted(table, key=lambda g: (g["recall"], g[key]))


def wrong_predictions(rows):
    """The wrongly predicted images, as in the thesis' Tables 4.1 / 4.2.

    Rows without a true label are skipped. Order is kept.

    Returns:
        list of dicts with ``image`` (the path), ``predicted_label``, ``actual_label``,
        ``mean_softmax`` (mean MC probability of abnormal), ``confidence_score`` (share of
        votes for the predicted label) and ``refer``.
    """
    wrong = []
    for row in rows:
        if row.get("label") and row["label"] != row["pred_label"]:
            wrong.append({
                "image": row["path"],
                "predicted_label": row["pred_label"],
                "actual_label": row["label"],
                "mean_softmax": float(row["mean_prob"]),
                "confidence_score": float(row["confidence"]),
                "refer": _as_bool(row["refer"]),
            })
    return wrong


def markdown_table(headers, lines):
    """A GitHub Markdown table from header strings and rows of cell strings ('|' escaped)."""
    def cell(text):
        return str(text).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(cell(h) for h in headers) + " |",
           "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(cell(c) for c in line) + " |" for line in lines]
    return "\n".join(out) + "\n"


def wrong_predictions_markdown(rows, title="Wrongly predicted images"):
    """The thesis' wrong-prediction table as Markdown (mean softmax to 3 decimals, score in %).

    Args:
        rows: prediction rows (``wrong_predictions`` is applied to them) or the output of
            :func:`wrong_predictions`.
        title: a heading line; None for the table alone.
    """
    rows = list(rows)
    wrong = rows if rows and "mean_softmax" in rows[0] else wrong_predictions(rows)
    text = f"### {title}\n\n" if title else ""
    if not wrong:
        return text + "No wrongly predicted images.\n"
    lines = [(w["image"], w["predicted_label"], w["actual_label"], f"{w['mean_softmax']:.3f}",
              f"{w['confidence_score']:.0%}", "yes" if w["refer"] else "no") for w in wrong]
    return text + markdown_table(_WRONG_HEADERS, lines)


def write_wrong_predictions(path, rows):
    """Write the wrong-prediction table as CSV (columns :data:`WRONG_COLUMNS`), atomically."""
    rows = list(rows)
    wrong = rows if rows and "mean_softmax" in rows[0] else wrong_predictions(rows)
    return write_csv(path, wrong, WRONG_COLUMNS)


def chromosome_metrics(labels, pred, class_names=CHROMOSOME_LABELS):
    """Accuracy, Macro-F1 (scikit-learn ``f1_score(average="macro")``) and per-class F1.

    Classes absent from both ``labels`` and ``pred`` are left out of the macro average (their
    F1 is undefined), and reported as ``None``.
    """
    labels, pred = np.asarray(labels), np.asarray(pred)
    present = sorted(set(labels.tolist()) | set(pred.tolist()))
    per_class = f1_score(labels, pred, labels=present, average=None, zero_division=0)
    f1_of = dict(zip(present, per_class))
    return {
        "accuracy": float(accuracy_score(labels, pred)),
        "macro_f1": float(f1_score(labels, pred, labels=present, average="macro", zero_division=0)),
        "per_class_f1": {name: (float(f1_of[i]) if i in f1_of else None)
                         for i, name in enumerate(class_names)},
        "n": int(len(labels)),
    }
