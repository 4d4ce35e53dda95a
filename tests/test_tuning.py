"""The Bayesian search (karyo.experiments.tuning): results, resuming, failures, the extended space and
keras-tuner's distributed mode. Tiny data: generated karyogram-like images, VGG16 at 32 px
without weights, one epoch per trial."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from karyo.errors import KaryoError
from karyo.data.manifest import read_manifest, write_manifest
from tests.common import TINY_TUNE as TINY, subprocess_env, tiny_search_data, trial_json, write_blob_manifest

pytest.importorskip("keras_tuner")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """15 normal + 10 abnormal images, one case each."""
    return write_blob_manifest(tmp_path_factory.mktemp("karyograms"), 15, 10)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One feature cache for the module: the search is meant to reuse it."""
    return tmp_path_factory.mktemp("cache")


def _trials(out):
    from karyo.experiments.tuning import read_trials

    return read_trials(Path(out) / "trials.csv")


def _tune_script(manifest, out, cache, max_trials):
    return ("import json; from karyo.experiments.tuning import tune; "
            f"r = tune({str(manifest)!r}, {str(out)!r}, cache_dir={str(cache)!r}, "
            f"max_trials={max_trials}, **{TINY!r}); print('RESULT', json.dumps(r))")


# ------------------------------------------------------------------------------ the space


def test_batch_size_choices_are_thesis_powers_of_two_capped_by_training_set():
    from karyo.experiments.hypermodel import batch_size_choices

    assert batch_size_choices(10_000) == [8, 16, 32, 64, 128, 256, 512]
    assert batch_size_choices(100) == [8, 16, 32, 64]
    assert batch_size_choices(64) == [8, 16, 32, 64]
    assert batch_size_choices(5) == [8]


def test_unfreeze_choices_follow_each_backbones_blocks():
    from karyo.models.backbones import get_backbone
    from karyo.experiments.hypermodel import unfreeze_choices

    assert unfreeze_choices("vgg16") == [0, 1, 2]
    n = len(get_backbone("inceptionv3").blocks)
    assert unfreeze_choices("inceptionv3") == [0, 1, 2, n // 2, n]  # n: entirely, as thesis 4.3.4


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_trials=0), "max_trials"), (dict(epochs=-1), "epochs"), (dict(space="huge"), "space"),
    (dict(lr_range=(1e-1, 1e-5)), "lr_range"), (dict(image_size=16), "minimum"),
    (dict(backbone="alexnet"), "unknown backbone"),
])
def test_bad_arguments_fail_before_any_work(manifest, tmp_path, kwargs, message):
    from karyo.experiments.tuning import tune

    with pytest.raises(KaryoError, match=message):
        tune(manifest, tmp_path / "out", **dict(TINY, **kwargs))
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ the search


def test_search_writes_results_and_a_rerun_adds_no_trials(manifest, cache, tmp_path):
    from karyo.experiments.tuning import tune

    out = tmp_path / "search"
    best = tune(manifest, out, max_trials=6, cache_dir=cache, seed=3, **TINY)

    rows = _trials(out)
    assert [r["trial_id"] for r in rows] == [str(k) for k in range(6)]
    assert all(r["status"] == "completed" and not r["error"] for r in rows)
    losses = [float(r["val_loss"]) for r in rows]
    assert all(np.isfinite(losses)) and all(0 <= float(r["val_accuracy"]) <= 1 for r in rows)
    assert all(float(r["seconds"]) > 0 and r["tuner"] == "tuner0" for r in rows)
    lrs = [float(r["lr"]) for r in rows]
    assert all(1e-5 <= lr <= 1e-1 for lr in lrs) and len(set(lrs)) == 6
    # 16 training images: 8 and 16 are the only batch sizes that differ.
    assert {int(r["batch_size"]) for r in rows} <= {8, 16}

    saved = json.loads((out / "best.json").read_text())
    assert saved == json.loads(json.dumps(best))
    assert best["completed_trials"] == 6 and best["failed_trials"] == 0
    assert best["val_loss"] == pytest.approx(min(losses))
    winner = rows[losses.index(min(losses))]
    assert best["trial_id"] == winner["trial_id"]
    assert best["hyperparameters"] == {"lr": pytest.approx(float(winner["lr"])),
                                       "batch_size": int(winner["batch_size"]),
                                       "dropout": 0.5, "unfreeze": 0, "dense_units": 256}
    for name in ("val_loss_vs_lr.png", "val_loss_vs_batch_size.png"):
        assert (out / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    stamps = {p: p.stat().st_mtime_ns for p in (out / "keras_tuner").glob("trial_*/trial.json")}
    again = tune(manifest, out, max_trials=6, cache_dir=cache, seed=3, **TINY)
    assert again == best
    assert _trials(out) == rows
    assert {p: p.stat().st_mtime_ns for p in (out / "keras_tuner").glob("trial_*/trial.json")} == stamps

    # keras-tuner would silently keep the old search space: a changed setting is refused.
    with pytest.raises(KaryoError, match="other settings.*epochs"):
        tune(manifest, out, max_trials=6, cache_dir=cache, seed=3, **dict(TINY, epochs=2))
    # ... unless the search starts afresh.
    fresh = tune(manifest, out, max_trials=1, cache_dir=cache, seed=3, overwrite=True, **TINY)
    assert fresh["completed_trials"] == 1 and len(_trials(out)) == 1


@pytest.mark.slow
def test_killed_search_resumes_with_exactly_max_trials(manifest, cache, tmp_path):
    from karyo.experiments.tuning import tune

    out = tmp_path / "search"
    process = subprocess.Popen([sys.executable, "-c", _tune_script(manifest, out, cache, 6)],
                               env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = trial_json(out, 2)
    try:
        deadline = time.time() + 180
        while not started.is_file() and process.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert started.is_file(), "trial 2 never started"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    interrupted = json.loads(started.read_text())
    assert interrupted["status"] == "RUNNING"  # killed during trial 2, not after it
    assert not (out / "best.json").exists()
    finished = {k: trial_json(out, k).read_bytes() for k in (0, 1)}

    best = tune(manifest, out, max_trials=6, cache_dir=cache, **TINY)

    rows = _trials(out)
    assert [r["trial_id"] for r in rows] == [str(k) for k in range(6)]
    assert all(r["status"] == "completed" for r in rows)
    assert best["completed_trials"] == 6
    # Trials 0 and 1 were not run again; trial 2 was rerun with the values it was given.
    assert {k: trial_json(out, k).read_bytes() for k in (0, 1)} == finished
    rerun = json.loads(trial_json(out, 2).read_text())
    assert rerun["hyperparameters"]["values"] == interrupted["hyperparameters"]["values"]


# ------------------------------------------------------------------------------ failures


def test_a_failed_trial_is_reported_and_never_chosen(manifest, cache, tmp_path, monkeypatch, capsys):
    import karyo.experiments.hypermodel as hypermodel
    import karyo.experiments.tuning as tuning

    real, calls = hypermodel.fit_trial, []

    def sometimes_out_of_memory(*args, **kwargs):
        calls.append(1)
        if len(calls) in (2, 3):
            raise MemoryError("injected: out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(hypermodel, "fit_trial", sometimes_out_of_memory)
    out = tmp_path / "search"
    best = tuning.tune(manifest, out, max_trials=4, cache_dir=cache, **TINY)

    rows = _trials(out)
    assert [r["status"] for r in rows] == ["completed", "failed", "failed", "completed"]
    for row in rows[1:3]:
        assert row["error"] == "MemoryError: injected: out of memory"
        assert row["val_loss"] == "" and float(row["seconds"]) >= 0
    assert best["trial_id"] in ("0", "3")
    assert best["completed_trials"] == 2 and best["failed_trials"] == 2
    # Quiet, each failure is its one line; keras-tuner's traceback of it is held back.
    err = capsys.readouterr().err
    assert "karyo tune: trial 1 failed: MemoryError: injected: out of memory" in err
    assert "Traceback" not in err


def test_search_whose_trials_all_fail_raises_and_writes_no_best(
        manifest, cache, tmp_path, monkeypatch):
    import karyo.experiments.hypermodel as hypermodel
    import karyo.experiments.tuner as tuner
    import karyo.experiments.tuning as tuning

    real = hypermodel.fit_trial

    def broken(*args, **kwargs):
        raise RuntimeError("injected: broken trial")

    monkeypatch.setattr(hypermodel, "fit_trial", broken)
    out = tmp_path / "search"
    with pytest.raises(KaryoError, match="no trial of the search completed \\(the first 3 trials all "
                                         "failed.*injected: broken trial"):
        tuning.tune(manifest, out, max_trials=6, cache_dir=cache, **TINY)
    assert not (out / "best.json").exists()
    rows = _trials(out)
    # The first FAIL_FAST trials all failed: a broken setup, so the search stopped there.
    assert len(rows) == tuner.FAIL_FAST
    assert all(r["status"] == "failed" and "injected: broken trial" in r["error"] for r in rows)

    # Once the setup is repaired, rerunning continues the same search.
    monkeypatch.setattr(hypermodel, "fit_trial", real)
    best = tuning.tune(manifest, out, max_trials=4, cache_dir=cache, **TINY)
    assert best["trial_id"] == "3"
    assert best["completed_trials"] == 1 and best["failed_trials"] == tuner.FAIL_FAST


def test_the_search_uses_keras_tuners_public_api_only():
    import keras_tuner

    import karyo.experiments.hypermodel as hypermodel
    import karyo.experiments.tuner as tuner
    import karyo.experiments.tuning as tuning

    # keras_tuner.src is keras-tuner's private layout, free to change in any release.
    for module in (tuning, tuner, hypermodel):
        source = Path(module.__file__).read_text()
        assert "from keras_tuner.src" not in source and "import keras_tuner.src" not in source
    # The fail-fast stop is keras-tuner's own "end the search" error, which its loop re-raises.
    assert issubclass(tuner.SearchFailed, keras_tuner.errors.FatalError)
    assert issubclass(hypermodel.KaryogramHyperModel, keras_tuner.HyperModel)


def test_a_diverged_trial_fails_instead_of_scoring_nan():
    from keras_tuner.errors import FailedTrialError

    from karyo.models.network import build_head
    from karyo.experiments.hypermodel import fit_trial

    # What an exploding learning rate leaves behind. (inf, not NaN: with oneDNN on, ReLU maps NaN
    # inputs to 0 and the loss stays finite, so NaN inputs would not make the loss diverge.)
    x = np.full((8, 4), np.inf, np.float32)
    y = np.array([0, 1] * 4)
    with pytest.raises(FailedTrialError, match="diverged"):
        fit_trial(build_head(4, 8, seed=0), x, y, x, y, 1e-3, 8, 1, 0, 0)


# ------------------------------------------------------------------------------ extended space


def test_extended_space_fine_tunes_blocks_on_cached_frozen_output(tmp_path):
    import keras_tuner

    from karyo.experiments.hypermodel import KaryogramHyperModel

    key, data = tiny_search_data(tmp_path)
    hypermodel = KaryogramHyperModel(
        "vgg16", 32, None, key, "extended", (1e-4, 1e-2), [8], 1, 0, data["pooled"]["train"].shape[-1],
        tmp_path, 16, 0.5, 1e-5)
    hp = keras_tuner.HyperParameters()
    hypermodel.declare_hyperparameters(hp)
    assert set(hp.values) == {"lr", "batch_size", "unfreeze", "dropout"}
    for depth in (0, 1, 2):
        hp.values.update(unfreeze=depth, dropout=0.3)
        model = hypermodel.build(hp)
        result = hypermodel.fit(hp, model, data=data)
        assert np.isfinite(result["val_loss"]) and 0 <= result["val_accuracy"] <= 1
        head = model if depth == 0 else model.get_layer("head")  # the head alone, or the network
        assert head.get_layer("mc_dropout_1").rate == pytest.approx(0.3)
    # The unfrozen trials trained on the cached output of the still-frozen part.
    parts = [json.loads(p.read_text())["key_parts"][-1] for p in tmp_path.glob("*/key.json")]
    assert sorted(parts) == ["pooled", "unfreeze1", "unfreeze2"]


def test_extended_search_reports_its_extra_hyperparameters(manifest, cache, tmp_path):
    from karyo.experiments.tuning import tune

    out = tmp_path / "search"
    best = tune(manifest, out, max_trials=2, cache_dir=cache, space="extended", **TINY)
    assert best["searched"] == ["lr", "batch_size", "unfreeze", "dropout"]
    assert best["hyperparameters"]["unfreeze"] in (0, 1, 2)
    assert 0.1 <= best["hyperparameters"]["dropout"] <= 0.7
    rows = _trials(out)
    assert all(r["unfreeze"] in ("0", "1", "2") and r["dropout"] for r in rows)
    for name in ("lr", "batch_size", "dropout", "unfreeze"):
        assert (out / "figures" / f"val_loss_vs_{name}.png").is_file()


# ------------------------------------------------------------------------------ distributed


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_distributed_search_with_a_chief_and_two_workers(manifest, cache, tmp_path):
    out = tmp_path / "search"
    port = str(_free_port())
    processes = {}
    try:
        for tuner_id in ("chief", "tuner0", "tuner1"):
            env = subprocess_env(KERASTUNER_ORACLE_IP="127.0.0.1", KERASTUNER_ORACLE_PORT=port,
                                 KERASTUNER_TUNER_ID=tuner_id)
            processes[tuner_id] = subprocess.Popen(
                [sys.executable, "-c", _tune_script(manifest, out, cache, 6)], env=env,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        outputs = {k: p.communicate(timeout=400) for k, p in processes.items()}
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    results = {}
    for tuner_id, (stdout, stderr) in outputs.items():
        assert processes[tuner_id].returncode == 0, f"{tuner_id} failed:\n{stderr[-3000:]}"
        line = next(ln for ln in stdout.splitlines() if ln.startswith("RESULT "))
        results[tuner_id] = json.loads(line[len("RESULT "):])

    rows = _trials(out)
    assert [r["trial_id"] for r in rows] == [str(k) for k in range(6)]
    assert all(r["status"] == "completed" for r in rows)
    # One shared search: every trial ran once, on one of the two workers, and both took part.
    by_worker = {w: sorted(results[w]["trials"]) for w in ("tuner0", "tuner1")}
    assert sorted(by_worker["tuner0"] + by_worker["tuner1"]) == [str(k) for k in range(6)]
    assert all(by_worker.values()), by_worker
    assert {r["tuner"] for r in rows} == {"tuner0", "tuner1"}
    assert all(results[w]["role"] == "worker" and results[w]["failed_trials"] == 0 for w in by_worker)
    chief = results["chief"]
    assert chief["completed_trials"] == 6
    assert chief == json.loads((out / "best.json").read_text())


def test_resume_repairs_the_state_a_kill_between_two_writes_leaves(manifest, cache, tmp_path):
    from karyo.experiments.tuning import tune

    out = tmp_path / "search"
    tune(manifest, out, max_trials=3, cache_dir=cache, **TINY)
    project = out / "keras_tuner"
    oracle = json.loads((project / "oracle.json").read_text())
    # Killed after trial 2's end was written to its file, before the oracle's file: the oracle
    # still lists it as running. It must not be run again.
    oracle["ongoing_trials"] = {"tuner0": "2"}
    oracle["end_order"].remove("2")
    (project / "oracle.json").write_text(json.dumps(oracle))
    # Killed after trial 3's start was written to its file, before the oracle's file: the
    # oracle does not know it. It must be run, not left unfinished.
    started = json.loads(trial_json(out, 2).read_text())
    started.update(trial_id="3", status="RUNNING", score=None, message=None)
    trial_json(out, 3).parent.mkdir()
    trial_json(out, 3).write_text(json.dumps(started))
    ended = trial_json(out, 2).read_bytes()

    best = tune(manifest, out, max_trials=4, cache_dir=cache, **TINY)

    assert [r["status"] for r in _trials(out)] == ["completed"] * 4
    assert best["completed_trials"] == 4
    assert trial_json(out, 2).read_bytes() == ended


def test_train_takes_the_searched_hyperparameters_from_best_json(manifest, cache, tmp_path):
    """The hand-off the README shows: ``karyo tune`` writes best.json, ``karyo train
    --hyperparameters best.json`` trains with exactly those values."""
    from karyo.cli import main
    from karyo.experiments.tuning import tune

    search = tmp_path / "search"
    best = tune(manifest, search, max_trials=2, cache_dir=cache, seed=5, space="extended", **TINY)
    run = tmp_path / "run"
    code = main(["train", "vgg16_original", "--data", str(manifest), "--out", str(run), "--image-size", "32",
                 "--weights", "none", "--epochs", "1", "--mc", "3", "--cache", str(cache),
                 "--hyperparameters", str(search / "best.json")])
    assert code == 0
    used = json.loads((run / "config.json").read_text())["experiment"]
    assert set(best["hyperparameters"]) == {"lr", "batch_size", "dropout", "unfreeze", "dense_units"}
    for name, value in best["hyperparameters"].items():
        assert used[name] == pytest.approx(value), name


def test_hyperparameters_file_that_is_not_json_is_one_line(manifest, tmp_path, capsys):
    from karyo.cli import main

    bad = tmp_path / "best.json"
    bad.write_text("{not json")
    code = main(["train", "vgg16_original", "--data", str(manifest), "--out", str(tmp_path / "run"),
                 "--hyperparameters", str(bad)])
    assert code == 2
    assert capsys.readouterr().err.strip().startswith(f"karyo: error: {bad}: not valid JSON")
    assert not (tmp_path / "run").exists()


def test_tune_refuses_copies_across_its_grouped_split_as_train_does(manifest, cache, tmp_path, capsys):
    import shutil

    from karyo.cli import main

    root = tmp_path / "data"
    shutil.copytree(manifest.parent, root)
    rows = read_manifest(root / "manifest.csv").rows
    for i in range(6):  # byte-identical copies, each its own group: some straddle the split
        shutil.copy(root / f"normal_{i}.png", root / f"copy_{i}.png")
        rows.append({"path": f"copy_{i}.png", "label": "normal", "group": f"copy{i}"})
    write_manifest(root / "manifest.csv", rows)
    out = tmp_path / "search"
    code = main(["tune", "--data", str(root / "manifest.csv"), "--out", str(out), "--cache", str(cache),
                 "--max-trials", "1", "--image-size", "32", "--weights", "none", "--epochs", "1"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("karyo:")]
    assert code == 2 and len(err) == 1 and "near-identical" in err[0] and "copy_" in err[0], err
    assert not out.exists()
