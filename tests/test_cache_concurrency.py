"""Two ``karyo train`` processes sharing one feature cache give the results of two sequential runs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from karyo.karyograms.synth import synthesize

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ("predictions.csv", "metrics.json", "history.csv")


def train(data, out, cache):
    """Start ``karyo train`` (tiny: VGG16 at 32 px, no weights, one epoch) on the cache ``cache``."""
    env = dict(os.environ, KARYO_CACHE=str(cache), PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.Popen(
        [sys.executable, "-m", "karyo", "train", "vgg16_original", "--data", str(data), "--out", str(out),
         "--image-size", "32", "--weights", "none", "--epochs", "1", "--mc", "5"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process):
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-2000:]


def cache_files(cache):
    return {p.relative_to(cache): p.read_bytes() for p in sorted(cache.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_two_trainings_at_once_on_one_cache_equal_the_same_runs_one_after_the_other(tmp_path):
    data = synthesize(tmp_path / "syn", normal=12, abnormal=8, size=128, seed=1, progress=False)
    sequential, concurrent = tmp_path / "sequential", tmp_path / "concurrent"
    for name in ("a", "b"):  # one after the other: b reads every feature a wrote
        finish(train(data, sequential / name, sequential / "cache"))
    both = [train(data, concurrent / name, concurrent / "cache") for name in ("a", "b")]
    for process in both:  # at once: both find an empty cache and write the same entries
        finish(process)

    for name in ("a", "b"):
        for result in RESULTS:
            assert (concurrent / name / result).read_bytes() == (sequential / name / result).read_bytes(), \
                (name, result)
    assert (sequential / "a" / "predictions.csv").read_bytes() == (sequential / "b" / "predictions.csv").read_bytes()
    shared = cache_files(concurrent / "cache")
    assert shared == cache_files(sequential / "cache") and len(shared) > 10  # key.json and the train and val images
    assert not [p for p in shared if p.name.startswith(".")]  # no temporary file left behind
