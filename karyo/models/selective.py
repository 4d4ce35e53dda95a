"""Selective fine-tuning, as BioTune does it: any subset of the backbone's blocks, each at its own rate.

BioTune (Colan et al., seed 002) encodes a fine-tuning recipe as a genome of one gene per block
and one threshold gene, all in [0, 1]: a block trains when its gene exceeds the threshold, and a
trained block's learning rate is the base rate times ``10 ** (2 * (gene - 0.5))`` (a tenth to ten
times the base rate). The head always trains, at the base rate. Unlike thesis 4.3 (VGG16's last
one or two blocks, InceptionV3 entirely) the trained blocks need not be the last ones.

* :func:`biotune_configuration`: genes -> ``{block: rate or None}`` (pure, no TensorFlow);
* :func:`train_blocks`: make exactly those blocks trainable in a model of
  ``karyo.models.network.build_model`` (BatchNormalization stays frozen, as in
  :mod:`karyo.models.unfreeze`);
* :func:`scaled_optimizer`: per-block learning rates inside Keras' own training loop.

Example:
    >>> biotune_configuration([0.2, 0.9, 0.1, 0.7, 0.5], 0.6, "vgg16", 1e-5)  # doctest: +SKIP
    {'block1': None, 'block2': 2.5e-05, 'block3': None, 'block4': 1.58e-05, 'block5': None}
"""

import functools
import math
import numbers

import keras

from karyo.errors import KaryoError
from karyo.models.backbones import get_backbone
from karyo.models.network import BACKBONE_NAME, backbone_blocks, part
from karyo.models.unfreeze import sublayers


def rate_ratio(gene):
    """A trained block's learning rate over the base rate: ``10 ** (2 * (gene - 0.5))`` (0.1 .. 10)."""
    return 10.0 ** (2.0 * (float(gene) - 0.5))


def _unit(value, what):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:
        raise KaryoError(f"{what} must be a number in [0, 1], not {value!r}")
    return float(value)


def biotune_configuration(genes, threshold, backbone, base_lr):
    """Which blocks of ``backbone`` train, and at which learning rate, for one BioTune genome.

    Args:
        genes: one number in [0, 1] per block, input to output, or a dict ``{block name: gene}``.
        threshold: the threshold gene in [0, 1]; a block trains when its gene exceeds it.
        backbone: a registered backbone name (its blocks: ``karyo.models.backbones``).
        base_lr: the base learning rate (the head's).

    Returns:
        ``{block name: learning rate, or None for a frozen block}``, in the backbone's block order.

    Raises:
        KaryoError: a gene or threshold outside [0, 1], the wrong number of genes, or a bad rate.
    """
    names = get_backbone(backbone).block_names()
    if isinstance(genes, dict):
        missing = [n for n in names if n not in genes]
        if missing or len(genes) != len(names):
            raise KaryoError(f"{backbone} needs one gene per block ({', '.join(names)}), got "
                             f"{', '.join(map(str, genes)) or 'none'}")
        genes = [genes[n] for n in names]
    genes = list(genes)
    if len(genes) != len(names):
        raise KaryoError(f"{backbone} has {len(names)} blocks, so {len(names)} genes, not {len(genes)}")
    threshold = _unit(threshold, "the threshold gene")
    if isinstance(base_lr, bool) or not isinstance(base_lr, numbers.Real) or not 0 < base_lr < math.inf:
        raise KaryoError(f"the base learning rate must be a positive number, not {base_lr!r}")
    genes = [_unit(g, f"the gene of block {n}") for g, n in zip(genes, names)]
    return {n: float(base_lr) * rate_ratio(g) if g > threshold else None for n, g in zip(names, genes)}


def first_trained_block(configuration):
    """Index of the first block that trains (its input is the cut point to cache), or None."""
    return next((i for i, rate in enumerate(configuration.values()) if rate is not None), None)


def train_blocks(model, names, train_batchnorm=False):
    """Make the backbone's blocks ``names`` trainable (any subset) and freeze the rest of it.

    Args:
        model: a model made by ``karyo.models.network.build_model``.
        names: the blocks to train (names from ``karyo.models.backbones``), in any order.
        train_batchnorm: also train their BatchNormalization layers (default False, as
            ``karyo.models.unfreeze.unfreeze_blocks``: small batches would overwrite the statistics).

    Returns:
        ``{block name: [its trainable variables]}`` for the blocks that train. Recompile the
        model before fitting (Keras fixes the trainable weights at compile time).

    Raises:
        KaryoError: a block name the backbone does not have.
    """
    spans = backbone_blocks(model)
    known = [s.name for s in spans]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise KaryoError(f"no block {', '.join(unknown)} in this backbone (its blocks: {', '.join(known)})")
    chosen = set(names)
    backbone = part(model, BACKBONE_NAME)
    backbone.trainable = bool(chosen)
    variables = {}
    for span in spans:
        on = span.name in chosen
        for layer in span.layers:
            layer.trainable = on
            if on and not train_batchnorm:
                for sub in sublayers(layer):
                    if isinstance(sub, keras.layers.BatchNormalization):
                        sub.trainable = False
        if on:
            variables[span.name] = [v for layer in span.layers for v in layer.trainable_weights]
    return variables


@functools.lru_cache(maxsize=None)
def _scaled_class(base):
    """A subclass of the Keras optimizer class ``base`` whose step for each variable uses its own rate."""

    class Scaled(base):
        def __init__(self, *args, ratios=(), **kwargs):
            super().__init__(*args, **kwargs)
            # By the variable object: Keras passes the same objects to ``build``.
            self.ratio_by_id = {id(v): float(r) for v, r in ratios}
            self.variable_ratios = []

        def build(self, variables):
            super().build(variables)
            self.variable_ratios = [self.ratio_by_id.get(id(v), 1.0) for v in variables]

        def update_step(self, gradient, variable, learning_rate):
            ratio = self.variable_ratios[self._get_variable_index(variable)]
            # A ratio of 1 leaves the rate untouched: that step is the plain optimizer's, bit for bit.
            if ratio != 1.0:
                learning_rate = learning_rate * ratio
            return super().update_step(gradient, variable, learning_rate)

    Scaled.__name__ = Scaled.__qualname__ = f"PerBlock{base.__name__}"
    return Scaled


def scaled_optimizer(optimizer, ratios):
    """A copy of the Keras ``optimizer`` whose learning rate is multiplied, per variable, by a ratio.

    The learning rate handed to the optimizer's own ``update_step`` is scaled, so the *update*
    is scaled for any optimizer whose step is proportional to its rate: plain SGD (ratio 2 moves
    a variable twice as far) and Adam (whose update ``lr * m / (sqrt(v) + eps)`` does not depend on
    the gradient's scale, so scaling gradients would not change its rates; scaling ``lr`` does).
    A ratio of 0 leaves the variable where it is. Variables not listed keep the base rate.

    Args:
        optimizer: a Keras optimizer instance (its config is copied; it is not changed).
        ratios: pairs ``(variable, ratio)``, e.g. each trained block's variables with
            ``rate / base_lr``.

    Returns:
        A new optimizer of a subclass of ``type(optimizer)``; compile the model with it.
    """
    pairs = [(v, float(r)) for v, r in ratios]
    bad = [r for _, r in pairs if not (math.isfinite(r) and r >= 0)]
    if bad:
        raise KaryoError(f"learning-rate ratios must be finite and >= 0, not {bad[0]!r}")
    return _scaled_class(type(optimizer))(ratios=pairs, **optimizer.get_config())


def fixed_recipe(backbone, n, lr):
    """The thesis' kind of recipe as a configuration: the last ``n`` blocks (or ``"all"``) at ``lr``.

    Thesis 4.3 trained VGG16's last one and two blocks and InceptionV3 entirely, all at one rate;
    this puts those recipes beside :func:`biotune_configuration`'s (``{block: rate or None}``).
    """
    names = get_backbone(backbone).block_names()
    k = len(names) if str(n).strip().lower() == "all" else int(n)
    if not 0 <= k <= len(names):
        raise KaryoError(f"{backbone} has {len(names)} blocks, so it cannot train the last {n}")
    return {b: (float(lr) if i >= len(names) - k else None) for i, b in enumerate(names)}
