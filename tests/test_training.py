"""Training runs end to end: run folders, resumption, predictions consistent with metrics."""

import csv
import json
import math

import cv2
import numpy as np
import pytest

from karyo.cli import main
from karyo.uncertainty.metrics import metrics_from_predictions
from karyo.experiments.registry import get_experiment
from karyo.data.manifest import import_folder, read_manifest, write_manifest
from karyo.experiments.training import train_experiment
from tests.common import write_karyograms

RUN_FILES = ("config.json", "split.csv", "history.csv", "model.keras", "predictions.csv",
             "metrics.json", "wrong_predictions.csv", "wrong_predictions.md")
FIGURES = ("training_curves.png", "confusion_matrix.png", "roc.png", "reliability.png",
           "risk_coverage.png", "confidence_histogram.png")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_karyograms(tmp_path_factory.mktemp("karyograms"))


@pytest.fixture(scope="module")
def vgg_run(manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "vgg16"
    code = main(["train", "vgg16_unfreeze1", "--data", str(manifest), "--out", str(out),
                 "--image-size", "32", "--weights", "none", "--epochs", "2", "--fine-tune-epochs", "1",
                 "--mc", "30", "--cache", str(out.parent / "cache")])
    assert code == 0
    return out


def test_train_writes_every_file_of_a_run_folder(vgg_run):
    for name in RUN_FILES:
        assert (vgg_run / name).is_file(), name
    for name in FIGURES:
        assert (vgg_run / "figures" / name).stat().st_size > 1000, name
    assert any((vgg_run / "logs").rglob("events.out.tfevents*"))
    config = json.loads((vgg_run / "config.json").read_text())
    assert config["weights_used"] == "none" and config["experiment"]["unfreeze"] == 1
    assert config["data"]["protocol"] == "grouped"
    with open(vgg_run / "history.csv") as fh:
        phases = [row["phase"] for row in csv.DictReader(fh)]
    assert phases == ["head", "head", "fine_tune"]


def test_predictions_are_consistent_with_metrics(vgg_run):
    with open(vgg_run / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    metrics = json.loads((vgg_run / "metrics.json").read_text())
    threshold = metrics["threshold"]
    for row in rows:
        confidence = float(row["confidence"])
        assert confidence >= 0.5
        assert (row["refer"] == "True") == (confidence < threshold)
        assert row["pred_label"] in ("normal", "abnormal")
    recomputed = metrics_from_predictions(rows)
    for key in ("accuracy", "precision", "recall", "auc", "tp", "fp", "tn", "fn", "referral_rate", "ece"):
        a, b = recomputed[key], metrics[key]
        assert (a is None and b is None) or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9), key
    assert metrics["tp"] + metrics["fp"] + metrics["tn"] + metrics["fn"] == len(rows)


def test_grouped_split_keeps_augmented_copies_with_their_source(vgg_run):
    with open(vgg_run / "split.csv") as fh:
        rows = list(csv.DictReader(fh))
    parts = {}
    for row in rows:
        parts.setdefault(row["group"], set()).add(row["split"])
    assert all(len(p) == 1 for p in parts.values())
    augmented = [r for r in rows if r["augmented"] == "1"]
    assert augmented and all(r["split"] == "train" for r in augmented)


def test_evaluate_and_predict_on_a_folder_with_a_corrupt_file(vgg_run, manifest, tmp_path, capsys):
    assert main(["evaluate", str(vgg_run), "--mc", "10"]) == 0
    assert json.loads((vgg_run / "metrics.json").read_text())["mc_passes"] == 10
    folder = tmp_path / "new"
    folder.mkdir()
    for src in sorted((manifest.parent / "abnormal").glob("*.png"))[:3]:
        (folder / src.name).write_bytes(src.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 20)
    capsys.readouterr()
    code = main(["predict", "--model", str(vgg_run), str(folder), "--mc", "10", "--out", str(tmp_path / "p.csv")])
    captured = capsys.readouterr()
    assert code == 1
    assert f"skipped {folder / 'broken.png'}: truncated PNG" in captured.err
    with open(tmp_path / "p.csv") as fh:
        scored = list(csv.DictReader(fh))
    assert sorted(r["path"].rsplit("/", 1)[-1] for r in scored) == ["k0.png", "k1.png", "k10.png"]


def test_existing_run_needs_resume_and_resume_skips_a_finished_run(vgg_run, manifest, capsys):
    code = main(["train", "vgg16_unfreeze1", "--data", str(manifest), "--out", str(vgg_run),
                 "--image-size", "32", "--weights", "none"])
    assert code == 2 and "pass --resume" in capsys.readouterr().err
    before = (vgg_run / "model.keras").stat().st_mtime_ns
    exp = get_experiment("vgg16_unfreeze1", image_size=32, weights="none")
    train_experiment(exp, manifest, vgg_run, resume=True, verbose=0)
    assert (vgg_run / "model.keras").stat().st_mtime_ns == before


@pytest.mark.slow
def test_inceptionv3_at_75_pixels(manifest, tmp_path):
    out = tmp_path / "inception"
    code = main(["train", "inceptionv3_augmented", "--data", str(manifest), "--out", str(out),
                 "--image-size", "75", "--weights", "none", "--epochs", "2", "--mc", "20",
                 "--cache", str(tmp_path / "cache")])
    assert code == 0
    for name in RUN_FILES:
        assert (out / name).is_file(), name


def test_bad_experiment_and_small_size_are_one_line_errors(manifest, tmp_path, capsys):
    assert main(["train", "vgg17", "--data", str(manifest), "--out", str(tmp_path / "r")]) == 2
    assert "unknown experiment 'vgg17'" in capsys.readouterr().err
    assert main(["train", "inceptionv3_augmented", "--data", str(manifest), "--out", str(tmp_path / "r"),
                 "--image-size", "32", "--weights", "none"]) == 2
    err = capsys.readouterr().err
    assert "75" in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_the_pipeline_learns_a_visible_difference(tmp_path):
    """A frozen random VGG16 + the thesis head separates karyograms that differ visibly
    (abnormal ones carry a dark block): proof that labels, images and predictions stay aligned."""
    root = tmp_path / "data"
    for label, count in (("normal", 40), ("abnormal", 30)):
        (root / label).mkdir(parents=True)
        for i in range(count):
            rng = np.random.default_rng(i + 1000 * (label == "abnormal"))
            image = np.full((64, 64), 255, np.uint8)
            for k in range(6):
                h = int(rng.integers(20, 50))
                image[4:4 + h, 4 + 10 * k:8 + 10 * k] = rng.integers(0, 90)
            if label == "abnormal":
                image[44:60, 44:60] = 0
            cv2.imwrite(str(root / label / f"{i}.png"), image)
    manifest = import_folder(root, root / "manifest.csv")
    exp = get_experiment("vgg16_augmented", image_size=32, weights="none", epochs=15, mc_passes=30)
    run = train_experiment(exp, manifest, tmp_path / "run", cache_dir=tmp_path / "cache", verbose=0,
                           progress=False)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["auc"] >= 0.95 and metrics["accuracy"] >= 0.9, metrics


@pytest.mark.slow
def test_deep_ensemble_pools_its_members(manifest, tmp_path, capsys):
    out = tmp_path / "ensemble"
    assert main(["train", "vgg16_augmented", "--data", str(manifest), "--out", str(out), "--image-size", "32",
                 "--weights", "none", "--epochs", "1", "--ensemble", "3", "--mc", "10",
                 "--cache", str(tmp_path / "cache")]) == 0
    assert sorted(p.parent.name for p in out.glob("member*/model.keras")) == ["member0", "member1", "member2"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["uncertainty"] == "deep ensemble" and metrics["mc_passes"] == 3
    with open(out / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    # Three members vote: the confidence of every image is 2/3 or 1.
    assert {round(float(r["confidence"]), 4) for r in rows} <= {0.6667, 1.0}
    assert main(["evaluate", str(out), "--mc", "5"]) == 0


def test_a_corrupt_image_stops_training_and_leaves_no_run_folder(tmp_path, capsys):
    manifest = write_karyograms(tmp_path / "data", normal=9, abnormal=6)
    victim = tmp_path / "data" / "normal" / "k3.png"
    victim.write_bytes(victim.read_bytes()[:40])
    write_manifest(manifest, [dict(r, sha256="") for r in read_manifest(manifest).rows])
    out = tmp_path / "run"
    assert main(["train", "vgg16_original", "--data", str(manifest), "--out", str(out), "--image-size", "32",
                 "--weights", "none", "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"karyo: error: {victim}: truncated PNG (no IEND chunk at the end)"]
    assert not out.exists()


def test_cross_stain_command_scores_another_set(vgg_run, manifest, capsys):
    capsys.readouterr()
    assert main(["cross-stain", str(vgg_run), str(manifest), "--mc", "5"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 30 and result["n_abnormal"] == 12
    assert 0.0 <= result["false_positive_rate"] <= 1.0 and 0.0 <= result["referral_rate"] <= 1.0


def test_run_records_every_input_sha256_and_its_leakage_check(vgg_run):
    from karyo.data.manifest import read_manifest, sha256_file

    data = json.loads((vgg_run / "config.json").read_text())["data"]
    split = read_manifest(vgg_run / "split.csv", root=data["split_root"])
    assert all(row["sha256"] == sha256_file(split.resolve(row)) for row in split.rows)
    assert data["split_sha256"] == sha256_file(vgg_run / "split.csv")
    assert data["leakage"]["protocol"] == "grouped" and data["leakage"]["pairs"] == 0


def _with_duplicates(tmp_path, n=6):
    """The karyogram set plus exact copies of n normal images, each copy its own group."""
    import shutil

    root = tmp_path / "data"
    write_karyograms(root)
    for i in range(n):
        shutil.copy(root / "normal" / f"k{i}.png", root / "normal" / f"copy{i}.png")
    return import_folder(root, root / "manifest.csv")


def test_copies_across_a_grouped_split_stop_the_run(tmp_path, capsys):
    data = _with_duplicates(tmp_path)
    out = tmp_path / "run"
    code = main(["train", "vgg16_original", "--data", str(data), "--out", str(out), "--image-size", "32",
                 "--weights", "none", "--epochs", "1", "--cache", str(tmp_path / "cache")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("karyo:")]
    assert code == 2 and len(err) == 1 and "near-identical" in err[0] and "copy" in err[0], err
    assert not out.exists()


def test_copies_across_a_thesis_split_are_counted(tmp_path, capsys):
    data = _with_duplicates(tmp_path)
    out = tmp_path / "run"
    code = main(["train", "vgg16_original", "--data", str(data), "--out", str(out), "--image-size", "32",
                 "--weights", "none", "--epochs", "1", "--mc", "5", "--split", "thesis",
                 "--cache", str(tmp_path / "cache")])
    assert code == 0
    leakage = json.loads((out / "config.json").read_text())["data"]["leakage"]
    assert leakage["protocol"] == "thesis" and leakage["pairs"] >= 1
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("karyo: warning:")]
    assert len(warning) == 1 and "near-identical" in warning[0]
