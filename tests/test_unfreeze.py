"""Block-wise unfreezing: exactly which layers train, and BatchNormalization stays frozen."""

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from karyo.errors import KaryoError  # noqa: E402
from karyo.models.network import build_model  # noqa: E402
from karyo.models.unfreeze import trainable_layer_names, unfreeze_blocks  # noqa: E402

HEAD = ["head/dense", "head/batch_norm", "head/output"]


def backbone_names(model):
    return [n.split("/", 1)[1] for n in trainable_layer_names(model) if n.startswith("backbone/")]


@pytest.fixture(scope="module")
def vgg16():
    return build_model("vgg16", 32, seed=0)


@pytest.fixture(scope="module")
def inceptionv3():
    return build_model("inceptionv3", 75, seed=0)


def test_vgg16_depths(vgg16):
    assert trainable_layer_names(vgg16) == HEAD
    unfreeze_blocks(vgg16, 1)
    assert backbone_names(vgg16) == ["block5_conv1", "block5_conv2", "block5_conv3"]
    unfreeze_blocks(vgg16, 2)
    assert backbone_names(vgg16) == [f"block{b}_conv{c}" for b in (4, 5) for c in (1, 2, 3)]
    unfreeze_blocks(vgg16, "all")
    assert len(backbone_names(vgg16)) == 13  # VGG16's 13 conv layers
    unfreeze_blocks(vgg16, 0)
    assert trainable_layer_names(vgg16) == HEAD
    # The flags are what Keras trains: trainable weights = the named layers' kernels and biases.
    unfreeze_blocks(vgg16, "1")
    assert len(vgg16.trainable_weights) == 3 * 2 + len(vgg16.get_layer("head").trainable_weights)


def test_bad_depths_are_refused(vgg16):
    for bad in (6, -1, "last", 2.0):
        with pytest.raises(KaryoError, match="blocks"):
            unfreeze_blocks(vgg16, bad)


def test_inceptionv3_entirely_keeps_batchnorm_frozen(inceptionv3):
    unfreeze_blocks(inceptionv3, "all")
    layers = inceptionv3.get_layer("backbone").layers[1:]
    bn = [layer for layer in layers if isinstance(layer, keras.layers.BatchNormalization)]
    others = [layer for layer in layers if not isinstance(layer, keras.layers.BatchNormalization)]
    assert len(bn) == 94 and len(others) == 216
    assert all(layer.trainable for layer in others)
    assert not any(layer.trainable for layer in bn)
    convs = [layer.name for layer in others if isinstance(layer, keras.layers.Conv2D)]
    assert sorted(backbone_names(inceptionv3)) == sorted(convs)  # BN has weights, none listed
    unfreeze_blocks(inceptionv3, "all", train_batchnorm=True)
    assert all(layer.trainable for layer in bn)
    assert len(backbone_names(inceptionv3)) == 94 + 94


def test_inceptionv3_last_block_is_mixed10(inceptionv3):
    unfreeze_blocks(inceptionv3, 1)
    backbone = inceptionv3.get_layer("backbone")
    names = backbone_names(inceptionv3)
    # InceptionV3's last module (Inception-E) has 9 convolutions, all after mixed9.
    assert len(names) == 9
    order = [layer.name for layer in backbone.layers]
    assert all(order.index(n) > order.index("mixed9") for n in names)
    assert all(isinstance(backbone.get_layer(n), keras.layers.Conv2D) for n in names)


def test_resnet50_last_stage():
    model = build_model("resnet50", 32, seed=0)
    unfreeze_blocks(model, 1)
    names = backbone_names(model)
    # conv5: three bottlenecks of three convolutions plus the projection shortcut.
    assert len(names) == 10 and all(n.startswith("conv5_") and n.endswith("_conv") for n in names)


@pytest.mark.slow
def test_batchnorm_statistics_survive_fine_tuning(inceptionv3):
    """keras-team/keras#20285: frozen BatchNormalization must keep its moving statistics in fit."""
    x = np.random.default_rng(0).uniform(0, 255, (4, 75, 75, 3)).astype("float32")
    y = np.array([0, 1, 0, 1], np.float32)
    backbone = inceptionv3.get_layer("backbone")
    bn = [layer for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)]
    after_mixed9 = backbone.layers[backbone.layers.index(backbone.get_layer("mixed9")) + 1:]
    conv = next(layer for layer in after_mixed9 if isinstance(layer, keras.layers.Conv2D))
    for train_batchnorm, moves in ((False, False), (True, True)):
        unfreeze_blocks(inceptionv3, "all", train_batchnorm=train_batchnorm)
        stats = [layer.moving_mean.numpy().copy() for layer in bn]
        weights = [w.numpy().copy() for w in conv.weights]
        inceptionv3.compile(optimizer=keras.optimizers.Adam(1e-5), loss="binary_crossentropy")
        inceptionv3.fit(x, y, epochs=1, batch_size=4, verbose=0)
        changed = [not np.array_equal(s, layer.moving_mean.numpy()) for s, layer in zip(stats, bn)]
        assert all(changed) if moves else not any(changed)
        assert any(not np.array_equal(w, v.numpy()) for w, v in zip(weights, conv.weights))
