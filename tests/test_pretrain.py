"""Chromosome pretraining: synthetic crops, the pretraining run, and ``--weights chromosome``."""

import csv
import json

import numpy as np
import pytest

from karyo.experiments import pretrain as pretrain_module
from karyo.karyograms import chromosome_synth
from karyo.models.network import build_backbone
from karyo.models.weights import weights_identity
from karyo.karyograms.chromosome_synth import default_crop_size, synthetic_chromosomes
from karyo.errors import KaryoError
from karyo.karyograms.layout import slot_boxes
from karyo.data.manifest import CHROMOSOME_LABELS


def _foreground_height(crop, stain):
    gray = crop[:, :, 0].astype(int)
    background = int(np.median(np.concatenate([gray[0], gray[-1]])))
    rows = np.nonzero((np.abs(gray - background) > 25).any(axis=1))[0]
    return 0 if rows.size == 0 else rows.max() - rows.min() + 1


def test_synthetic_chromosomes_are_deterministic_and_every_class_appears():
    images, labels = synthetic_chromosomes(60, 32, 64, seed=3, stain="both")
    again, labels_again = synthetic_chromosomes(60, 32, 64, seed=3, stain="both")
    other, _ = synthetic_chromosomes(60, 32, 64, seed=4, stain="both")
    assert images.shape == (60, 32, 32, 3) and images.dtype == np.uint8
    assert np.array_equal(images, again) and np.array_equal(labels, labels_again)
    assert not np.array_equal(images, other)
    assert set(labels[:48].tolist()) == set(range(len(CHROMOSOME_LABELS)))  # two whole cells
    assert np.bincount(labels[:48], minlength=24).tolist() == [2] * 24
    # "both": the first cell is G-banded (light field), the second Q-banded (dark field).
    assert np.median(images[:24, 0]) > 200 and np.median(images[24:48, 0]) < 60


def test_chromosomes_are_drawn_at_karyogram_scale_not_stretched():
    size = 128
    images, labels = synthetic_chromosomes(24 * 4, default_crop_size(size), size, seed=0, stain="g",
                                           augment=False)
    heights = {k: [_foreground_height(im, "g") for im, lab in zip(images, labels) if lab == k]
               for k in (0, 20)}  # chromosome 1 and chromosome 21
    x0, y0, x1, y1 = slot_boxes(size)["1"]
    assert max(heights[0]) <= (y1 - y0) + 2  # never taller than the karyogram's slot
    assert np.mean(heights[0]) > 2.5 * np.mean(heights[20])  # relative sizes are kept
    assert default_crop_size(64) == 32 and default_crop_size(416, 75) > 75


def test_bad_arguments_raise_one_line_errors():
    for kwargs in ({"n": 0}, {"stain": "x"}, {"karyogram_size": 20}, {"crop_size": 4}):
        args = {"n": 4, "crop_size": 32, "karyogram_size": 64, **kwargs}
        with pytest.raises(KaryoError) as info:
            synthetic_chromosomes(**args)
        assert "\n" not in str(info.value)
    with pytest.raises(KaryoError, match="nothing to pretrain"):
        pretrain_module.pretrain("vgg16", "unused", n_synthetic=0)


def _read_predictions(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_tiny_pretraining_writes_a_card_that_predictions_reproduce(tmp_path):
    from sklearn.metrics import accuracy_score, f1_score

    out = pretrain_module.pretrain("vgg16", tmp_path / "pre", image_size=32, karyogram_size=64,
                                   epochs=1, n_synthetic=120, progress=False)
    card = json.loads((out / "card.json").read_text())
    for name in ("backbone.weights.h5", "model.keras", "predictions.csv", "history.csv", "figures/confusion_matrix.png",
                 "figures/training_curves.png"):
        assert (out / name).is_file(), name
    assert card["backbone"] == "vgg16" and card["image_size"] == 32 and card["karyogram_size"] == 64
    assert card["epochs"] == 1 and len(card["epoch_seconds"]) == 1 and card["seconds"] > 0
    rows = _read_predictions(out / "predictions.csv")
    assert len(rows) == card["n_held_out"] == 24
    labels, pred = [r["label"] for r in rows], [r["pred_label"] for r in rows]
    present = sorted(set(labels) | set(pred))
    assert card["accuracy"] == pytest.approx(accuracy_score(labels, pred))
    assert card["macro_f1"] == pytest.approx(f1_score(labels, pred, labels=present, average="macro",
                                                      zero_division=0))
    assert not list(tmp_path.glob(".*"))  # no backup or partial folder left behind
    # The weights are the backbone's own: they load into a VGG16 of another input size.
    saved = build_backbone("vgg16", 32, str(out / "backbone.weights.h5"))
    fresh = build_backbone("vgg16", 32, "none", seed=0)
    assert not np.array_equal(saved.get_weights()[0], fresh.get_weights()[0])
    assert all(w.dtype == np.float32 for w in saved.get_weights())


def _tiny_cache(monkeypatch, tmp_path):
    """Make the cached pretraining tiny (48 crops, 1 epoch) and keep it under tmp_path."""
    monkeypatch.setenv("KARYO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pretrain_module, "DEFAULT_N_SYNTHETIC", 48)
    monkeypatch.setattr(pretrain_module, "DEFAULT_EPOCHS", 1)


@pytest.mark.slow
def test_weights_chromosome_yields_the_cached_file_and_a_model_built_from_it(monkeypatch, tmp_path, capsys):
    from karyo.models.network import build_model

    _tiny_cache(monkeypatch, tmp_path)
    arg, used, note = pretrain_module.starting_weights("chromosome", "vgg16", 64)
    first = capsys.readouterr().out
    assert used == "chromosome" and arg.endswith("backbone.weights.h5")
    assert str(tmp_path / "cache" / "pretrained") in arg and arg in note
    assert first.count("pretraining vgg16") == 1 and "min" in first
    again = pretrain_module.starting_weights("chromosome", "vgg16", 64)
    assert again[0] == arg and "pretraining" not in capsys.readouterr().out  # built once
    assert weights_identity(used, arg) == weights_identity(again[1], again[0])
    assert weights_identity(used, arg).startswith("chromosome:vgg16-")
    # Another karyogram size is another pretraining (another scale).
    assert pretrain_module.starting_weights("chromosome", "vgg16", 96)[0] != arg
    model = build_model("vgg16", 64, weights=arg, seed=1)
    reference = build_backbone("vgg16", 32, arg)
    assert all(np.array_equal(a, b) for a, b in
               zip(model.get_layer("backbone").get_weights(), reference.get_weights()))


def test_auto_offline_falls_back_to_chromosome_weights_never_random(monkeypatch, tmp_path):
    import keras

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: [Errno -2] Name or service not known")

    fake = tmp_path / "backbone.weights.h5"
    fake.write_bytes(b"weights")
    calls = []
    monkeypatch.setattr(keras.utils, "get_file", offline)
    monkeypatch.setattr(pretrain_module, "chromosome_weights",
                        lambda backbone, image_size, *a, **k: calls.append((backbone, image_size)) or fake)
    arg, used, note = pretrain_module.starting_weights("auto", "inceptionv3", 75)
    assert (arg, used) == (str(fake), "chromosome")
    assert calls == [("inceptionv3", 75)]
    assert "chromosome-pretrained" in note and "Name or service not known" in note
    assert "random" not in note


@pytest.mark.slow
def test_cli_pretrain_writes_the_folder_and_refuses_bad_input(tmp_path, capsys):
    from karyo.cli import main

    out = tmp_path / "pre"
    assert main(["pretrain", "--backbone", "vgg16", "--image-size", "32", "--n-synthetic", "48",
                 "--epochs", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Macro-F1" in printed and str(out / "backbone.weights.h5") in printed
    assert (out / "card.json").is_file()
    assert main(["pretrain", "--backbone", "alexnet", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "alexnet" in err[0]
    assert main(["pretrain", "--backbone", "vgg16", "--image-size", "16", "--out", str(tmp_path / "y")]) == 2
    assert not (tmp_path / "y").exists()


@pytest.mark.realdata
def test_real_crops_are_presented_at_their_cells_karyogram_scale(shared_data, tmp_path):
    from karyo.karyograms.assemble import chromosome_manifest

    manifest = chromosome_manifest(shared_data / "gband612", tmp_path / "chrom", cells=8, progress=False)
    x, y, rows = pretrain_module.real_chromosomes(manifest, 32, 64, progress=False)
    assert x.shape[1:] == (32, 32, 3) and len(x) == len(y) == len(rows) >= 80
    heights = {k: np.mean([_foreground_height(im, "g") for im, lab in zip(x, y) if lab == k]) for k in (0, 20)}
    assert heights[0] > 2 * heights[20]  # scaled per cell, not each stretched to its own box
    assert np.median(x[:, 0]) > 200  # white field
    kept = pretrain_module.real_chromosomes(manifest, 32, 64, exclude_groups=[rows[0]["group"]],
                                            progress=False)[2]
    assert all(r["group"] != rows[0]["group"] for r in kept)


def test_chromosome_synth_is_importable_without_tensorflow():
    import subprocess
    import sys

    # The renderer belongs to karyo.karyograms, which never needs TensorFlow (the pretraining
    # itself, in karyo.experiments, does).
    code = "import sys, karyo.karyograms.chromosome_synth; print('tensorflow' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr[-500:]
    assert chromosome_synth.STAIN_CHOICES == ("g", "q", "both")


def test_the_note_says_when_chromosome_weights_are_no_better_than_random(tmp_path):
    """Weights whose pretraining stayed at chance are called what they are in every run's note."""
    import json

    (tmp_path / "card.json").write_text(json.dumps({"accuracy": 0.042, "macro_f1": 0.003}))
    assert "as good as random" in pretrain_module.pretraining_quality(tmp_path)
    (tmp_path / "card.json").write_text(json.dumps({"accuracy": 0.62, "macro_f1": 0.58}))
    quality = pretrain_module.pretraining_quality(tmp_path)
    assert "better than chance" in quality and "0.620" in quality
    assert "unknown" in pretrain_module.pretraining_quality(tmp_path / "missing")
