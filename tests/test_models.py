"""The thesis network: MCDropout, Preprocess, the head, build_model, split_model, reloading."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from karyo.atomic import atomic_path  # noqa: E402
from karyo.errors import KaryoError  # noqa: E402
from karyo.models.features import cached_features  # noqa: E402
from karyo.uncertainty.mc_dropout import mc_predict, reset_mc_dropout_seeds  # noqa: E402
from karyo.models.layers import MCDropout, Preprocess  # noqa: E402
from karyo.models.network import build_head, build_model, split_model  # noqa: E402
from karyo.models.unfreeze import unfreeze_blocks  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def images(n, size, seed=0):
    """Random RGB images with a dark bar whose length differs per image (not all alike)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(150, 256, (n, size, size, 3)).astype(np.uint8)
    for i in range(n):
        x[i, 2:2 + (i * 5) % (size - 4), size // 2 - 2:size // 2 + 2] = rng.integers(0, 60)
    return x


def seeded(fn, model, seed=11):
    """Call ``fn`` after rewinding the model's dropout masks: equal masks on both sides."""
    reset_mc_dropout_seeds(model, seed)
    return np.asarray(fn())


def test_mc_dropout_stays_on_at_prediction_and_round_trips():
    layer = MCDropout(0.5, seed=3)
    x = np.ones((4, 64), np.float32)
    a = keras.ops.convert_to_numpy(layer(x, training=False))
    b = keras.ops.convert_to_numpy(layer(x))
    assert (a == 0).any() and (b == 0).any() and not np.array_equal(a, b)
    assert set(np.unique(a)) <= {0.0, 2.0}  # inverted dropout: kept units scaled by 1 / 0.5
    assert np.array_equal(keras.ops.convert_to_numpy(MCDropout(0.0)(x, training=False)), x)
    assert keras.saving.get_registered_name(MCDropout) == "karyo>MCDropout"
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(clone) is MCDropout and clone.rate == 0.5 and clone.seed == 3
    pre = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(Preprocess("inceptionv3")))
    assert type(pre) is Preprocess and pre.backbone == "inceptionv3"
    with pytest.raises(KaryoError, match="unknown backbone"):
        Preprocess("lenet")


def test_head_is_the_thesis_head():
    head = build_head(512)
    kinds = [type(layer).__name__ for layer in head.layers]
    assert kinds == ["InputLayer", "MCDropout", "Dense", "BatchNormalization", "MCDropout", "Dense"]
    dense, out = head.get_layer("dense"), head.get_layer("output")
    assert dense.units == 256 and dense.activation.__name__ == "relu"
    assert out.units == 1 and out.activation.__name__ == "sigmoid"
    assert [layer.rate for layer in head.layers if isinstance(layer, MCDropout)] == [0.5, 0.5]

    multi = build_head(64, dense_units=16, dropout=(0.2, 0.3), n_outputs=24, seed=1)
    assert multi.get_layer("output").activation.__name__ == "softmax"
    probs = multi.predict_on_batch(np.random.default_rng(0).normal(size=(3, 64)).astype("float32"))
    assert probs.shape == (3, 24)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    for bad in (1.0, -0.1, (0.5,), "half"):
        with pytest.raises(KaryoError, match="dropout"):
            build_head(8, dropout=bad)


def test_build_model_layout_and_frozen_backbone():
    model = build_model("vgg16", 32, seed=0)
    assert [layer.name for layer in model.layers] == ["image", "preprocess", "backbone", "pool", "head"]
    assert model.input.shape[1:] == (32, 32, 3) and model.output.shape[1:] == (1,)
    assert not model.get_layer("backbone").trainable
    assert not model.get_layer("backbone").trainable_weights
    assert model.get_layer("head").trainable_weights
    # Raw 0..255 pixels in, VGG16's "caffe" preprocessing inside.
    x = images(2, 32).astype("float32")
    inside = keras.ops.convert_to_numpy(model.get_layer("preprocess")(x))
    np.testing.assert_allclose(inside, keras.applications.vgg16.preprocess_input(x.copy()), atol=1e-4)


def test_head_trained_on_cached_features_equals_end_to_end(tmp_path):
    model = build_model("vgg16", 32, seed=0)
    frozen, head = split_model(model, 0)
    assert frozen.output.shape[1:] == (512,)
    x, y = images(12, 32), np.array([0, 1] * 6, np.float32)
    features = cached_features(frozen, x, ["vgg16", "none:seed=0", 32, "pooled"], tmp_path,
                               batch_size=5, progress=False)
    before = [w.copy() for w in model.get_layer("head").get_weights()]
    head.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy")
    head.fit(features, y, epochs=3, batch_size=4, verbose=0)
    after = model.get_layer("head").get_weights()
    # The head trained on the cache is the full model's head (shared weights).
    assert any(not np.allclose(a, b) for a, b in zip(before, after))

    on_cache = seeded(lambda: head.predict_on_batch(features), model)
    end_to_end = seeded(lambda: model.predict_on_batch(x.astype("float32")), model)
    np.testing.assert_allclose(on_cache, end_to_end, atol=1e-4)
    assert np.ptp(end_to_end) > 1e-3  # not a constant output that would match anything
    # Different masks do change the output: the comparison above depends on equal masks.
    other = seeded(lambda: head.predict_on_batch(features), model, seed=12)
    assert np.abs(other - end_to_end).max() > 1e-3


def test_partly_unfrozen_cache_equals_end_to_end(tmp_path):
    model = build_model("vgg16", 32, seed=1)
    unfreeze_blocks(model, 1)
    frozen, rest = split_model(model, 1)
    assert frozen.output.shape[1:] == (2, 2, 512)  # block4_pool at 32 px
    x, y = images(8, 32, seed=1), np.array([0, 1] * 4, np.float32)
    cached = cached_features(frozen, x, ["vgg16", "none:seed=1", 32, "unfreeze1"], tmp_path,
                             progress=False)
    backbone = model.get_layer("backbone")
    block4 = backbone.get_layer("block4_conv3").get_weights()[0].copy()
    block5 = backbone.get_layer("block5_conv3").get_weights()[0].copy()
    rest.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    rest.fit(cached, y, epochs=1, batch_size=4, verbose=0)
    assert np.array_equal(backbone.get_layer("block4_conv3").get_weights()[0], block4)
    assert not np.allclose(backbone.get_layer("block5_conv3").get_weights()[0], block5)

    on_cache = seeded(lambda: rest.predict_on_batch(cached), model)
    end_to_end = seeded(lambda: model.predict_on_batch(x.astype("float32")), model)
    np.testing.assert_allclose(on_cache, end_to_end, atol=1e-4)


def test_inceptionv3_splits_at_block_boundaries():
    model = build_model("inceptionv3", 75, seed=2)
    x = images(3, 75, seed=2).astype("float32")
    full = seeded(lambda: model.predict_on_batch(x), model)
    backbone = model.get_layer("backbone")
    for n, boundary in ((1, "mixed9"), (4, "mixed6")):
        frozen, rest = split_model(model, n)
        assert frozen.output.shape == backbone.get_layer(boundary).output.shape
        cached = frozen.predict_on_batch(x)
        np.testing.assert_allclose(seeded(lambda: rest.predict_on_batch(cached), model), full, atol=1e-4)
    assert split_model(model, "all") == (None, model)
    assert split_model(model, 12) == (None, model)  # stem + mixed0..mixed10


def test_split_model_refuses_bad_depths():
    model = build_model("vgg16", 32, seed=0)
    for bad in (6, -1, "two", 1.5, None):
        with pytest.raises(KaryoError, match="blocks"):
            split_model(model, bad)
    assert split_model(model, "2")[0].output.shape[1:] == (4, 4, 256)  # block3_pool
    with pytest.raises(KaryoError, match="build_model"):
        split_model(keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)]), 0)


_CHILD = r"""
import json, sys
import numpy as np
import keras
import karyo.models.layers  # registers karyo>MCDropout and karyo>Preprocess
from karyo.uncertainty.mc_dropout import mc_dropout_layers, mc_predict, naive_mc_predict

model = keras.saving.load_model(sys.argv[1], safe_mode=True)
x = np.load(sys.argv[2])
bn = [l for l in model.get_layer("head").layers if isinstance(l, keras.layers.BatchNormalization)]
stats = lambda: [w.copy() for l in bn for w in (l.moving_mean.numpy(), l.moving_variance.numpy())]
before = stats()
passes = mc_predict(model, x, T=20, seed=5)
naive = naive_mc_predict(model, x[:2], T=3, seed=6)
model.predict(x, verbose=0)
unchanged = all(np.array_equal(a, b) for a, b in zip(before, stats()))
layers = mc_dropout_layers(model)
out = {"types": [type(l).__name__ for l in layers], "rates": [l.rate for l in layers],
       "preprocess": model.get_layer("preprocess").backbone,
       "passes": passes.tolist(), "bn_unchanged": unchanged}
# Dropout off: in inference mode an image's output must not depend on the rest of its batch.
for layer in layers:
    layer.rate = 0.0
alone = keras.ops.convert_to_numpy(model(x[:1], training=False))[0]
batch = keras.ops.convert_to_numpy(model(x, training=False))[0]
out["alone_vs_batch"] = float(np.abs(alone - batch).max())
# The pitfall (SPEC 8): training=True switches BatchNormalization to batch statistics.
alone_t = keras.ops.convert_to_numpy(model(x[:1], training=True))[0]
batch_t = keras.ops.convert_to_numpy(model(x, training=True))[0]
out["alone_vs_batch_training_true"] = float(np.abs(alone_t - batch_t).max())
print(json.dumps(out))
"""


def test_saved_model_reloads_in_a_fresh_process(tmp_path):
    model = build_model("vgg16", 32, seed=4)
    # Give the head's BatchNormalization non-trivial moving statistics, as after training.
    bn = model.get_layer("head").get_layer("batch_norm")
    rng = np.random.default_rng(0)
    gamma, beta, mean, var = bn.get_weights()
    bn.set_weights([gamma, beta, rng.normal(0, 0.5, mean.shape), rng.uniform(0.2, 2, var.shape)])
    x = images(6, 32, seed=3)
    expected = mc_predict(model, x, T=20, seed=5)
    path = tmp_path / "model.keras"
    with atomic_path(path) as tmp:
        model.save(tmp)
    np.save(tmp_path / "x.npy", x)

    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(tmp_path / "x.npy")],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])

    assert out["types"] == ["MCDropout", "MCDropout"] and out["rates"] == [0.5, 0.5]
    assert out["preprocess"] == "vgg16"
    passes = np.array(out["passes"])
    assert passes.shape == (20, 6)
    assert (passes.std(axis=0) > 1e-4).all()  # the MC passes vary for every image
    np.testing.assert_allclose(passes, expected, atol=1e-5)  # the same model, the same masks
    assert out["bn_unchanged"]
    assert out["alone_vs_batch"] < 1e-5
    assert out["alone_vs_batch_training_true"] > 1e-3  # the check above can fail


def test_a_model_carrying_python_code_is_refused(tmp_path):
    """Safe mode: a .keras file whose Lambda layer holds Python bytecode is not deserialised."""
    from karyo.models.saving import load_model
    from karyo.experiments.runs import load_models

    inputs = keras.Input((4,))
    outputs = keras.layers.Lambda(lambda t: t * 2.0)(inputs)
    path = tmp_path / "run" / "model.keras"
    path.parent.mkdir()
    keras.Model(inputs, outputs).save(path)
    # The file is a working model: Keras itself loads it once safe mode is switched off.
    unsafe = keras.saving.load_model(path, safe_mode=False)
    assert np.allclose(unsafe.predict(np.ones((1, 4)), verbose=0), 2.0)
    for load in (lambda: load_model(path), lambda: load_models(path.parent)):
        with pytest.raises(KaryoError) as err:
            load()
        message = str(err.value)
        assert "\n" not in message and str(path) in message and "safe_mode" in message


def test_keras_own_loader_reads_a_karyo_model_after_import_karyo(tmp_path):
    """``import karyo`` registers karyo's layers once Keras is imported, in either import order;
    without it, Keras cannot read the model (so the check can fail)."""
    path = tmp_path / "model.keras"
    build_model("vgg16", 32, seed=1).save(path)
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")
    load = f"keras.saving.load_model({str(path)!r}); print('loaded')"
    for script, works in ((f"import karyo, keras; {load}", True), (f"import keras, karyo; {load}", True),
                          (f"import keras; {load}", False)):
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                              timeout=300, cwd=tmp_path)
        assert (done.returncode == 0 and done.stdout.strip() == "loaded") == works, (script, done.stderr[-2000:])


def test_a_model_naming_an_unregistered_layer_is_one_line(tmp_path):
    import zipfile

    from karyo.models.saving import load_model

    path = tmp_path / "model.keras"
    build_model("vgg16", 32, seed=1).save(path)
    renamed = tmp_path / "renamed.keras"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(renamed, "w") as target:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename == "config.json":
                data = data.replace(b"karyo>Preprocess", b"karyo>Preprocess2")
                data = data.replace(b'"Preprocess"', b'"Preprocess2"')
            target.writestr(item, data)
    with pytest.raises(KaryoError) as err:
        load_model(renamed)
    message = str(err.value)
    assert "\n" not in message and "Preprocess2" in message and "import" in message
