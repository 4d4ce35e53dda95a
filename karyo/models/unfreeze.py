"""Block-wise unfreezing of the backbone (thesis 4.3).

The thesis fine-tuned VGG16's last block (4.3.2) and last two blocks (4.3.3), and, because
"InceptionV3 is not a sequential model", the entire InceptionV3 (4.3.4). ``unfreeze_blocks``
does this for every registered backbone, counting blocks from the output (the blocks are listed
in ``karyo.models.backbones``).

BatchNormalization layers stay frozen by default. In Keras 3 a frozen BatchNormalization layer
(``trainable=False``) runs in inference mode, with its ImageNet moving statistics; calling the
backbone with ``training=False`` is not enough during ``fit`` (keras-team/keras#20285, SPEC 8),
and letting the statistics of small karyogram batches replace them destroys what was learned.

After unfreezing, recompile the model with a lower learning rate:
:data:`FINE_TUNE_LEARNING_RATE` (1e-5, the thesis' 1e-3 divided by 100; the keras-io
fine-tuning guide's convention) so the pre-trained filters are adjusted, not overwritten.

Example:
    >>> model = build_model("vgg16", 32)                        # doctest: +SKIP
    >>> unfreeze_blocks(model, 1)                               # doctest: +SKIP
    >>> [n for n in trainable_layer_names(model) if n.startswith("backbone/")]  # doctest: +SKIP
    ['backbone/block5_conv1', 'backbone/block5_conv2', 'backbone/block5_conv3']
"""

import keras

from karyo.models.network import BACKBONE_NAME, backbone_blocks, n_blocks_arg, part

#: Learning rate to recompile with after unfreezing: the thesis' 1e-3 / 100.
FINE_TUNE_LEARNING_RATE = 1e-5


def sublayers(layer):
    """``layer`` and, for a nested model, every layer inside it."""
    yield layer
    for sub in getattr(layer, "layers", None) or ():
        yield from sublayers(sub)


def unfreeze_blocks(model, n, train_batchnorm=False):
    """Make the backbone's last ``n`` blocks trainable; freeze the rest of the backbone.

    Args:
        model: a model made by ``karyo.models.network.build_model``.
        n: number of blocks, counted from the output (VGG16 ``1`` = block5, ``2`` = block4 and
            block5), ``0`` (frozen backbone) or ``"all"`` (the entire backbone, as the thesis did
            for InceptionV3).
        train_batchnorm: also train the BatchNormalization layers of those blocks (default
            False: they stay in inference mode with their moving statistics).

    Returns:
        ``model``, changed in place. The head stays trainable. Recompile before fitting (with
        :data:`FINE_TUNE_LEARNING_RATE`): Keras fixes the trainable weights at compile time.

    Raises:
        KaryoError: a bad ``n`` or a model not made by ``build_model``.
    """
    spans = backbone_blocks(model)
    k = n_blocks_arg(n, len(spans))
    backbone = part(model, BACKBONE_NAME)
    # Keras propagates ``trainable`` to nested layers: open the container, then set each layer.
    backbone.trainable = k > 0
    chosen = {id(layer) for span in spans[len(spans) - k:] for layer in span.layers}
    for span in spans:
        for layer in span.layers:
            layer.trainable = id(layer) in chosen
            if id(layer) in chosen and not train_batchnorm:
                for sub in sublayers(layer):
                    if isinstance(sub, keras.layers.BatchNormalization):
                        sub.trainable = False
    return model


def trainable_layer_names(model):
    """Names of the layers whose weights an optimiser would update now.

    Nested layers are named by their path, e.g. ``backbone/block5_conv1`` or ``head/dense``.
    A layer counts when it owns trainable weights and it and every model around it are
    trainable.
    """
    names = []

    def visit(layer, prefix, parents_trainable):
        on = parents_trainable and layer.trainable
        if isinstance(layer, keras.Model):
            for sub in layer.layers:
                visit(sub, f"{prefix}{layer.name}/", on)
        elif on and layer.trainable_weights:
            names.append(f"{prefix}{layer.name}")

    for layer in model.layers:
        visit(layer, "", model.trainable)
    return names
