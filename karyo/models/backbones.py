"""The backbone registry: ImageNet networks from ``keras.applications`` with their top removed.

The thesis used VGG16 and InceptionV3 (sections 3.3.2-3.3.3); SPEC 5 adds ResNet50,
DenseNet121, EfficientNetV2-B0, ConvNeXt-Tiny, MobileNetV3-Large and Xception. Each entry
records what karyo needs to know about a network:

* the ``keras.applications`` constructor and the module whose ``preprocess_input`` it expects
  (VGG16 and ResNet50 "caffe": BGR with the ImageNet means subtracted; InceptionV3 and Xception
  "tf": scaled to [-1, 1]; DenseNet "torch"; EfficientNetV2, ConvNeXt and MobileNetV3 rescale
  inside the network, their ``preprocess_input`` is the identity);
* the smallest input Keras accepts (VGG16 32, InceptionV3 75, Xception 71 pixels) and the size
  the ImageNet weights were trained at;
* its blocks, in order, for block-wise unfreezing (thesis 4.3: "we trained one or two blocks
  that are closest to the top layers"). A block ends at a layer whose output is the single
  tensor that feeds everything after it (a *cut point*), so the network can be split there and
  the part before it cached (SPEC 6).

Which weights a backbone starts from is :mod:`karyo.models.weights`; building one is
``karyo.models.network.build_backbone``.

Nothing here imports TensorFlow until a network is built.

Examples:
    >>> from karyo.models.backbones import get_backbone, list_backbones
    >>> list_backbones()[:2]
    ['vgg16', 'inceptionv3']
    >>> get_backbone("vgg16").block_names()
    ('block1', 'block2', 'block3', 'block4', 'block5')
"""

from dataclasses import dataclass

from karyo.errors import KaryoError

#: Where ``keras.applications`` keeps its ImageNet weight files.
_WEIGHTS_BASE = "https://storage.googleapis.com/tensorflow/keras-applications/"


@dataclass(frozen=True)
class Block:
    """One unfreezable block of a backbone.

    Attributes:
        name: the block's name (Keras' layer-name prefix where there is one, e.g. ``block5``).
        end: name of the layer whose output ends the block; ``None`` means the network's output.
        before: instead of ``end``: the block ends at the last cut point before the first layer
            whose name starts with ``before`` (for blocks whose last layer Keras leaves unnamed,
            e.g. InceptionV3's stem or Xception's residual ``add``).
    """

    name: str
    end: str = None
    before: str = None


@dataclass(frozen=True)
class Backbone:
    """A registered backbone.

    Attributes:
        name: registry key (lower case), e.g. ``vgg16``.
        constructor: the ``keras.applications`` function, e.g. ``VGG16``.
        preprocess: the ``keras.applications`` module whose ``preprocess_input`` the network
            expects, e.g. ``vgg16`` ("caffe" mode) or ``inception_v3`` ("tf" mode).
        min_size: smallest square input side Keras accepts, in pixels.
        default_size: the side the ImageNet weights were trained at.
        blocks: the blocks from input to output (unfreezing counts from the end).
        weights_file: the ImageNet file (no top) Keras expects in ``$KERAS_HOME/models``.
        weights_hash: its hash, as ``keras.applications`` checks it (md5 or sha256).
        weights_url: where Keras downloads it from.
    """

    name: str
    constructor: str
    preprocess: str
    min_size: int
    default_size: int
    blocks: tuple
    weights_file: str
    weights_hash: str
    weights_url: str

    def block_names(self):
        """The blocks' names, from input to output."""
        return tuple(block.name for block in self.blocks)

    def preprocess_input(self):
        """The ``keras.applications.<module>.preprocess_input`` function (imports Keras)."""
        import keras

        return getattr(keras.applications, self.preprocess).preprocess_input


def _backbone(name, constructor, preprocess, min_size, default_size, blocks, folder, weights_file,
              weights_hash):
    return Backbone(name, constructor, preprocess, min_size, default_size, tuple(blocks),
                    weights_file, weights_hash, f"{_WEIGHTS_BASE}{folder}/{weights_file}")


#: name -> :class:`Backbone`; the thesis' two first.
BACKBONES = {
    b.name: b
    for b in (
        _backbone(
            # Five conv blocks, each ending in a max-pooling layer (thesis fig. 4.13).
            "vgg16", "VGG16", "vgg16", 32, 224,
            [Block(f"block{k}", end=f"block{k}_pool") for k in range(1, 6)],
            "vgg16", "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
            "6d6bbae143d832006294945121d1f1fc"),
        _backbone(
            # The stem, then the Inception modules mixed0..mixed10 (each a concatenation).
            "inceptionv3", "InceptionV3", "inception_v3", 75, 299,
            [Block("stem", before="mixed0")] + [Block(f"mixed{k}", end=f"mixed{k}") for k in range(11)],
            "inception_v3", "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
            "bcbd6486424b2319ff4ef7d526e38f63"),
        _backbone(
            # conv1 + pool1, then the four residual stages conv2..conv5.
            "resnet50", "ResNet50", "resnet50", 32, 224,
            [Block("stem", end="pool1_pool"), Block("conv2", end="conv2_block3_out"),
             Block("conv3", end="conv3_block4_out"), Block("conv4", end="conv4_block6_out"),
             Block("conv5", end="conv5_block3_out")],
            "resnet", "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
            "4d473c1dd8becc155b73f8504c6f6626"),
        _backbone(
            # conv1 + pool1, then dense blocks 2-4 each with its transition, then block 5 + bn.
            "densenet121", "DenseNet121", "densenet", 32, 224,
            [Block("stem", end="pool1"), Block("conv2", end="pool2_pool"),
             Block("conv3", end="pool3_pool"), Block("conv4", end="pool4_pool"),
             Block("conv5", end=None)],
            "densenet", "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
            "30ee3e1110167f948a6b9946edeeb738"),
        _backbone(
            # Rescaling + stem, the six MBConv / Fused-MBConv stages block1..block6, the top conv.
            "efficientnetv2b0", "EfficientNetV2B0", "efficientnet_v2", 32, 224,
            [Block("stem", end="stem_activation")]
            + [Block(f"block{k}", before=f"block{k + 1}a_") for k in range(1, 6)]
            + [Block("block6", before="top_conv"), Block("top", end=None)],
            "efficientnet_v2", "efficientnetv2-b0_notop.h5", "893217f2bb855e2983157299931e43ff"),
        _backbone(
            # Normalisation + patchify stem, then stages 0-3 (each after its downsampling layer).
            "convnext_tiny", "ConvNeXtTiny", "convnext", 32, 224,
            [Block("stem", end="convnext_tiny_stem")]
            + [Block(f"stage_{k}", before=f"convnext_tiny_downsampling_block_{k}") for k in range(3)]
            + [Block("stage_3", end=None)],
            "convnext", "convnext_tiny_notop.h5",
            "d547c096cabd03329d7be5562c5e14798aa39ed24b474157cef5e85ab9e49ef1"),
        _backbone(
            # Stem, then the inverted-residual stages by output width (16, 24, 40, 80, 112, 160
            # channels: expanded_conv, _1-2, _3-5, _6-9, _10-11, _12-14), then the last 1x1 conv.
            "mobilenetv3large", "MobileNetV3Large", "mobilenet_v3", 32, 224,
            [Block("stem", before="expanded_conv_depthwise"),
             Block("stage1", before="expanded_conv_1_"), Block("stage2", before="expanded_conv_3_"),
             Block("stage3", before="expanded_conv_6_"), Block("stage4", before="expanded_conv_10_"),
             Block("stage5", before="expanded_conv_12_"), Block("stage6", before="conv_1"),
             Block("top", end=None)],
            "mobilenet_v3", "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5",
            "07fb09a5933dd0c8eaafa16978110389"),
        _backbone(
            # Entry flow block1-4, middle flow block5-12, exit flow block13-14; a block with a
            # residual ends at its (unnamed) add.
            "xception", "Xception", "xception", 71, 299,
            [Block("block1", end="block1_conv2_act")]
            + [Block(f"block{k}", before=f"block{k + 1}_") for k in range(2, 14)]
            + [Block("block14", end=None)],
            "xception", "xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
            "b0042744bf5b25fce3cb969f33bebb97"),
    )
}


def list_backbones():
    """Names of the registered backbones, the thesis' two first."""
    return list(BACKBONES)


def get_backbone(name):
    """The :class:`Backbone` called ``name`` (case-insensitive).

    Raises:
        KaryoError: unknown name; the message lists the known ones.
    """
    key = str(name).strip().lower()
    if key not in BACKBONES:
        raise KaryoError(f"unknown backbone '{name}' (known: {', '.join(BACKBONES)})")
    return BACKBONES[key]


def check_image_size(name, image_size):
    """Raise :class:`KaryoError` unless ``image_size`` is an int >= the backbone's minimum."""
    import numbers

    backbone = get_backbone(name)
    if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral):
        raise KaryoError(f"image size must be a whole number of pixels, not {image_size!r}")
    if image_size < backbone.min_size:
        raise KaryoError(f"image size {image_size} is below {backbone.name}'s minimum of "
                         f"{backbone.min_size} pixels")
    return int(image_size)


# ------------------------------------------------------------------------------ block spans


@dataclass(frozen=True)
class BlockSpan:
    """Where a block lies in a built backbone.

    Attributes:
        name: the block's name.
        layers: the block's layers (operations that are Keras layers), input to output.
        end: the operation whose output ends the block.
        output: that output tensor (a cut point: the only thing later layers need).
    """

    name: str
    layers: tuple
    end: object
    output: object


def layer_graph(model):
    """The model's operations in topological order, each with its parents' indices and outputs.

    The graph is walked back from the model's own output tensors, so nodes that other models
    (sub-models made by ``split_model``) later add to the same layers are not confused with it.
    """
    operations = model.operations
    index = {id(op): i for i, op in enumerate(operations)}
    parents, outputs = {}, {}
    stack = list(model.outputs)
    while stack:
        tensor = stack.pop()
        op, node_index, tensor_index = tensor._keras_history
        if id(op) in outputs:
            continue
        node = op._inbound_nodes[node_index]
        outputs[id(op)] = tensor if len(node.output_tensors) == 1 else None
        parents[id(op)] = [index[id(t._keras_history[0])] for t in node.input_tensors]
        stack.extend(node.input_tensors)
    return operations, [parents.get(id(op), []) for op in operations], \
        [outputs.get(id(op)) for op in operations]


def cut_points(model):
    """For each operation of ``model`` (in ``model.operations`` order): is its output a cut point?

    An operation is a cut point when it has one output tensor and no later operation reads a
    tensor from before it: the network can be split there into two models joined by one tensor.
    """
    operations, parents, outputs = layer_graph(model)
    n = len(operations)
    earliest_after = [n] * (n + 1)  # smallest parent index among operations j > i
    for j in range(n - 1, -1, -1):
        earliest_after[j] = min([earliest_after[j + 1]] + parents[j])
    return [outputs[i] is not None and earliest_after[i + 1] >= i for i in range(n)]


def block_spans(model, name):
    """Locate backbone ``name``'s blocks in the built backbone ``model``.

    Returns:
        A list of :class:`BlockSpan`, input to output; every layer of the backbone belongs to
        exactly one block.

    Raises:
        KaryoError: the model does not have the layers the registry expects (a different Keras
            version or not this backbone).
    """
    import keras

    backbone = get_backbone(name)
    operations, _, outputs = layer_graph(model)
    cuts = cut_points(model)
    names = [op.name for op in operations]
    spans, start = [], 0
    for block in backbone.blocks:
        if block.before is not None:
            first = next((i for i, n in enumerate(names) if n.startswith(block.before)), None)
            if first is None:
                raise KaryoError(f"{name}: no layer named '{block.before}...' (block {block.name})")
            end = max((i for i in range(start, first) if cuts[i]), default=None)
        elif block.end is None:
            end = len(operations) - 1
        else:
            end = names.index(block.end) if block.end in names else None
        if end is None or end < start or not cuts[end]:
            raise KaryoError(f"{name}: block {block.name} does not end at a single-tensor cut point "
                             f"in this Keras version's network")
        layers = tuple(op for op in operations[start:end + 1]
                       if isinstance(op, keras.layers.Layer)
                       and not isinstance(op, keras.layers.InputLayer))
        spans.append(BlockSpan(block.name, layers, operations[end], outputs[end]))
        start = end + 1
    if start != len(operations):
        raise KaryoError(f"{name}: the last block does not end at the network's output")
    return spans
