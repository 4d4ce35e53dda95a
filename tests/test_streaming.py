"""Scoring streams images chunk by chunk and gives exactly the scores of one in-memory array."""

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from karyo.data import pipeline  # noqa: E402
from karyo.data.imageio import write_image  # noqa: E402
from karyo.models.network import build_model  # noqa: E402
from karyo.data.pipeline import load_paths, stream_paths  # noqa: E402
from karyo.experiments.runs import pooled_passes  # noqa: E402


def pictures(n, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)).astype(np.uint8)


def chunks_of(x, chunk):
    return (x[i:i + chunk] for i in range(0, len(x), chunk))


@pytest.mark.slow
def test_streamed_passes_equal_one_array_for_a_model_and_an_ensemble():
    x = pictures(70)  # 70 = 2 chunks of 32 and a last one of 6
    single = [build_model("vgg16", 32, seed=0)]
    ensemble = [build_model("vgg16", 32, seed=1), build_model("vgg16", 32, seed=2)]
    for models in (single, ensemble):
        whole = pooled_passes(models, x, passes=6, seed=3)
        for chunk in (32, 64):
            assert np.array_equal(pooled_passes(models, chunks_of(x, chunk), passes=6, seed=3), whole)
        # a chunk that is no multiple of the MC batch moves the masks: why STREAM_CHUNK is one
        assert not np.array_equal(pooled_passes(models, chunks_of(x, 20), passes=6, seed=3), whole)
    assert pooled_passes(single, iter([]), passes=6).shape == (6, 0)
    assert pipeline.STREAM_CHUNK % 32 == 0


def test_stream_paths_keeps_chunks_full_across_skipped_files(tmp_path):
    paths = []
    for i, image in enumerate(pictures(7, size=40)):
        paths.append(tmp_path / f"k{i}.png")
        write_image(paths[-1], image)
    for i in (1, 4):
        paths[i].write_bytes(b"not an image")
    problems = []
    streamed = list(stream_paths(paths, 32, problems, chunk=2))
    assert [len(images) for images, _ in streamed] == [2, 2, 1]
    whole, good, bad = load_paths(paths, 32)
    assert np.array_equal(np.concatenate([images for images, _ in streamed]), whole)
    assert [p for _, chunk in streamed for p in chunk] == good
    assert problems == bad and [p for p, _ in problems] == [str(paths[1]), str(paths[4])]


@pytest.mark.slow
def test_predict_and_evaluate_stream_to_the_scores_of_training(tmp_path, monkeypatch, capsys):
    """``karyo evaluate`` and ``karyo predict`` (streamed, 32 images at a time) repeat the scores
    that training wrote from its in-memory arrays, byte for byte."""
    import csv

    from karyo.cli import main
    from karyo.karyograms.synth import synthesize

    data = synthesize(tmp_path / "syn", normal=30, abnormal=20, size=128, seed=2, progress=False)
    run = tmp_path / "run"
    assert main(["train", "vgg16_original", "--data", str(data), "--out", str(run), "--image-size", "32",
                 "--weights", "none", "--epochs", "1", "--mc", "7", "--cache", str(tmp_path / "cache")]) == 0
    trained = {name: (run / name).read_bytes() for name in ("predictions.csv", "metrics.json")}
    monkeypatch.setattr(pipeline, "STREAM_CHUNK", 32)
    assert main(["evaluate", str(run), "--mc", "7"]) == 0
    assert {name: (run / name).read_bytes() for name in trained} == trained

    import json

    root = json.loads((run / "config.json").read_text())["data"]["split_root"]
    with open(run / "split.csv") as fh:
        files = [f"{root}/{r['path']}" for r in csv.DictReader(fh)]
    assert len(files) > 32  # two chunks
    capsys.readouterr()
    assert main(["predict", "--model", str(run), *files, "--mc", "7", "--out", str(tmp_path / "p.csv")]) == 0
    from karyo.experiments.runs import load_models
    from karyo.uncertainty.confidence import summarize_passes

    whole, _, _ = load_paths(files, 32)
    expected = summarize_passes(pooled_passes(load_models(run), whole, 7, 0), threshold=0.8)
    with open(tmp_path / "p.csv") as fh:
        scored = list(csv.DictReader(fh))
    assert [r["path"] for r in scored] == files
    assert [float(r["mean_prob"]) for r in scored] == expected["mean_prob"].tolist()
    assert [float(r["confidence"]) for r in scored] == expected["confidence"].tolist()
