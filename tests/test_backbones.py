"""The backbone registry, weights handling, and one common test over every backbone."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from karyo.errors import KaryoError
from karyo.models.backbones import BACKBONES, block_spans, cut_points, get_backbone, list_backbones
from karyo.models.network import build_backbone
from karyo.models.weights import resolve_weights, weights_identity

REPO = Path(__file__).resolve().parents[1]


def test_registry_has_the_thesis_backbones_first_and_the_spec_ones():
    assert list_backbones()[:2] == ["vgg16", "inceptionv3"]
    assert set(list_backbones()) == {"vgg16", "inceptionv3", "resnet50", "densenet121",
                                     "efficientnetv2b0", "convnext_tiny", "mobilenetv3large",
                                     "xception"}
    assert get_backbone("VGG16") is BACKBONES["vgg16"]
    assert get_backbone("vgg16").block_names() == tuple(f"block{k}" for k in range(1, 6))
    assert get_backbone("inceptionv3").block_names() == ("stem",) + tuple(f"mixed{k}" for k in range(11))


def test_unknown_backbone_names_the_known_ones():
    with pytest.raises(KaryoError) as info:
        get_backbone("alexnet")
    message = str(info.value)
    assert "alexnet" in message
    assert all(name in message for name in list_backbones())


@pytest.mark.parametrize("name, minimum", [("vgg16", 32), ("inceptionv3", 75), ("xception", 71)])
def test_too_small_image_size_names_the_minimum(name, minimum):
    with pytest.raises(KaryoError, match=f"minimum of {minimum} pixels"):
        build_backbone(name, minimum - 1)


def test_bad_weights_values_are_refused(tmp_path):
    with pytest.raises(KaryoError, match="imagenet, none, auto"):
        resolve_weights("imagenet21k", "vgg16")
    with pytest.raises(KaryoError, match="not found"):
        resolve_weights(str(tmp_path / "missing.weights.h5"), "vgg16")
    assert resolve_weights("none", "vgg16")[:2] == (None, "none")
    assert resolve_weights(None, "vgg16")[:2] == (None, "none")


def test_failed_download_gives_one_clear_error_and_auto_falls_back(monkeypatch, tmp_path):
    import keras

    url = get_backbone("inceptionv3").weights_url

    def offline(fname, origin, **kwargs):
        assert fname == get_backbone("inceptionv3").weights_file and origin == url
        # What Keras' get_file raises when urlretrieve fails (keras/src/utils/file_utils.py).
        raise Exception(f"URL fetch failure on {origin}: None -- [Errno -2] Name or service not known")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    with pytest.raises(KaryoError) as info:
        resolve_weights("imagenet", "inceptionv3")
    message = str(info.value)
    assert "\n" not in message
    assert "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5" in message
    assert "models" in message and "Name or service not known" in message
    # Offline, auto falls back to karyo's chromosome-pretrained weights (never to random ones).
    fake = tmp_path / "backbone.weights.h5"
    weights_arg, used, note = resolve_weights("auto", "inceptionv3", chromosome=lambda: fake)
    assert (weights_arg, used) == (str(fake), "chromosome")
    with pytest.raises(KaryoError, match="starting_weights"):  # no pretraining to fall back on: no silent random
        resolve_weights("auto", "inceptionv3")
    assert "chromosome-pretrained" in note and "Name or service not known" in note


def test_download_line_shows_only_for_a_download_that_starts(monkeypatch, tmp_path, capsys):
    import keras

    import karyo.models.weights as weights

    def downloading(fname, origin, **kwargs):
        print(f"Downloading data from {origin}")
        print("\r 1/1 [====] - 0s", end="")  # Keras' progress bar: bytes arrived
        return str(tmp_path / fname)

    monkeypatch.setattr(weights, "_FAILED_DOWNLOADS", {})
    monkeypatch.setattr(keras.utils, "get_file", downloading)
    resolve_weights("imagenet", "vgg16")
    assert f"Downloading data from {get_backbone('vgg16').weights_url}\n\r 1/1" in capsys.readouterr().out

    def refused(fname, origin, **kwargs):
        print(f"Downloading data from {origin}")
        raise Exception(f"URL fetch failure on {origin}: None -- [Errno 111] Connection refused")

    monkeypatch.setattr(keras.utils, "get_file", refused)
    assert resolve_weights("auto", "vgg16", chromosome=lambda: tmp_path / "w.weights.h5")[1] == "chromosome"
    assert "Downloading" not in capsys.readouterr().out


def test_imagenet_offline_in_a_fresh_process_with_an_empty_keras_cache(tmp_path):
    """The real Keras download path, made to fail fast: an empty KERAS_HOME and a dead proxy."""
    keras_home = tmp_path / "keras_home"
    keras_home.mkdir()
    script = (
        "import json\n"
        "from karyo.models.weights import resolve_weights\n"
        "from karyo.errors import KaryoError\n"
        "try:\n"
        "    resolve_weights('imagenet', 'vgg16', timeout=5)\n"
        "    out = {'error': None}\n"
        "except KaryoError as exc:\n"
        "    out = {'error': str(exc)}\n"
        "out['auto'] = list(resolve_weights('auto', 'vgg16', timeout=5, chromosome=lambda: 'pretrained.weights.h5'))\n"
        "print(json.dumps(out))\n"
    )
    # Port 9 on localhost is closed: the proxy connection is refused at once, whether or not
    # this machine can reach the internet (so the test never downloads for real).
    env = dict(os.environ, KERAS_HOME=str(keras_home), https_proxy="http://127.0.0.1:9",
               HTTPS_PROXY="http://127.0.0.1:9", no_proxy="", NO_PROXY="",
               PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")
    started = time.time()
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert time.time() - started < 60
    expected = keras_home / "models" / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    assert out["error"] and str(expected) in out["error"]
    assert "Offline?" in out["error"] and "--weights none" in out["error"]
    assert out["auto"][:2] == ["pretrained.weights.h5", "chromosome"]
    assert not expected.exists()  # no half-downloaded file left in the cache


def test_seeded_random_initialisation_is_reproducible():
    first = build_backbone("vgg16", 32, "none", seed=7).get_weights()
    build_backbone("resnet50", 32, "none")  # other random draws in between must not matter
    again = build_backbone("vgg16", 32, "none", seed=7).get_weights()
    other = build_backbone("vgg16", 32, "none", seed=8).get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[0], other[0])


def test_weights_from_files(tmp_path):
    from karyo.models.network import build_model

    source = build_backbone("vgg16", 32, "none", seed=1)
    path = tmp_path / "vgg16.weights.h5"
    source.save_weights(path)
    loaded = build_backbone("vgg16", 48, str(path), seed=2)  # another size: conv weights fit
    assert all(np.array_equal(a, b) for a, b in zip(source.get_weights(), loaded.get_weights()))
    assert weights_identity("file", str(path)).startswith("sha256:")
    assert weights_identity("none", None, 3) == "none:seed=3"

    model = build_model("vgg16", 32, seed=3)
    model_path = tmp_path / "model.keras"
    model.save(model_path)
    from_model = build_backbone("vgg16", 40, str(model_path), seed=4)
    donor = model.get_layer("backbone").get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(donor, from_model.get_weights()))

    try:  # the legacy (Keras 2, keras.applications) layout, matched in topological order
        import h5py
        from keras.src.legacy.saving import legacy_h5_format
    except ImportError:
        pass
    else:
        legacy = tmp_path / "legacy.h5"
        with h5py.File(legacy, "w") as fh:
            legacy_h5_format.save_weights_to_hdf5_group(fh, source)
        from_legacy = build_backbone("vgg16", 36, str(legacy), seed=5)
        assert all(np.array_equal(a, b) for a, b in zip(source.get_weights(), from_legacy.get_weights()))

    with pytest.raises(KaryoError, match="vgg16.weights.h5"):
        build_backbone("resnet50", 32, str(path))  # weights of another architecture
    broken = tmp_path / "broken.weights.h5"
    broken.write_bytes(b"not an hdf5 file")
    with pytest.raises(KaryoError, match="broken.weights.h5"):
        build_backbone("vgg16", 32, str(broken))


@pytest.mark.parametrize("name", list_backbones())
def test_every_backbone(name, monkeypatch, tmp_path):
    """Builds at its minimum size; output, preprocessing, blocks, saving, unfreezing, weights file."""
    import keras
    from keras.src.utils import file_utils

    from karyo.models.network import build_model
    from karyo.models.saving import load_model
    from karyo.models.unfreeze import trainable_layer_names, unfreeze_blocks

    spec = get_backbone(name)
    size = spec.min_size
    model = build_model(name, size, weights="none", seed=0)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (2, size, size, 3)).astype("float32")
    probabilities = model.predict_on_batch(images)
    assert probabilities.shape == (2, 1) and np.all((probabilities >= 0) & (probabilities <= 1))

    # The Preprocess layer is the module's own preprocess_input.
    expected = getattr(keras.applications, spec.preprocess).preprocess_input(images.copy())
    got = keras.ops.convert_to_numpy(model.get_layer("preprocess")(images))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)

    # Blocks partition the backbone and end at cut points.
    backbone = model.get_layer("backbone")
    spans = block_spans(backbone, name)
    assert [s.name for s in spans] == list(spec.block_names())
    layers = [id(layer) for s in spans for layer in s.layers]
    assert len(layers) == len(set(layers)) == len(backbone.layers) - 1  # all but the InputLayer
    cuts = cut_points(backbone)
    index = {id(op): i for i, op in enumerate(backbone.operations)}
    assert all(cuts[index[id(s.end)]] for s in spans)

    # Saved and reloaded in safe mode (custom layers such as ConvNeXt's LayerScale included),
    # it is the same network (test_models.py compares a reloaded model's MC passes).
    model.save(tmp_path / "model.keras")
    reloaded = load_model(tmp_path / "model.keras")
    assert [type(op).__name__ for op in reloaded.get_layer("backbone").operations] == \
        [type(op).__name__ for op in backbone.operations]
    assert all(np.array_equal(a, b) for a, b in zip(reloaded.get_weights(), model.get_weights()))

    assert not any(n.startswith("backbone/") for n in trainable_layer_names(model))
    unfreeze_blocks(model, 1)
    assert any(n.startswith("backbone/") for n in trainable_layer_names(model))

    # The registry's ImageNet file is the one keras.applications asks for.
    asked = []

    def record(fname=None, origin=None, **kwargs):
        asked.append((fname, origin, kwargs.get("file_hash")))
        raise Exception(f"URL fetch failure on {origin}: None -- offline (test)")

    monkeypatch.setattr(file_utils, "get_file", record)
    with pytest.raises(Exception, match="URL fetch failure"):
        getattr(keras.applications, spec.constructor)(include_top=False, weights="imagenet",
                                                      input_shape=(size, size, 3))
    assert asked == [(spec.weights_file, spec.weights_url, spec.weights_hash)]
