"""Case-level calls: the cells of one case (the manifest's ``group``, a patient) combined.

A laboratory reports a patient, not a metaphase. Single cells lose a chromosome in the
preparation (a spread breaks, a chromosome lies outside the picture), so one deviating cell is
weak evidence; ISCN calls a clone only when a change repeats. The rule used here, with its
parameters:

- a cell's **findings** are read from its prediction row, only when the cell is called abnormal
  and not referred: each count deviation (``21:3``, ``X:1``) is one numerical finding; a cell
  called abnormal without any count deviation is a **structural** finding (the detector saw
  homologues differ in length, size or banding);
- a numerical finding makes the case abnormal when it repeats in at least ``min_repeats`` cells
  (default 2), or in every cell when the case has fewer cells than that (a case of one cell is
  judged on its one cell);
- a structural finding makes the case abnormal when seen in at least ``structural_cells``
  cells (default 1: a structural change is rarely an artefact of the preparation);
- a case that is not called abnormal but has a referred cell is referred; otherwise it is normal
  with the confidence of its least confident cell.

A case's **score** (for its AUC) is the k-th largest P(abnormal) of its cells, k = ``min(min_repeats,
n cells)``: the probability that the repeat rule's weakest needed cell is abnormal. A case's true
label is abnormal when any of its cells is.

``evaluate_by_group(RUN)`` writes ``predictions_by_group.csv`` and ``metrics_by_group.json`` beside
the run's ``predictions.csv`` / ``metrics.json`` (which stay per cell).
"""

import csv
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from karyo.atomic import atomic_write_text, write_csv
from karyo.errors import KaryoError
from karyo.uncertainty.confidence import read_predictions

#: Defaults of the case rule (see the module docstring).
MIN_REPEATS, STRUCTURAL_CELLS = 2, 1
#: Files written beside a run's predictions.csv and metrics.json.
CASE_PREDICTIONS_FILE, CASE_METRICS_FILE = "predictions_by_group.csv", "metrics_by_group.json"
CASE_COLUMNS = ("group", "n_cells", "label", "pred_label", "refer", "score", "findings", "cells_abnormal",
                "cells_referred")
STRUCTURAL = "structural"


def cell_findings(row):
    """A prediction row's findings: its count deviations, or ``["structural"]``; none unless called abnormal
    and accepted."""
    if row["pred_label"] != "abnormal" or _flag(row["refer"]):
        return []
    deviations = [t for t in str(row.get("count_deviations") or "").split(";") if t]
    return deviations or [STRUCTURAL]


def _flag(value):
    return value.strip().lower() in ("true", "1", "yes") if isinstance(value, str) else bool(value)


def case_calls(rows, groups=None, min_repeats=MIN_REPEATS, structural_cells=STRUCTURAL_CELLS):
    """Combine per-cell prediction rows into one row per case (see the module docstring for the rule).

    Args:
        rows: prediction rows (``pred_label``, ``mean_prob``, ``confidence``, ``refer``, optional
            ``label`` and ``count_deviations``).
        groups: the case of each row; default the rows' ``group`` column.
        min_repeats: cells that must share a numerical finding (capped at the case's cells).
        structural_cells: cells that must show a structural finding.

    Returns:
        list of dicts with :data:`CASE_COLUMNS`, cases in order of first appearance.

    Raises:
        KaryoError: a row without a case, or a parameter below 1.
    """
    if min_repeats < 1 or structural_cells < 1:
        raise KaryoError(f"min_repeats {min_repeats} and structural_cells {structural_cells} must be at least 1")
    rows = list(rows)
    groups = [r.get("group") for r in rows] if groups is None else list(groups)
    by_case = defaultdict(list)
    for row, group in zip(rows, groups):
        if not group:
            raise KaryoError(f"{row.get('path', 'a prediction')}: no case (group) to combine its cell by")
        by_case[group].append(row)
    out = []
    for group, cells in by_case.items():
        n = len(cells)
        findings = Counter(f for c in cells for f in set(cell_findings(c)))
        need = min(min_repeats, n)
        established = sorted(f for f, k in findings.items()
                             if k >= (min(structural_cells, n) if f == STRUCTURAL else need))
        referred = sum(_flag(c["refer"]) for c in cells)
        probs = sorted((float(c["mean_prob"]) for c in cells), reverse=True)
        labels = [c.get("label") or "" for c in cells]
        truth = "abnormal" if "abnormal" in labels else ("normal" if all(labels) else "")
        out.append({
            "group": group, "n_cells": n, "label": truth,
            "pred_label": "abnormal" if established else "normal",
            "refer": bool(not established and referred),
            "score": probs[need - 1],
            "findings": ";".join(f"{f}x{findings[f]}" for f in established),
            "cells_abnormal": sum(c["pred_label"] == "abnormal" for c in cells),
            "cells_referred": referred,
        })
    return out


def case_metrics(cases):
    """Accuracy, recall, specificity, false-positive rate, precision, AUC and referral of case calls.

    Referred cases count in the referral rate, and their calls (normal) in the rest, as the per-cell
    metrics do; the AUC ranks the cases by their ``score`` (None with one class only).
    """
    from sklearn.metrics import roc_auc_score

    cases = [c for c in cases if c["label"]]
    if not cases:
        raise KaryoError("no case has a true label to measure against")
    y = np.array([c["label"] == "abnormal" for c in cases])
    p = np.array([c["pred_label"] == "abnormal" for c in cases])
    score = np.array([float(c["score"]) for c in cases])
    tp, fp = int((y & p).sum()), int((~y & p).sum())
    pos, neg = int(y.sum()), int((~y).sum())
    return {
        "n_cases": len(cases), "abnormal_cases": pos, "normal_cases": neg,
        "accuracy": float((y == p).mean()),
        "recall": tp / pos if pos else None,
        "specificity": (neg - fp) / neg if neg else None,
        "false_positive_rate": fp / neg if neg else None,
        "precision": tp / (tp + fp) if tp + fp else None,
        "auc": float(roc_auc_score(y, score)) if 0 < pos < len(y) else None,
        "referral_rate": float(np.mean([bool(c["refer"]) for c in cases])),
        "missed_cases": [c["group"] for c in cases if c["label"] == "abnormal" and c["pred_label"] != "abnormal"],
        "false_positive_cases": [c["group"] for c in cases if c["label"] == "normal" and c["pred_label"] == "abnormal"],
    }


def _groups_of(run_dir, rows):
    """Each prediction row's case: its ``group`` column, or the run's ``split.csv`` matched by path."""
    if rows and all(r.get("group") for r in rows):
        return [r["group"] for r in rows]
    split = Path(run_dir) / "split.csv"
    if not split.is_file():
        raise KaryoError(f"{run_dir}: predictions.csv has no group column and the run has no split.csv")
    with open(split, newline="", encoding="utf-8") as fh:
        group_of = {r["path"]: r.get("group", "") for r in csv.DictReader(fh)}
    return [group_of.get(r["path"], "") for r in rows]


def evaluate_by_group(run_dir, min_repeats=MIN_REPEATS, structural_cells=STRUCTURAL_CELLS):
    """Case-level calls of a run's test predictions: ``predictions_by_group.csv`` and ``metrics_by_group.json``.

    Returns:
        the case metrics dict (also written, with the rule's parameters, to ``metrics_by_group.json``).

    Raises:
        KaryoError: no predictions.csv, or a prediction without a case.
    """
    run_dir = Path(run_dir)
    rows = read_predictions(run_dir / "predictions.csv")
    cases = case_calls(rows, _groups_of(run_dir, rows), min_repeats, structural_cells)
    write_csv(run_dir / CASE_PREDICTIONS_FILE, cases, CASE_COLUMNS)
    metrics = case_metrics(cases)
    metrics.update({"min_repeats": int(min_repeats), "structural_cells": int(structural_cells),
                    "n_cells": len(rows), "rule": "numerical finding in >= min(min_repeats, cells of the case) "
                    "accepted abnormal cells, or a structural finding (abnormal call without a count deviation) in "
                    ">= structural_cells cells"})
    atomic_write_text(run_dir / CASE_METRICS_FILE, json.dumps(metrics, indent=2) + "\n")
    return metrics
