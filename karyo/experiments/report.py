"""The reproduction report: Table 5.1 beside the thesis, under both split protocols.

``write_report(out)`` reads only what the runs left on disk (``runs/<protocol>/<name>/``
``metrics.json`` and ``config.json``, ``predictions.csv``, ``tuning/``), so ``karyo report``
can rebuild it at any time without training. It writes ``report.md`` and ``report.html``
with the same content, and the overlaid ROC figures under ``figures/``.
"""

import csv
import html
import json
import os
import statistics
from pathlib import Path

from karyo.atomic import atomic_write_text
from karyo.data.imageio import decode_image
from karyo.errors import ImageError, KaryoError
from karyo.experiments import figures
from karyo.experiments.registry import EXPERIMENTS, THESIS_EXPERIMENTS
from karyo.uncertainty.metrics import BOOTSTRAP_RESAMPLES, metric_intervals

PROTOCOL_TEXT = {
    "thesis": "augment, then split per image (as published: copies of a karyogram on both sides)",
    "grouped": "split by group, then augment the training part only (leakage-free)",
}
METRICS = ("accuracy", "precision", "recall", "auc")
#: Thumbnails per row of the detector's gallery (confident calls, referred cells).
GALLERY_SIZE = 4


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def collect_runs(out):
    """``{protocol: {name: {"dir", "metrics", "config"}}}`` of the finished runs under ``out/runs``."""
    runs = {}
    base = Path(out) / "runs"
    if not base.is_dir():
        return runs
    for protocol_dir in sorted(p for p in base.iterdir() if p.is_dir()):
        for run in sorted(p for p in protocol_dir.iterdir() if p.is_dir()):
            metrics = _read_json(run / "metrics.json")
            if metrics is None:
                continue
            runs.setdefault(protocol_dir.name, {})[run.name] = {
                "dir": run, "metrics": metrics, "config": _read_json(run / "config.json") or {},
            }
    return runs


def _fmt(value, digits=2):
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _read_predictions(run_dir):
    path = Path(run_dir) / "predictions.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


class _Doc:
    """The report's content, rendered to Markdown and to HTML from one list of blocks."""

    def __init__(self, out):
        self.out = Path(out)
        self.blocks = []

    def heading(self, text, level=2):
        self.blocks.append(("h", level, text))

    def para(self, text):
        self.blocks.append(("p", text))

    def table(self, headers, rows):
        self.blocks.append(("t", headers, rows))

    def image(self, path, alt):
        self.blocks.append(("img", os.path.relpath(path, self.out), alt))

    def markdown(self):
        lines = []
        for block in self.blocks:
            if block[0] == "h":
                lines += ["#" * block[1] + " " + block[2], ""]
            elif block[0] == "p":
                lines += [block[1], ""]
            elif block[0] == "t":
                headers, rows = block[1], block[2]
                lines.append("| " + " | ".join(headers) + " |")
                lines.append("|" + "|".join("---" for _ in headers) + "|")
                lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
                lines.append("")
            elif block[0] == "img":
                lines += [f"![{block[2]}]({block[1]})", ""]
        return "\n".join(lines)

    def html(self, title):
        import re

        def inline(text):
            text = html.escape(text)
            text = re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>', text)
            return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)

        parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
                 "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
                 "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:3px 8px;"
                 "text-align:right}th{background:#eee}td:first-child{text-align:left}"
                 "img{max-width:48%;margin:4px}</style></head><body>"]
        for block in self.blocks:
            if block[0] == "h":
                parts.append(f"<h{block[1]}>{inline(block[2])}</h{block[1]}>")
            elif block[0] == "p":
                parts.append(f"<p>{inline(block[1])}</p>")
            elif block[0] == "t":
                parts.append("<table><tr>" + "".join(f"<th>{inline(h)}</th>" for h in block[1]) + "</tr>")
                for row in block[2]:
                    parts.append("<tr>" + "".join(f"<td>{inline(str(c))}</td>" for c in row) + "</tr>")
                parts.append("</table>")
            elif block[0] == "img":
                parts.append(f"<img src='{html.escape(block[1])}' alt='{html.escape(block[2])}'>")
        parts.append("</body></html>")
        return "\n".join(parts)


def write_report(out, preset=None, seconds=None):
    """Build ``out/report.md`` and ``out/report.html`` from the run folders; return the .md path.

    Raises:
        KaryoError: ``out`` holds no finished run.
    """

    out = Path(out)
    runs = collect_runs(out)
    if not runs:
        raise KaryoError(f"{out}: no finished runs under {out / 'runs'} (run 'karyo reproduce' first)")
    doc = _Doc(out)
    doc.heading("karyo: reproduction of the thesis' Table 5.1", 1)
    intro = ("Thesis: *Machine Learning for Automation of Chromosome based Genetic Diagnostics* (KTH, 2020). "
             "Abnormal is the positive class. Each test image is scored with MC Dropout (majority of the "
             "passes; confidence = share of votes; referred to manual review below the threshold).")
    doc.para(intro)
    if preset:
        doc.para(f"Preset **{preset.get('name')}**: image sizes {dict(preset.get('image_size', ()))}, "
                 f"{preset.get('epochs')} head epochs + {preset.get('fine_tune_epochs')} fine-tuning epochs, "
                 f"weights requested `{preset.get('weights')}`, {preset.get('mc_passes')} MC passes."
                 + (f" Wall time {seconds / 60:.1f} min." if seconds else ""))
    any_run = next(iter(next(iter(runs.values())).values()))
    cfg = any_run["config"]
    doc.para(f"Data: `{cfg.get('data', {}).get('manifest', '?')}` (sha256 "
             f"`{str(cfg.get('data', {}).get('sha256', '?'))[:16]}…`). Weights used: "
             f"`{cfg.get('weights_used', '?')}`" + (f" ({cfg['weights_note']})" if cfg.get("weights_note") else "")
             + ". Numbers are not comparable with the thesis' when the data or the weights differ; "
             "what should carry over is the ordering of the rows and the leakage effect.")

    _table_51(doc, runs)
    _across_seeds(doc, out, runs)
    _leakage(doc, runs)
    _referral(doc, runs)
    _roc_overlays(doc, out, runs, figures)
    _per_abnormality(doc, runs)
    _wrong_tables(doc, runs)
    _detector_gallery(doc, out, runs)
    _tuning(doc, out)

    md = out / "report.md"
    atomic_write_text(md, doc.markdown() + "\n")
    atomic_write_text(out / "report.html", doc.html("karyo reproduction report") + "\n")
    return md


def _link(run, out_rel):
    return f"[{run['dir'].name}]({out_rel}/config.json)"


def _table_51(doc, runs):
    doc.heading("Table 5.1 reproduced")
    thesis_counts_note = []
    for protocol in ("thesis", "grouped"):
        if protocol not in runs:
            continue
        doc.heading(f"Protocol `{protocol}`: {PROTOCOL_TEXT[protocol]}", 3)
        rows = []
        for exp in THESIS_EXPERIMENTS:
            run = runs[protocol].get(exp.name)
            t = exp.thesis
            if run is None:
                rows.append([exp.title, exp.name] + ["–"] * 7 + [_fmt(getattr(t, m)) for m in METRICS])
                continue
            m = run["metrics"]
            rel = os.path.relpath(run["dir"], doc.out)
            rows.append([exp.title, _link(run, rel)] + [_fmt(m.get(k)) for k in METRICS]
                        + _interval_cells(run) + [_fmt(getattr(t, k)) for k in METRICS])
        doc.table(["network and conditions", "run", "accuracy", "precision", "recall", "AUC",
                   "AUC 95 % CI", "recall 95 % CI", "better than chance",
                   "thesis acc", "thesis prec", "thesis recall", "thesis AUC"], rows)
        doc.para(INTERVAL_TEXT)
    for exp in THESIS_EXPERIMENTS:
        r = exp.thesis.recomputed()
        if abs(r["accuracy"] - exp.thesis.accuracy) > 0.015 or r["n"] not in (30, 139):
            thesis_counts_note.append(
                f"{exp.name} (section {exp.thesis.section}): its confusion counts give accuracy "
                f"{r['accuracy']:.3f} on {r['n']} images, the table says {exp.thesis.accuracy:.2f} "
                f"(the test split had {30 if not exp.augmented else 139} images)")
    if thesis_counts_note:
        doc.para("Where the thesis disagrees with itself: " + "; ".join(thesis_counts_note) + ".")


INTERVAL_TEXT = (
    "Intervals: 95 % percentile bootstrap over the test set's groups (cases; a karyogram and its "
    "augmented copies are one group), stratified by class, "
    f"{BOOTSTRAP_RESAMPLES} resamples. **better than chance**: the AUC's lower bound is above 0.5. "
    "With a handful of abnormal test groups an interval is wide: read it before the point value.")


def interval_of(run):
    """``metric_intervals`` of a run's predictions.csv; None when it has none or one class."""
    rows = _read_predictions(run["dir"])
    if not rows or not all(r.get("label") and r.get("pred_label") for r in rows):
        return None
    return metric_intervals(rows)


def _interval_cells(run):
    ci = interval_of(run)
    if ci is None or ci["auc"][0] is None:
        return ["–", "–", "–"]
    auc, recall = ci["auc"], ci["recall"]
    verdict = "yes" if auc[0] > 0.5 else "no"
    return [f"[{auc[0]:.2f}, {auc[1]:.2f}]", f"[{recall[0]:.2f}, {recall[1]:.2f}]",
            f"{verdict} ({ci['n_groups']} groups)"]


def collect_seed_runs(out, runs=None):
    """``{seed: collect_runs(...)}``: the first seed's runs in ``out`` and each ``out/seeds/<seed>``."""
    out = Path(out)
    runs = collect_runs(out) if runs is None else runs
    first = next((r["config"].get("seed") for p in runs.values() for r in p.values()), 0)
    found = {str(first): runs}
    seeds_dir = out / "seeds"
    if seeds_dir.is_dir():
        for folder in sorted(seeds_dir.iterdir(), key=lambda f: (len(f.name), f.name)):
            if folder.is_dir() and (more := collect_runs(folder)):
                found[folder.name] = more
    return found


def mean_sd(values):
    """``"0.81 ± 0.05"`` of the defined values (the sample standard deviation), ``–`` if none."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _across_seeds(doc, out, runs):
    by_seed = collect_seed_runs(out, runs)
    if len(by_seed) < 2:
        return
    doc.heading(f"Across {len(by_seed)} seeds")
    doc.para("Each seed draws its own split, augmentation, initial head weights and dropout masks "
             f"(seeds {', '.join(str(s) for s in by_seed)}). Mean ± standard deviation over the seeds "
             "whose run finished; the table above is the first seed's.")
    for protocol in ("thesis", "grouped"):
        rows = []
        for exp in EXPERIMENTS.values():
            metrics = [r[protocol][exp.name]["metrics"] for r in by_seed.values()
                       if exp.name in r.get(protocol, {})]
            if not metrics:
                continue
            rows.append([exp.name, len(metrics)] + [mean_sd([m.get(k) for m in metrics]) for k in METRICS]
                        + [f"{sum((m.get('auc') or 0) > 0.5 for m in metrics)}/{len(metrics)}"])
        if rows:
            doc.heading(f"Protocol `{protocol}`", 3)
            doc.table(["experiment", "seeds", "accuracy", "precision", "recall", "AUC", "AUC above 0.5"], rows)


def _near_copies(run):
    """'131 / 139 (94 %)': test images with a near-identical training image (``karyo.data.leakage``)."""
    test = (run["config"].get("data", {}).get("leakage") or {}).get("parts", {}).get("test")
    if not test or not test.get("images"):
        return "–"
    return f"{test['with_train_match']} / {test['images']} ({100 * test['with_train_match'] / test['images']:.0f} %)"


def _leakage(doc, runs):
    if not ("thesis" in runs and "grouped" in runs):
        return
    doc.heading("The leakage effect")
    doc.para("Difference `thesis` minus `grouped` protocol, per row. With augmentation, the thesis' "
             "protocol tests on near-copies of training images; a positive difference is the "
             "optimism that leakage adds. The last column counts them: test images whose "
             "perceptual hash lies within the leakage guard's threshold of a training image's "
             "(`karyo.data.leakage`; under `grouped` any such pair stops the run).")
    rows = []
    for exp in THESIS_EXPERIMENTS:
        a, b = runs["thesis"].get(exp.name), runs["grouped"].get(exp.name)
        if a is None or b is None:
            continue
        cells = []
        for k in METRICS:
            x, y = a["metrics"].get(k), b["metrics"].get(k)
            cells.append("–" if x is None or y is None else f"{x - y:+.2f}")
        rows.append([exp.name, "yes" if exp.augmented else "no"] + cells + [_near_copies(a)])
    doc.table(["experiment", "augmented", "Δ accuracy", "Δ precision", "Δ recall", "Δ AUC",
               "thesis: test images with a near copy in training"], rows)


def _referral(doc, runs):
    doc.heading("Confidence and referral to manual review")
    doc.para("Referral rate: share of test karyograms whose confidence is below the threshold. "
             "Retained accuracy / recall: on the karyograms that are not referred. ECE: expected "
             "calibration error (15 bins) of the MC mean probability; AURC: area under the "
             "risk-coverage curve (lower is better).")
    rows = []
    for protocol, by_name in runs.items():
        for name, run in by_name.items():
            m = run["metrics"]
            rows.append([protocol, name, m.get("uncertainty", ""), _fmt(m.get("referral_rate")),
                         _fmt(m.get("retained_accuracy")), _fmt(m.get("retained_recall")),
                         _fmt(m.get("ece"), 3), _fmt(m.get("brier"), 3), _fmt(m.get("aurc"), 3),
                         _fmt(m.get("mcc")), _fmt(m.get("g_mean"))])
    doc.table(["protocol", "experiment", "uncertainty", "referral rate", "retained acc",
               "retained recall", "ECE", "Brier", "AURC", "MCC", "G-mean"], rows)


def _roc_overlays(doc, out, runs, figures):
    groups = {
        "vgg16": ("VGG16: frozen, last block, last two blocks (thesis Fig. 4.19)",
                  ("vgg16_augmented", "vgg16_unfreeze1", "vgg16_unfreeze2")),
        "inceptionv3": ("InceptionV3: frozen vs entire network trained (thesis Fig. 4.22)",
                        ("inceptionv3_augmented", "inceptionv3_unfreeze_all")),
    }
    shown = False
    for protocol, by_name in runs.items():
        for key, (title, names) in groups.items():
            curves = {}
            for name in names:
                if name not in by_name:
                    continue
                rows = _read_predictions(by_name[name]["dir"])
                labels = [1 if r["label"] == "abnormal" else 0 for r in rows]
                if len(set(labels)) == 2:
                    curves[EXPERIMENTS[name].title] = (labels, [float(r["mean_prob"]) for r in rows])
            if len(curves) >= 2:
                if not shown:
                    doc.heading("ROC curves")
                    shown = True
                path = out / "figures" / f"roc_{key}_{protocol}.png"
                figures.plot_roc_curves(curves, path, title=f"{title} [{protocol}]")
                doc.image(path, f"{title} ({protocol})")


def _per_abnormality(doc, runs):
    rows = []
    for protocol, by_name in runs.items():
        for name, run in by_name.items():
            table = run["metrics"].get("recall_by_abnormality")
            if not table:
                continue
            for entry in table if isinstance(table, list) else []:
                rows.append([protocol, name] + [_fmt(entry.get(k)) for k in
                                                ("abnormality", "n", "n_correct", "recall", "n_referred",
                                                 "n_missed")])
    if rows:
        doc.heading("Per-abnormality recall")
        doc.para("Which karyotypes the models miss (test set). For `none` (normal karyograms) the "
                 "'recall' column is the specificity. Missed = wrong and not referred: the errors "
                 "nobody would look at.")
        doc.table(["protocol", "experiment", "abnormality", "n", "correct", "recall", "referred",
                   "missed"], rows)


def _wrong_tables(doc, runs):
    doc.heading("Wrongly predicted test images (thesis Tables 4.1 / 4.2)")
    for protocol, by_name in runs.items():
        for name in ("vgg16_augmented", "inceptionv3_augmented"):
            run = by_name.get(name)
            if run is None:
                continue
            rows = [r for r in _read_predictions(run["dir"]) if r["label"] and r["label"] != r["pred_label"]]
            doc.heading(f"{name} [{protocol}]: {len(rows)} wrong", 3)
            if rows:
                doc.table(["image", "predicted", "actual", "mean softmax", "confidence score"],
                          [[Path(r["path"]).name, r["pred_label"], r["label"], _fmt(float(r["mean_prob"]), 3),
                            f"{float(r['confidence']):.0%}"] for r in rows[:25]])


def _tuning(doc, out):
    folder = out / "tuning"
    best = _read_json(folder / "best.json")
    if best is None:
        return
    doc.heading("Bayesian search over learning rate and batch size (thesis 3.2)")
    hp = best.get("hyperparameters", best)
    doc.para("Best trial (lowest validation loss): " + ", ".join(f"{k} = {v}" for k, v in hp.items())
             + ". The thesis chose lr 1e-3 and batch 16 and reported lr in [7e-4, 3e-2] working; the "
             "rows above use the thesis' choice.")
    for name in ("val_loss_vs_lr.png", "val_loss_vs_batch_size.png"):
        path = folder / "figures" / name
        if path.is_file():
            doc.image(path, name)


def gallery_rows(predictions, n=GALLERY_SIZE):
    """The detector gallery's picks: ``{"confident calls": rows, "referred cells": rows}``.

    Confident calls: the accepted abnormal calls with the highest P(abnormal) first (half the row at
    most), then the accepted normal calls with the lowest; referred cells: the least confident first.
    """
    accepted = [r for r in predictions if str(r["refer"]).lower() not in ("true", "1")]
    referred = [r for r in predictions if str(r["refer"]).lower() in ("true", "1")]
    abnormal = sorted((r for r in accepted if r["pred_label"] == "abnormal"), key=lambda r: -float(r["mean_prob"]))
    normal = sorted((r for r in accepted if r["pred_label"] != "abnormal"), key=lambda r: float(r["mean_prob"]))
    confident = abnormal[:max(n // 2, n - len(normal))]
    confident += normal[:n - len(confident)]
    return {"confident calls": confident,
            "referred cells": sorted(referred, key=lambda r: float(r["confidence"]))[:n]}


def _detector_gallery(doc, out, runs):
    """For each detector run: a gallery of confident calls and of referred cells (thumbnails, P, confidence)."""
    for protocol, by_name in runs.items():
        for name, run in by_name.items():
            if run["config"].get("kind") != "detector":
                continue
            root = Path(run["config"].get("data", {}).get("root", run["dir"]))
            picks, missing = {}, 0
            for row_name, rows in gallery_rows(_read_predictions(run["dir"])).items():
                picks[row_name] = []
                for r in rows:
                    try:
                        image = decode_image(root / r["path"])
                    except ImageError:  # the data moved since the run: the table still says it all
                        missing += 1
                        continue
                    truth = f", true {r['label']}" if r.get("label") else ""
                    caption = (f"{Path(r['path']).stem}\n{r['pred_label']} P {float(r['mean_prob']):.2f}"
                               f"\nconfidence {float(r['confidence']):.0%}{truth}")
                    picks[row_name].append((image, caption))
            doc.heading(f"Karyotype detector gallery: {name} [{protocol}]", 3)
            path = out / "figures" / f"gallery_{name}_{protocol}.png"
            figures.plot_gallery(picks, path, title=f"{name} [{protocol}]: confident calls and referred cells")
            doc.para("Confident calls (accepted, abnormal calls with the highest P(abnormal) first) and "
                     "referred cells (below the confidence threshold, least confident first), test part."
                     + (f" {missing} picture(s) not found under `{root}`." if missing else ""))
            doc.image(path, f"detector gallery {name} {protocol}")
