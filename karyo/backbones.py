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

Weights (``resolve_weights``): ``"imagenet"`` downloads through Keras' own path into the Keras
cache (``$KERAS_HOME/models``, by default ``~/.keras/models``); offline this fails with one
:class:`~karyo.errors.KaryoError` saying which file to place there. ``"none"`` is a random
initialisation (seed it: :func:`build_backbone`'s ``seed``), ``"chromosome"`` is karyo's own
backbone pretrained on synthetic single chromosomes (``karyo.pretrain.chromosome_weights``, built
once into ``$KARYO_CACHE``), ``"auto"`` is ImageNet when it can be had and otherwise
``chromosome`` (never silently random), and a file path loads weights from a file (see
:func:`load_backbone_weights` for the accepted formats).

Nothing here imports TensorFlow until a network is built.

Examples:
    >>> from karyo.backbones import get_backbone, list_backbones
    >>> list_backbones()[:2]
    ['vgg16', 'inceptionv3']
    >>> get_backbone("vgg16").block_names()
    ('block1', 'block2', 'block3', 'block4', 'block5')
"""

import contextlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from karyo.errors import KaryoError

#: Where ``keras.applications`` keeps its ImageNet weight files.
_WEIGHTS_BASE = "https://storage.googleapis.com/tensorflow/keras-applications/"
#: Seconds a stalled socket may wait while ImageNet weights download. Long enough for a slow
#: link (it bounds each read, not the whole download), short enough that an offline machine
#: whose packets are silently dropped does not hang for minutes.
DOWNLOAD_TIMEOUT = 30.0
#: The ``weights`` values besides a file path.
WEIGHTS_CHOICES = ("imagenet", "none", "auto", "chromosome")


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


# ---------------------------------------------------------------------------------- weights


def keras_cache_dir():
    """The folder Keras keeps downloaded models in (``$KERAS_HOME/models``)."""
    # Keras reads KERAS_HOME once, when it is imported: ask it rather than the environment
    # (it has no public accessor), and mirror its fallback to /tmp/.keras when the home folder
    # is not writable.
    try:
        from keras.src.backend.config import keras_home

        home = keras_home()
    except ImportError:
        home = os.environ.get("KERAS_HOME", "~/.keras")
    home = os.path.expanduser(home)
    if not os.access(home, os.W_OK):
        home = os.path.join("/tmp", ".keras")
    return Path(home) / "models"


def imagenet_weights_path(name):
    """Where Keras looks for ``name``'s ImageNet file (it may not exist yet)."""
    return keras_cache_dir() / get_backbone(name).weights_file


@contextlib.contextmanager
def _socket_timeout(seconds):
    # urllib (which Keras' get_file uses) has no timeout of its own: a black-holed network
    # would block forever. The default timeout is process-wide, so restore it afterwards.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


#: Backbones whose ImageNet download already failed in this process, with the error: offline, a
#: reproduction of 14 runs would otherwise wait for the download timeout 14 times.
_FAILED_DOWNLOADS = {}


def fetch_imagenet_weights(name, timeout=DOWNLOAD_TIMEOUT):
    """Make sure ``name``'s ImageNet file is in the Keras cache; download it if it is not.

    Uses ``keras.utils.get_file`` with the file name, URL and hash that ``keras.applications``
    itself uses, so the network's constructor finds the file afterwards.

    Returns:
        The local path of the weights file.

    Raises:
        KaryoError: the download failed (offline, blocked, or a corrupt file); the message says
            where to place the file by hand.
    """
    import keras

    backbone = get_backbone(name)
    target = imagenet_weights_path(name)
    if backbone.name in _FAILED_DOWNLOADS and not target.is_file():
        raise KaryoError(_FAILED_DOWNLOADS[backbone.name])
    try:
        with _socket_timeout(timeout):
            path = keras.utils.get_file(backbone.weights_file, backbone.weights_url,
                                        cache_subdir="models", file_hash=backbone.weights_hash)
    except Exception as exc:  # Keras raises a bare Exception on URL failure, ValueError on a bad hash
        reason = str(exc).replace(backbone.weights_url, "<url>").strip() or type(exc).__name__
        message = (
            f"cannot obtain the ImageNet weights for {backbone.name} ({reason}). Offline? "
            f"Download {backbone.weights_url} on a connected machine and place it at {target} "
            f"(the Keras cache: $KERAS_HOME/models, by default ~/.keras/models), "
            f"or use --weights none or --weights auto")
        _FAILED_DOWNLOADS[backbone.name] = message
        raise KaryoError(message) from None
    return Path(path)


def resolve_weights(weights, backbone, timeout=DOWNLOAD_TIMEOUT, image_size=None):
    """Decide which weights a backbone will start from, before it is built.

    Args:
        weights: ``"imagenet"``, ``"none"`` (or ``None``), ``"auto"``, ``"chromosome"`` or a path
            to a weights file (``.weights.h5``, ``.h5`` or a saved karyo ``.keras`` model).
        backbone: a registered backbone name.
        timeout: socket timeout for the ImageNet download, in seconds.
        image_size: input side of the model the weights are for: ``chromosome`` weights are
            pretrained at the scale chromosomes have in a karyogram of that side (default: the
            backbone's minimum input, at least 64).

    Returns:
        ``(weights_arg, used, note)``: ``weights_arg`` is what :func:`build_backbone` and
        ``karyo.models.build_model`` take (``"imagenet"``, ``None`` or the file's path);
        ``used`` is ``"imagenet"``, ``"none"``, ``"chromosome"`` or ``"file"``; ``note`` is a
        sentence for the run's config and report (for ``auto`` it says why ImageNet weights
        were not used).

    Raises:
        KaryoError: unknown value, a missing file, or ``imagenet`` that cannot be downloaded.
    """
    bb = get_backbone(backbone)
    if weights is None or str(weights).strip().lower() == "none":
        return None, "none", "random initialisation (no pre-trained weights)"
    text = str(weights).strip()
    if text.lower() == "imagenet":
        path = fetch_imagenet_weights(bb.name, timeout)
        return "imagenet", "imagenet", f"ImageNet weights ({path})"
    if text.lower() == "chromosome":
        path = _chromosome_weights(bb, image_size)
        return str(path), "chromosome", f"chromosome-pretrained weights ({path})"
    if text.lower() == "auto":
        try:
            path = fetch_imagenet_weights(bb.name, timeout)
        except KaryoError as exc:
            path = _chromosome_weights(bb, image_size)
            return str(path), "chromosome", (
                f"--weights auto: ImageNet weights unavailable, so the {bb.name} backbone starts from "
                f"karyo's chromosome-pretrained weights ({path}). Reason: {exc}")
        return "imagenet", "imagenet", f"--weights auto: ImageNet weights ({path})"
    path = Path(text).expanduser()
    if not path.name.endswith((".h5", ".hdf5", ".keras")):
        raise KaryoError(f"--weights {text}: expected one of {', '.join(WEIGHTS_CHOICES)} or a "
                         f"weights file (.weights.h5, .h5 or .keras)")
    if not path.is_file():
        raise KaryoError(f"{path}: weights file not found")
    return str(path), "file", f"weights loaded from {path}"


def _chromosome_weights(bb, image_size):
    # karyo.pretrain builds backbones with this module, so it is imported here, when needed.
    from karyo.pretrain import chromosome_weights

    return chromosome_weights(bb.name, int(image_size) if image_size else max(bb.min_size, 64))


def weights_identity(used, weights_arg=None, seed=None):
    """A short string that names the starting weights, for cache keys and run configs.

    ``imagenet``; ``none:seed=<seed>`` (a random initialisation is only reproducible with its
    seed); ``chromosome:<cache folder>:sha256:<hex>`` for the cached chromosome-pretrained file
    (the folder names its settings); ``sha256:<hex>`` of any other weights file.
    """
    if used == "imagenet":
        return "imagenet"
    if used == "none":
        return f"none:seed={seed}"
    from karyo.manifest import sha256_file

    if used == "chromosome":
        return f"chromosome:{Path(weights_arg).parent.name}:sha256:{sha256_file(weights_arg)}"
    return f"sha256:{sha256_file(weights_arg)}"


def load_backbone_weights(model, path):
    """Load a weights file into a built backbone (same architecture; any input size).

    Accepted formats:

    * ``*.weights.h5``: Keras 3 weights of the backbone itself, as written by
      ``backbone.save_weights(...)`` (matched by layer order and type, not by name);
    * ``*.h5`` / ``*.hdf5``: legacy Keras 2 weights in topological order, such as the files
      ``keras.applications`` downloads (e.g. ``vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5``);
    * ``*.keras``: a saved karyo model (``model.keras`` of a run, e.g. the intermediate
      chromosome task of the two-step transfer): its ``backbone`` layer's weights are copied.

    Raises:
        KaryoError: the file is missing, unreadable or does not fit the architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise KaryoError(f"{path}: weights file not found")
    try:
        if path.suffix == ".keras":
            from karyo.models import load_model

            source = load_model(path)
            try:
                donor = source.get_layer("backbone")
            except ValueError:
                raise KaryoError(f"{path}: not a karyo model (it has no layer named 'backbone')") from None
            shapes = [tuple(w.shape) for w in donor.weights]
            if shapes != [tuple(w.shape) for w in model.weights]:
                raise KaryoError(f"{path}: its backbone ({donor.count_params():,} parameters) does "
                                 f"not match this one ({model.count_params():,})")
            model.set_weights(donor.get_weights())
        else:
            model.load_weights(str(path))
    except KaryoError:
        raise
    except Exception as exc:  # Keras raises ValueError / OSError / KeyError for unusable files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KaryoError(f"{path}: cannot load these weights into the {model.name} backbone "
                         f"(a file for another architecture? {first})") from None
    return model


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
        backbone's own ``preprocess_input`` (see ``karyo.models.Preprocess``).

    Raises:
        KaryoError: unknown backbone, too small an image size, or unusable weights.
    """
    import keras

    backbone = get_backbone(name)
    image_size = check_image_size(backbone.name, image_size)
    weights_arg, used, _ = resolve_weights(weights, backbone.name, image_size=image_size)
    if seed is not None:
        keras.utils.set_random_seed(int(seed))
    constructor = getattr(keras.applications, backbone.constructor)
    model = constructor(include_top=False, weights="imagenet" if used == "imagenet" else None,
                        input_shape=(image_size, image_size, 3))
    if used in ("file", "chromosome"):
        load_backbone_weights(model, weights_arg)
    # A stable name lets other code find it inside a karyo model (get_layer("backbone")).
    model.name = "backbone"
    return model


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


def _graph(model):
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
    operations, parents, outputs = _graph(model)
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
    operations, _, outputs = _graph(model)
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
