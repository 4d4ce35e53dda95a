"""Selective fine-tuning as BioTune does it (issue #20): the genome's mapping to blocks and rates,
per-block learning rates in Keras' training loop, the evolutionary oracle's resume, and a tiny
``--space biotune`` search. Tiny data: VGG16 at 32 px without weights, one epoch per trial."""

import json
from pathlib import Path

import numpy as np
import pytest

from karyo.errors import KaryoError
from tests.common import TINY_TUNE as TINY, tiny_search_data, write_blob_manifest

pytest.importorskip("keras_tuner")

BASE = 1e-5


# ------------------------------------------------------------------------------ the genome


def test_genes_above_the_threshold_choose_blocks_and_their_rates_on_vgg16():
    from karyo.models.selective import biotune_configuration, first_trained_block

    config = biotune_configuration([0.2, 0.9, 0.1, 0.7, 0.6], 0.6, "vgg16", BASE)
    assert list(config) == ["block1", "block2", "block3", "block4", "block5"]
    # block2 and block4 train (not only the last blocks); a gene equal to the threshold does not.
    assert [b for b, r in config.items() if r is not None] == ["block2", "block4"]
    assert config["block2"] == pytest.approx(BASE * 10 ** 0.8)
    assert config["block4"] == pytest.approx(BASE * 10 ** 0.4)
    assert first_trained_block(config) == 1
    # The rate spans a tenth to ten times the base rate; gene 0.5 is the base rate itself.
    ends = biotune_configuration({"block1": 0.0, "block2": 0.5, "block3": 1.0, "block4": 0.0, "block5": 0.0},
                                 0.0, "vgg16", BASE)
    assert ends == {"block1": None, "block2": pytest.approx(BASE), "block3": pytest.approx(10 * BASE),
                    "block4": None, "block5": None}
    assert first_trained_block(biotune_configuration([0.5] * 5, 0.9, "vgg16", BASE)) is None


def test_genes_map_to_inceptionv3s_stem_and_inception_modules():
    from karyo.models.backbones import get_backbone
    from karyo.models.selective import biotune_configuration, first_trained_block, fixed_recipe

    names = get_backbone("inceptionv3").block_names()
    assert names[0] == "stem" and names[-1] == "mixed10" and len(names) == 12
    genes = [0.9] + [0.3] * 10 + [0.55]
    config = biotune_configuration(genes, 0.5, "inceptionv3", BASE)
    assert {b: r for b, r in config.items() if r is not None} == {
        "stem": pytest.approx(BASE * 10 ** 0.8), "mixed10": pytest.approx(BASE * 10 ** 0.1)}
    assert first_trained_block(config) == 0  # the whole network runs on images
    # The thesis' recipes in the same form: InceptionV3 entirely, VGG16's last block.
    assert set(fixed_recipe("inceptionv3", "all", BASE).values()) == {BASE}
    assert fixed_recipe("vgg16", 1, BASE) == {"block1": None, "block2": None, "block3": None,
                                              "block4": None, "block5": BASE}


@pytest.mark.parametrize("genes, threshold, message", [
    ([0.5] * 4, 0.5, "5 genes"), ([0.5] * 4 + [1.5], 0.5, "block5"), ([0.5] * 5, -0.1, "threshold"),
    ({"block1": 0.5}, 0.5, "one gene per block"),
])
def test_a_bad_genome_is_one_clear_error(genes, threshold, message):
    from karyo.models.selective import biotune_configuration

    with pytest.raises(KaryoError, match=message):
        biotune_configuration(genes, threshold, "vgg16", BASE)


# ------------------------------------------------------------------------------ per-block rates


def _one_step(make_optimizer, ratios=None):
    """The change of every weight of a two-layer model after one training step."""
    import keras

    from karyo.models.selective import scaled_optimizer

    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(1, name="b")(keras.layers.Dense(3, name="a")(inputs))
    model = keras.Model(inputs, outputs)
    before = [w.copy() for w in model.get_weights()]
    optimizer = make_optimizer()
    if ratios is not None:
        optimizer = scaled_optimizer(optimizer, [(v, ratios) for v in model.get_layer("a").trainable_weights])
    model.compile(optimizer=optimizer, loss="mse")
    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    model.train_on_batch(x, np.ones((8, 1), "float32"))
    return [after - b for after, b in zip(model.get_weights(), before)]  # a kernel, a bias, b kernel, b bias


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_per_block_rates_scale_each_blocks_step(name):
    import keras

    def make():
        return keras.optimizers.SGD(0.1) if name == "sgd" else keras.optimizers.Adam(0.01)

    plain = _one_step(make)
    assert all(np.abs(d).max() > 0 for d in plain)
    # Every ratio 1: the plain optimizer's step exactly.
    assert all(np.array_equal(a, b) for a, b in zip(_one_step(make, 1.0), plain))
    # Ratio 0: layer a does not move, layer b moves as before.
    zero = _one_step(make, 0.0)
    assert not np.abs(zero[0]).any() and not np.abs(zero[1]).any()
    assert all(np.array_equal(a, b) for a, b in zip(zero[2:], plain[2:]))
    # Ratio 2: layer a moves twice as far (Adam too: its rate is scaled, not its gradient).
    two = _one_step(make, 2.0)
    for a, b in zip(two[:2], plain[:2]):
        # (float32 weights: the difference of two weights is exact to about 1e-7)
        np.testing.assert_allclose(a, 2 * b, rtol=1e-5, atol=1e-6)
    assert all(np.array_equal(a, b) for a, b in zip(two[2:], plain[2:]))


def test_biotune_trials_train_their_blocks_only_and_share_the_cache_by_cut_point(tmp_path):
    import keras_tuner

    from karyo.experiments.hypermodel import KaryogramHyperModel

    key, data = tiny_search_data(tmp_path)
    hypermodel = KaryogramHyperModel("vgg16", 32, None, key, "biotune", (1e-4, 1e-2), [8], 1, 0,
                                     data["pooled"]["train"].shape[-1], tmp_path, 16, 0.5, 1e-3)
    hp = keras_tuner.HyperParameters()
    hypermodel.declare_hyperparameters(hp)
    assert set(hp.values) == {f"gene_block{k}" for k in range(1, 6)} | {"threshold"}

    def weights(model, layer):
        return [w.copy() for w in model.get_layer("backbone").get_layer(layer).get_weights()]

    genomes = {"block4+block5": [0.1, 0.1, 0.1, 0.9, 0.9], "block4": [0.1, 0.1, 0.1, 0.9, 0.1],
               "block2": [0.1, 0.9, 0.1, 0.1, 0.1]}
    for trained, genes in genomes.items():
        hp.values.update({f"gene_block{k + 1}": g for k, g in enumerate(genes)}, threshold=0.5)
        model = hypermodel.build(hp)
        start = {layer: weights(model, layer) for layer in ("block2_conv1", "block4_conv1", "block5_conv1")}
        result = hypermodel.fit(hp, model, data=data)
        assert np.isfinite(result["val_loss"])
        moved = {layer: not all(np.array_equal(a, b) for a, b in zip(start[layer], weights(model, layer)))
                 for layer in start}
        assert moved == {"block2_conv1": "block2" in trained, "block4_conv1": "block4" in trained,
                         "block5_conv1": "block5" in trained.split("+")}, trained
    # block4+block5 and block4 alone cut at the same point: one cache entry; block2: one more.
    parts = sorted(json.loads(p.read_text())["key_parts"][-1] for p in tmp_path.glob("*/key.json"))
    assert parts == ["pooled", "unfreeze2", "unfreeze4"]


# ------------------------------------------------------------------------------ the evolutionary oracle


def _oracle(directory, population_size=4, **kwargs):
    import keras_tuner

    from karyo.experiments.tuner import EvolutionOracle

    hp = keras_tuner.HyperParameters()
    for k in range(5):
        hp.Float(f"gene_block{k + 1}", 0.0, 1.0)
    hp.Float("threshold", 0.0, 1.0)
    oracle = EvolutionOracle(objective=keras_tuner.Objective("val_loss", direction="min"), max_trials=40,
                             hyperparameters=hp, seed=7, population_size=population_size, **kwargs)
    oracle._set_project_dir(str(directory), "search")  # what keras-tuner's Tuner does with its oracle
    return oracle


def _fitness(values):
    """A stand-in for a trial's validation loss: smooth in the genes, best near 0.8."""
    return float(sum((v - 0.8) ** 2 for v in values.values()))


def _run(oracle, n, tuner_id="tuner0", fitness=_fitness):
    from keras_tuner.engine.trial import TrialStatus

    ran = []
    for _ in range(n):
        trial = oracle.create_trial(tuner_id)
        oracle.update_trial(trial.trial_id, {"val_loss": fitness(trial.hyperparameters.values)})
        trial.status = TrialStatus.COMPLETED
        oracle.end_trial(trial)
        ran.append((trial.trial_id, dict(trial.hyperparameters.values)))
    return ran


def test_evolution_breeds_from_the_best_and_resumes_after_a_kill_with_the_same_population(tmp_path):
    uninterrupted = _oracle(tmp_path / "a")
    expected = _run(uninterrupted, 12)
    state = uninterrupted.get_state()["evolution"]
    assert state["bred"] == 8 and state["generation"] == 2 and len(state["population"]) == 4
    # Children come from the population: each names two parents among the trials before it.
    assert all(int(p) < int(child) for child, parents in state["parents"].items() for p in parents)
    scores = [_fitness(v) for _, v in expected]
    assert min(scores[4:]) < min(scores[:4])  # selection helps on a smooth fitness

    # Killed after 7 trials, with the 8th created but not finished: a new process reloads the oracle.
    killed = _oracle(tmp_path / "b")
    _run(killed, 7)
    running = killed.create_trial("tuner0")
    resumed = _oracle(tmp_path / "b")
    resumed.reload()
    assert resumed.get_state()["evolution"] == killed.get_state()["evolution"]
    again = resumed.create_trial("tuner0")  # the interrupted trial, with its values, runs again
    assert again.trial_id == running.trial_id
    assert again.hyperparameters.values == running.hyperparameters.values
    from keras_tuner.engine.trial import TrialStatus

    resumed.update_trial(again.trial_id, {"val_loss": _fitness(again.hyperparameters.values)})
    again.status = TrialStatus.COMPLETED
    resumed.end_trial(again)
    rest = _run(resumed, 4)
    assert [(t, pytest.approx(v)) for t, v in expected[8:]] == rest
    assert resumed.get_state()["evolution"] == uninterrupted.get_state()["evolution"]


def test_evolution_never_runs_two_genomes_that_train_the_same_blocks_at_the_same_rates(tmp_path):
    import functools

    from karyo.experiments.tuning import trial_phenotype

    def head_is_best(values):  # a high threshold scores best: evolution drifts to "no block trains"
        return 1.0 - values["threshold"]

    phenotype = functools.partial(trial_phenotype, backbone="vgg16", fine_tune_lr=BASE)
    plain = [phenotype(v) for _, v in _run(_oracle(tmp_path / "plain"), 16, fitness=head_is_best)]
    assert plain.count(()) >= 3  # the head alone, trained again and again
    ran = _run(_oracle(tmp_path / "a", phenotype=phenotype), 16, fitness=head_is_best)
    phenotypes = [phenotype(v) for _, v in ran]
    assert len(set(phenotypes)) == 16 and phenotypes.count(()) == 1


# ------------------------------------------------------------------------------ the search


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """12 normal + 8 abnormal images, one case each."""
    return write_blob_manifest(tmp_path_factory.mktemp("karyograms"), 12, 8)


@pytest.mark.slow  # 26-35 s on 2 loaded cores: three trials, each building VGG16 and compiling
def test_a_tiny_biotune_search_reports_each_trials_blocks_and_rates(manifest, tmp_path):
    from karyo.experiments.tuning import read_trials, tune

    out = tmp_path / "search"
    best = tune(manifest, out, max_trials=3, cache_dir=tmp_path / "cache", space="biotune", seed=1, **TINY)
    rows = read_trials(out / "trials.csv")
    assert len(rows) == 3 and all(r["status"] == "completed" for r in rows)
    state = json.loads((out / "keras_tuner" / "oracle.json").read_text())
    assert "evolution" in state and best["oracle"] == "evolution"
    for row in rows:
        trial = json.loads((out / "keras_tuner" / f"trial_{row['trial_id']}" / "trial.json").read_text())
        values = trial["hyperparameters"]["values"]
        chosen = [f"block{k}" for k in range(1, 6) if values[f"gene_block{k}"] > values["threshold"]]
        assert row["trained_blocks"] == "+".join(chosen)
        for item in row["block_rates"].split():
            block, rate = item.split("=")
            assert float(rate) == pytest.approx(1e-5 * 10 ** (2 * (values[f"gene_{block}"] - 0.5)), rel=1e-2)
    winner = next(r for r in rows if r["trial_id"] == best["trial_id"])
    assert best["trained_blocks"] == (winner["trained_blocks"].split("+") if winner["trained_blocks"] else [])
    assert set(best["block_rates"]) == set(best["trained_blocks"])
    assert "unfreeze" not in best["hyperparameters"]  # karyo train cannot replay a biotune recipe
    assert best["searched"] == [f"gene_block{k}" for k in range(1, 6)] + ["threshold"]
    assert (out / "figures" / "block_rates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The same search with the other oracle is another search: refused unless started afresh.
    with pytest.raises(KaryoError, match="other settings.*oracle"):
        tune(manifest, out, max_trials=3, cache_dir=tmp_path / "cache", space="biotune", seed=1,
             oracle="bayesian", **TINY)


def test_an_unknown_oracle_fails_before_any_work(manifest, tmp_path):
    from karyo.experiments.tuning import tune

    with pytest.raises(KaryoError, match="unknown oracle 'genetic'"):
        tune(manifest, tmp_path / "out", oracle="genetic", **TINY)
    assert not (tmp_path / "out").exists()


def test_the_block_rates_figure_draws_the_thesis_recipes_beside_a_search(tmp_path):
    from karyo.experiments.figures import plot_block_rates
    from karyo.experiments.tuning import thesis_recipes
    from karyo.models.selective import biotune_configuration

    recipes = thesis_recipes("vgg16", BASE)
    assert [label for label, _ in recipes] == ["thesis: last 1 block", "thesis: last 2 blocks"]
    recipes.append(("a genome", biotune_configuration([0.9, 0.1, 0.7, 0.1, 0.6], 0.5, "vgg16", BASE)))
    out = plot_block_rates(recipes, [f"block{k}" for k in range(1, 6)], tmp_path / "rates.png", base_lr=BASE)
    assert Path(out).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Path(out).stat().st_size > 5000


def test_karyo_tune_passes_the_space_and_oracle_and_prints_the_chosen_blocks(monkeypatch, tmp_path, capsys):
    import karyo.experiments.tuning as tuning
    from karyo.cli import main

    seen = {}

    def fake_tune(data, out, **kwargs):
        seen.update(kwargs)
        return {"hyperparameters": {"lr": 1e-3}, "block_rates": {"block2": 2.5e-05, "block4": 1e-05},
                "val_loss": 0.5, "completed_trials": 3}

    monkeypatch.setattr(tuning, "tune", fake_tune)
    assert main(["tune", "--data", str(tmp_path / "m.csv"), "--out", str(tmp_path / "o"), "--space", "biotune"]) == 0
    assert seen["space"] == "biotune" and seen["oracle"] is None  # None: the space's default, evolution
    assert "block2 at 2.5e-05, block4 at 1e-05" in capsys.readouterr().out
    main(["tune", "--data", str(tmp_path / "m.csv"), "--out", str(tmp_path / "o"), "--space", "biotune",
          "--oracle", "bayesian"])
    assert seen["oracle"] == "bayesian"
    assert tuning.default_oracle("biotune") == "evolution" and tuning.default_oracle("extended") == "bayesian"
