"""mc_predict: the backbone once, the head T times, the same passes as the naive loop."""

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from karyo.errors import KaryoError  # noqa: E402
from karyo.models.features import cached_features  # noqa: E402
from karyo.uncertainty.mc_dropout import (mc_dropout_layers, mc_predict, naive_mc_predict,  # noqa: E402
                                          split_at_first_mc_dropout)
from karyo.models.network import build_model, split_model  # noqa: E402
from tests.common import random_images  # noqa: E402


@pytest.fixture(scope="module")
def vgg16():
    return build_model("vgg16", 32, seed=0)


def test_equals_the_full_model_run_t_times_with_the_same_masks(vgg16):
    x = random_images(5, 32)
    fast = mc_predict(vgg16, x, T=6, batch_size=2, seed=1)
    slow = naive_mc_predict(vgg16, x, T=6, batch_size=2, seed=1)
    assert fast.shape == slow.shape == (6, 5) and fast.dtype == np.float32
    np.testing.assert_allclose(fast, slow, atol=1e-5)
    assert (fast.std(axis=0) > 1e-4).all()  # the passes differ: dropout is on
    assert np.abs(mc_predict(vgg16, x, T=6, batch_size=2, seed=2) - fast).max() > 1e-3
    np.testing.assert_array_equal(mc_predict(vgg16, x, T=6, batch_size=2, seed=1), fast)


def test_with_cached_backbone_features(vgg16, tmp_path):
    x = random_images(7, 32, seed=1)
    frozen, _ = split_model(vgg16, 0)
    features = cached_features(frozen, x, ["vgg16", "none:seed=0", 32, "pooled"], tmp_path,
                               progress=False)
    from_cache = mc_predict(vgg16, None, T=5, batch_size=4, features=features, seed=3)
    np.testing.assert_allclose(from_cache, naive_mc_predict(vgg16, x, T=5, batch_size=4, seed=3),
                               atol=1e-5)


def test_backbone_once_per_image_and_inference_mode_elsewhere(vgg16, monkeypatch):
    """The deterministic part sees each image once; no BatchNormalization statistic moves."""
    from karyo.uncertainty.mc_dropout import _compiled

    deterministic, stochastic = split_at_first_mc_dropout(vgg16)
    assert deterministic.output.shape[1:] == (512,) and stochastic.input.shape[1:] == (512,)
    used = _compiled(vgg16)[0]
    seen, original = [], used.predict_on_batch
    monkeypatch.setattr(used, "predict_on_batch", lambda x: seen.append(len(x)) or original(x))

    def never(x):
        raise AssertionError("the full model must not run in mc_predict")

    monkeypatch.setattr(vgg16, "predict_on_batch", never)
    bn = vgg16.get_layer("head").get_layer("batch_norm")
    before = [bn.moving_mean.numpy().copy(), bn.moving_variance.numpy().copy()]
    assert mc_predict(vgg16, random_images(5, 32), T=40, batch_size=2).shape == (40, 5)
    assert seen == [2, 2, 1]
    assert np.array_equal(before[0], bn.moving_mean.numpy())
    assert np.array_equal(before[1], bn.moving_variance.numpy())


def test_multi_class_and_inceptionv3():
    model = build_model("inceptionv3", 75, n_outputs=3, dense_units=32, seed=4)
    x = random_images(3, 75, seed=4)
    passes = mc_predict(model, x, T=4, seed=0)
    assert passes.shape == (4, 3, 3)
    np.testing.assert_allclose(passes.sum(axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(passes, naive_mc_predict(model, x, T=4, seed=0), atol=1e-5)


def test_bad_calls_are_refused(vgg16):
    for bad in (0, -1, 2.5, True):
        with pytest.raises(KaryoError, match="passes"):
            mc_predict(vgg16, random_images(1, 32), T=bad)
    with pytest.raises(KaryoError, match="images of shape"):
        mc_predict(vgg16, random_images(1, 48), T=2)
    with pytest.raises(KaryoError, match="features of shape"):
        mc_predict(vgg16, None, T=2, features=np.zeros((2, 100), np.float32))
    with pytest.raises(KaryoError, match="batch size"):
        mc_predict(vgg16, random_images(1, 32), T=2, batch_size=0)
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dropout(0.5), keras.layers.Dense(1)])
    with pytest.raises(KaryoError, match="no MCDropout"):
        mc_predict(plain, np.zeros((1, 4)), T=2)
    assert mc_predict(vgg16, random_images(0, 32), T=3).shape == (3, 0)
    assert len(mc_dropout_layers(vgg16)) == 2
