"""karyo's own Keras layers, registered as ``karyo>MCDropout`` and ``karyo>Preprocess``.

Importing this module registers them with Keras' serialisation, so that ``model.keras`` files
written by karyo load with ``keras.saving.load_model``. ``import karyo`` arranges that this
happens as soon as Keras is imported (see ``karyo/__init__.py``).

Why an ``MCDropout`` layer instead of calling ``model(x, training=True)``: the latter also puts
BatchNormalization into batch-statistics mode (SPEC 8), so a prediction would depend on the other
images of its batch. ``MCDropout`` drops units whatever the ``training`` flag says, and
everything else stays in inference mode.
"""

import keras

from karyo.models.backbones import get_backbone


@keras.saving.register_keras_serializable(package="karyo")
class MCDropout(keras.layers.Dropout):
    """Dropout that is always on, at training and at prediction (Monte Carlo Dropout).

    Each call draws a new mask from the layer's seed generator. With a ``seed`` the sequence of
    masks is reproducible: the n-th call on an input of a given shape always drops the same
    units (``karyo.uncertainty.mc_dropout.reset_mc_dropout_seeds`` rewinds it), which is what lets the
    vectorised ``mc_predict`` be checked against running the full network T times.

    Args:
        rate: fraction of the units dropped, in [0, 1).
        noise_shape, seed: as in ``keras.layers.Dropout``.
    """

    def call(self, inputs, training=None):
        # Ignore the flag on purpose: dropout stays on at prediction, while the training flag
        # keeps its usual meaning for every other layer (BatchNormalization above all).
        return super().call(inputs, training=True)


@keras.saving.register_keras_serializable(package="karyo")
class Preprocess(keras.layers.Layer):
    """The backbone's own ``preprocess_input`` as a layer, so a model takes raw RGB images.

    VGG16 and ResNet50 use "caffe" mode (RGB to BGR, ImageNet channel means subtracted),
    InceptionV3 and Xception "tf" mode (scaled to [-1, 1]), DenseNet "torch" mode; EfficientNetV2,
    ConvNeXt and MobileNetV3 normalise inside the network (their ``preprocess_input`` is the
    identity). Inputs are RGB floats in 0..255, as read by ``karyo.data.imageio``.

    Args:
        backbone: a registered backbone name (this is the layer's whole configuration).
    """

    def __init__(self, backbone, **kwargs):
        super().__init__(**kwargs)
        self.backbone = get_backbone(backbone).name
        self._preprocess_input = get_backbone(backbone).preprocess_input()

    def call(self, inputs):
        return self._preprocess_input(keras.ops.cast(inputs, self.compute_dtype))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "backbone": self.backbone}
