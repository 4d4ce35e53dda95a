"""The thesis' transfer-learning network: a frozen ImageNet backbone and a small head whose two
dropout layers stay on at prediction (Monte Carlo Dropout).

Thesis 3.3.2: "We removed the fully connected layers of VGG16 and wrote top layers suitable for
chromosome binary classification [...] We added two dropout layers, one next to the basic model
and another next to the fully connected layer. There are a global average pooling layer and a
batch normalization layer". InceptionV3 gets the same head (3.3.3). :func:`build_model` makes::

    image (RGB, 0..255 floats) -> preprocess -> backbone (frozen) -> pool -> head
    head: features -> MCDropout -> Dense(relu) -> BatchNormalization -> MCDropout
          -> Dense(1, sigmoid)  (probability of "abnormal", the positive class)
             or Dense(n, softmax) for a multi-class task (the 24 chromosome classes)

Layer names are stable so that other code can split the network: ``image`` (the input),
``preprocess``, ``backbone``, ``pool`` and ``head`` (a nested model whose layers are
``features``, ``mc_dropout_1``, ``dense``, ``batch_norm``, ``mc_dropout_2``, ``output``).

The two dropout layers are :class:`karyo.models.layers.MCDropout` (why: see that module).
Models saved with ``model.save("model.keras")`` reload with ``karyo.models.saving.load_model``
(Keras' safe mode), or with ``keras.saving.load_model`` once ``karyo`` is imported.
"""

import numbers

import keras
import numpy as np

from karyo.errors import KaryoError
from karyo.models.backbones import block_spans, check_image_size, get_backbone, layer_graph
from karyo.models.layers import MCDropout, Preprocess
from karyo.models.weights import load_backbone_weights, resolve_weights

#: Width of the head's hidden Dense layer. The thesis' summaries (figs. 3.5-3.7) give no number;
#: 256 is a common bottleneck for a 512-d (VGG16) or 2048-d (InceptionV3) pooled feature and keeps
#: the head small (about 132 k parameters on VGG16) for a training set of a few hundred karyograms.
DEFAULT_DENSE_UNITS = 256
#: Rate of both MCDropout layers. Not given in the thesis; 0.5 is the rate Srivastava et al.
#: (2014) recommend for fully connected layers and the one Gal and Ghahramani's MC Dropout
#: experiments use, so the 100 passes (thesis 3.4) sample visibly different sub-networks.
DEFAULT_DROPOUT = 0.5
#: Names of the model's parts (see the module docstring).
INPUT_NAME, PREPROCESS_NAME, BACKBONE_NAME, POOL_NAME, HEAD_NAME = (
    "image", "preprocess", "backbone", "pool", "head")


def _rates(dropout):
    """``dropout`` as (rate after pooling, rate after the dense layer)."""
    rates = tuple(dropout) if isinstance(dropout, (tuple, list)) else (dropout, dropout)
    if len(rates) != 2 or not all(isinstance(r, numbers.Real) and not isinstance(r, bool)
                                  and 0 <= r < 1 for r in rates):
        raise KaryoError(f"dropout must be a rate in [0, 1) or a pair of them, not {dropout!r}")
    return float(rates[0]), float(rates[1])


def build_head(input_dim, dense_units=DEFAULT_DENSE_UNITS, dropout=DEFAULT_DROPOUT, n_outputs=1,
               seed=None, name=HEAD_NAME):
    """The thesis' top layers after pooling, as a model from pooled features to probabilities.

    ``features -> MCDropout -> Dense(dense_units, relu) -> BatchNormalization -> MCDropout ->
    Dense(1, sigmoid)`` (``n_outputs=1``: the probability of abnormal) or ``Dense(n_outputs,
    softmax)``.

    Args:
        input_dim: length of the pooled feature vector (512 for VGG16, 2048 for InceptionV3).
        dense_units: hidden width (default 256; not given in the thesis, see DEFAULT_DENSE_UNITS).
        dropout: rate of both MCDropout layers, or a pair (after pooling, after the dense layer).
        n_outputs: 1 for the binary task, else the number of classes.
        seed: seeds the two dropout layers' mask sequences (``seed`` and ``seed + 1``).
        name: the model's name.
    """
    rate1, rate2 = _rates(dropout)
    if int(n_outputs) < 1 or int(dense_units) < 1:
        raise KaryoError(f"n_outputs and dense_units must be positive, not {n_outputs}, {dense_units}")
    seeds = (None, None) if seed is None else (int(seed), int(seed) + 1)
    features = keras.Input(shape=(int(input_dim),), name="features")
    x = MCDropout(rate1, seed=seeds[0], name="mc_dropout_1")(features)
    x = keras.layers.Dense(int(dense_units), activation="relu", name="dense")(x)
    x = keras.layers.BatchNormalization(name="batch_norm")(x)
    x = MCDropout(rate2, seed=seeds[1], name="mc_dropout_2")(x)
    activation = "sigmoid" if int(n_outputs) == 1 else "softmax"
    outputs = keras.layers.Dense(int(n_outputs), activation=activation, name="output")(x)
    return keras.Model(features, outputs, name=name)


def build_model(backbone, image_size, weights="none", dense_units=DEFAULT_DENSE_UNITS,
                dropout=DEFAULT_DROPOUT, n_outputs=1, seed=None):
    """The thesis' network: raw image -> preprocess -> frozen backbone -> pool -> head.

    Args:
        backbone: a registered backbone name (``vgg16``, ``inceptionv3``, ...).
        image_size: input side in pixels (thesis: 416; at least the backbone's minimum).
        weights: ``"none"``/``None``, ``"imagenet"``, ``"auto"`` or a weights file (see
            ``karyo.models.weights.resolve_weights``; call it first to record what ``auto`` chose).
        dense_units, dropout, n_outputs: the head's (see :func:`build_head`).
        seed: makes the random initialisation and the dropout masks reproducible (calls
            ``keras.utils.set_random_seed``); needed for caching features of an unseeded
            ``weights="none"`` backbone.

    Returns:
        A functional ``keras.Model`` taking float RGB images in 0..255 of shape
        (image_size, image_size, 3); the backbone is frozen (``trainable=False``).
    """
    base = build_backbone(backbone, image_size, weights, seed=seed)
    base.trainable = False
    name = get_backbone(backbone).name
    image_size = int(image_size)
    inputs = keras.Input(shape=(image_size, image_size, 3), name=INPUT_NAME)
    x = Preprocess(name, name=PREPROCESS_NAME)(inputs)
    x = base(x)
    x = keras.layers.GlobalAveragePooling2D(name=POOL_NAME)(x)
    head = build_head(base.output.shape[-1], dense_units, dropout, n_outputs, seed=seed)
    return keras.Model(inputs, head(x), name=f"karyo_{name}")


def model_backbone_name(model):
    """The registered backbone name of a model made by :func:`build_model`."""
    return part(model, PREPROCESS_NAME).backbone


def backbone_blocks(model):
    """The backbone's blocks in a model made by :func:`build_model` (``BlockSpan`` list)."""
    return block_spans(part(model, BACKBONE_NAME), model_backbone_name(model))


def part(model, name):
    """The layer ``name`` (``backbone``, ``head``, ...) of a model made by :func:`build_model`."""
    try:
        return model.get_layer(name)
    except ValueError:
        raise KaryoError(f"model '{model.name}' has no layer '{name}': not built by "
                         f"karyo.models.network.build_model") from None


def _output_in(model, layer_name):
    """The output tensor of ``layer_name`` within ``model``'s own graph."""
    operations, _, outputs = layer_graph(model)
    for op, out in zip(operations, outputs):
        if op.name == layer_name:
            return out
    raise KaryoError(f"model '{model.name}' has no layer '{layer_name}'")


def n_blocks_arg(n, total):
    """Normalise an unfreezing depth: an int in 0..total, a digit string, or ``"all"``."""
    if isinstance(n, str):
        text = n.strip().lower()
        if text == "all":
            return total
        if not text.isdigit():
            raise KaryoError(f"number of blocks must be a whole number or 'all', not '{n}'")
        n = int(text)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n <= total:
        raise KaryoError(f"number of blocks must be between 0 and {total} (or 'all'), not {n!r}")
    return int(n)


def split_model(model, n_unfrozen_blocks):
    """Split a model into the part that stays frozen and the part that trains.

    The two parts share their layers (and so their weights) with ``model``: training the
    trainable part on the frozen part's cached output trains ``model``.

    Args:
        model: a model made by :func:`build_model` (or loaded from its ``model.keras``).
        n_unfrozen_blocks: ``0``: the frozen part ends at the pooled features and the
            trainable part is the head; ``k``: the frozen part ends at the output of the
            backbone's block before its last ``k`` blocks (VGG16 ``1``: ``block4_pool``), the
            trainable part is those blocks + pool + head; ``"all"`` (or the number of blocks):
            nothing is frozen.

    Returns:
        ``(frozen_part, trainable_part)``: ``frozen_part`` maps images to the cached tensor,
        ``trainable_part`` maps that tensor to the probabilities; ``trainable_part(frozen_part(x))``
        computes ``model(x)``. With nothing frozen the result is ``(None, model)``.

    Raises:
        KaryoError: a bad depth, or a model not made by :func:`build_model`.
    """
    spans = backbone_blocks(model)
    n = n_blocks_arg(n_unfrozen_blocks, len(spans))
    if n == len(spans):
        return None, model
    head = part(model, HEAD_NAME)
    if n == 0:
        pooled = _output_in(model, POOL_NAME)
        frozen = keras.Model(model.inputs, pooled, name="frozen_part")
        features = keras.Input(shape=tuple(pooled.shape[1:]), name="features")
        return frozen, keras.Model(features, head(features), name="trainable_part")
    backbone, pool = part(model, BACKBONE_NAME), part(model, POOL_NAME)
    cut = spans[len(spans) - n - 1].output  # a cut point (checked by block_spans)
    before = keras.Model(backbone.inputs, cut, name="backbone_frozen")
    frozen = keras.Model(model.inputs, before(_output_in(model, PREPROCESS_NAME)), name="frozen_part")
    # A model from an intermediate tensor: Keras clones the graph nodes, sharing the layers.
    after = keras.Model(cut, backbone.outputs[0], name="backbone_trainable")
    cached = keras.Input(shape=tuple(cut.shape[1:]), name="frozen_output")
    return frozen, keras.Model(cached, head(pool(after(cached))), name="trainable_part")


def build_backbone(name, image_size, weights="none", seed=None):
    """Build ``name`` without its top (``include_top=False``) for square RGB inputs.

    Args:
        name: a registered backbone name.
        image_size: input side in pixels (>= the backbone's ``min_size``).
        weights: anything :func:`resolve_weights` accepts, or its resolved ``weights_arg``.
        seed: if given, ``keras.utils.set_random_seed(seed)`` is called first so that a random
            initialisation (``weights="none"``) is reproducible, which feature caching needs.

    Returns:
        The Keras functional model, named ``backbone``. Its input expects the output of the
        backbone's own ``preprocess_input`` (see ``karyo.models.layers.Preprocess``).

    Raises:
        KaryoError: unknown backbone, too small an image size, or unusable weights.
    """
    import keras

    backbone = get_backbone(name)
    image_size = check_image_size(backbone.name, image_size)
    weights_arg, used, _ = resolve_weights(weights, backbone.name)
    if seed is not None:
        keras.utils.set_random_seed(int(seed))
    constructor = getattr(keras.applications, backbone.constructor)
    model = constructor(include_top=False, weights="imagenet" if used == "imagenet" else None,
                        input_shape=(image_size, image_size, 3))
    if used == "file":
        load_backbone_weights(model, weights_arg)
    # A stable name lets other code find it inside a karyo model (get_layer("backbone")).
    model.name = "backbone"
    return model
