"""Same command and seed, same metrics: whatever ran before in the process, and whether or not
the work was killed and rerun (``karyo tune``, ``karyo reproduce``; ``karyo train`` is in
tests/test_resume.py). Equality is exact: the documented tolerance on CPU is zero."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from karyo.experiments.registry import get_experiment
from karyo.experiments.training import train_experiment
from tests.common import TINY_TUNE, subprocess_env, trial_json, write_karyograms

REPO = Path(__file__).resolve().parents[1]


def _kill_when(script, ready, timeout=240):
    """Run ``script`` in a fresh Python; SIGKILL it as soon as ``ready()`` is true."""
    process = subprocess.Popen([sys.executable, "-c", script], env=subprocess_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + timeout
        while not ready() and process.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert ready(), "the work ended before the moment it was to be killed"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


def _predictions_and_metrics(run):
    return (run / "predictions.csv").read_bytes(), json.loads((run / "metrics.json").read_text())


# ------------------------------------------------------------------ the process does not matter


TRAIN = dict(image_size=32, weights="none", epochs=4, fine_tune_epochs=2, batch_size=4, mc_passes=10)


@pytest.mark.slow
def test_a_run_in_a_busy_process_equals_the_same_run_in_a_fresh_one(tmp_path):
    manifest = write_karyograms(tmp_path / "data")
    fresh = tmp_path / "fresh"
    script = ("from karyo.experiments.registry import get_experiment; "
              "from karyo.experiments.training import train_experiment; "
              f"train_experiment(get_experiment('vgg16_unfreeze1', **{TRAIN!r}), {str(manifest)!r}, "
              f"{str(fresh)!r}, cache_dir={str(tmp_path / 'fresh-cache')!r}, verbose=0, progress=False)")
    done = subprocess.run([sys.executable, "-c", script], env=subprocess_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]

    # Here, after whatever other tests ran in this process, another experiment first (same
    # backbone: it fills the shared feature cache), then the same experiment twice.
    cache = tmp_path / "cache"
    train_experiment(get_experiment("vgg16_original", **TRAIN), manifest, tmp_path / "other",
                     cache_dir=cache, verbose=0, progress=False)
    for name in ("again1", "again2"):
        train_experiment(get_experiment("vgg16_unfreeze1", **TRAIN), manifest, tmp_path / name,
                         cache_dir=cache, verbose=0, progress=False)
        assert _predictions_and_metrics(tmp_path / name) == _predictions_and_metrics(fresh), name
    other = _predictions_and_metrics(tmp_path / "other")
    assert other[0] != _predictions_and_metrics(fresh)[0]  # the comparison can tell runs apart


# ------------------------------------------------------------------ karyo tune, killed


def _trials_without_timing(out):
    from karyo.experiments.tuning import read_trials

    return [{k: v for k, v in row.items() if k != "seconds"} for row in read_trials(out / "trials.csv")]


@pytest.mark.slow
def test_a_killed_search_rerun_equals_an_uninterrupted_one(tmp_path):
    from karyo.experiments.tuning import tune

    manifest = write_karyograms(tmp_path / "data", normal=15, abnormal=10)
    settings = dict(TINY_TUNE, max_trials=8, seed=1, cache_dir=str(tmp_path / "cache"))
    whole = tmp_path / "whole"
    best = tune(manifest, whole, **settings)

    # Trials 0-5 draw random values, 6 on ask the Gaussian process (6 = 3 x 2 searched
    # hyperparameters): killed in trial 6, the rerun runs 6 again and asks the process for 7.
    killed = tmp_path / "killed"
    script = f"from karyo.experiments.tuning import tune; tune({str(manifest)!r}, {str(killed)!r}, **{settings!r})"
    _kill_when(script, lambda: trial_json(killed, 6).is_file())
    assert json.loads(trial_json(killed, 6).read_text())["status"] == "RUNNING"
    assert not (killed / "best.json").exists()
    finished = {k: trial_json(killed, k).read_bytes() for k in range(6)}

    assert tune(manifest, killed, **settings)["trial_id"] == best["trial_id"]
    assert {k: trial_json(killed, k).read_bytes() for k in range(6)} == finished  # not redone
    rows = _trials_without_timing(killed)
    assert [r["status"] for r in rows] == ["completed"] * 8
    assert rows == _trials_without_timing(whole)
    assert json.loads((killed / "best.json").read_text()) == json.loads((whole / "best.json").read_text())


# ------------------------------------------------------------------ karyo reproduce, killed


def _tables(report):
    return [line for line in (report).read_text().splitlines() if line.startswith("|")]


@pytest.mark.slow
def test_a_killed_reproduction_rerun_equals_an_uninterrupted_one(tmp_path):
    from karyo.experiments.reproduce import reproduce

    options = dict(preset="tiny", experiments=("vgg16_original", "vgg16_unfreeze1"),
                   protocols=("grouped",), tune=False, log=lambda message: None)
    whole = tmp_path / "whole"
    reproduce(whole, **options)

    killed = tmp_path / "killed"
    runs = killed / "runs" / "grouped"
    script = (f"from karyo.experiments.reproduce import reproduce; reproduce({str(killed)!r}, "
              f"**{ {k: v for k, v in options.items() if k != 'log'}!r})")
    # Killed while the second run trains: the first one is finished, the second has begun.
    _kill_when(script, lambda: (runs / "vgg16_unfreeze1" / "phase-head").is_dir())
    assert (runs / "vgg16_original" / "metrics.json").is_file()
    assert not (runs / "vgg16_unfreeze1" / "metrics.json").exists()
    first = {p: (p.stat().st_mtime_ns, p.read_bytes())
             for p in (runs / "vgg16_original").rglob("*") if p.is_file()}

    reproduce(killed, **options)

    assert {p: (p.stat().st_mtime_ns, p.read_bytes())
            for p in (runs / "vgg16_original").rglob("*") if p.is_file()} == first
    assert _tables(killed / "report.md") == _tables(whole / "report.md")
    for name in options["experiments"]:
        assert (_predictions_and_metrics(runs / name)
                == _predictions_and_metrics(whole / "runs" / "grouped" / name)), name
