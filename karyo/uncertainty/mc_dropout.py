"""Monte Carlo Dropout prediction: T stochastic passes per image (thesis 3.4, 4.4).

The thesis ran "100 times predictions for every image" with dropout on, took the most
predicted label as the prediction and its share of the votes as the confidence score. Only the
head holds dropout layers, and everything before the first one (backbone and pooling) gives
the same result on every pass. :func:`mc_predict` therefore runs that deterministic part once
per image and only the head T times, inside one compiled TensorFlow loop per batch of images
(no Python loop over passes), so 100 passes cost little more than one ordinary prediction
(SPEC 6). :func:`naive_mc_predict` runs the whole network T times: the reference that
:func:`mc_predict` is tested against, and the baseline of ``karyo bench``.

Reproducibility: with ``seed`` both functions first rewind every ``MCDropout`` layer's mask
sequence (:func:`reset_mc_dropout_seeds`); then they visit batches and passes in the same order
(for each batch, pass 1..T), so they draw the same masks and give the same passes.

The statistics of the passes (vote share, mean probability, entropy, mutual information) are
in ``karyo.uncertainty.confidence``.
"""

import weakref

import numpy as np

from karyo import thesis
from karyo.errors import KaryoError
from karyo.models.backbones import cut_points, layer_graph
from karyo.models.layers import MCDropout

#: T of the thesis (section 3.4: 100 predictions per image).
DEFAULT_PASSES = thesis.MC_PASSES

# model -> (deterministic part or None, stochastic part, compiled T-pass function)
_COMPILED = weakref.WeakKeyDictionary()


def mc_dropout_layers(model):
    """Every ``MCDropout`` layer in ``model`` (nested models included), in graph order."""

    found = []

    def visit(layer):
        if isinstance(layer, MCDropout):
            found.append(layer)
        for sub in getattr(layer, "layers", None) or ():
            visit(sub)

    for layer in model.layers:
        visit(layer)
    return found


def reset_mc_dropout_seeds(model, seed):
    """Rewind the mask sequence of every ``MCDropout`` layer of ``model`` to a state set by ``seed``.

    Layer i gets a state derived from (seed, i), so two layers never share masks.
    """
    for i, layer in enumerate(mc_dropout_layers(model)):
        state = np.random.SeedSequence([int(seed), i]).generate_state(1, np.uint32)[0]
        layer.seed_generator.state.assign(np.array([int(state), 0], dtype="int64"))


def split_at_first_mc_dropout(model):
    """Split ``model`` before the first top-level layer that is or holds an ``MCDropout``.

    Returns:
        ``(deterministic_part, stochastic_part)``; ``deterministic_part`` is None when the
        dropout comes right after the input. Both share their layers with ``model``.

    Raises:
        KaryoError: the model has no ``MCDropout`` layer, or the split point is not a single
            tensor that feeds everything after it.
    """
    import keras

    if not mc_dropout_layers(model):
        raise KaryoError(f"model '{model.name}' has no MCDropout layer: its passes would all be equal")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise KaryoError(f"model '{model.name}' must have one input and one output for MC Dropout")
    operations, _, outputs = layer_graph(model)
    cuts = cut_points(model)
    for i, op in enumerate(operations):
        if mc_dropout_layers_of(op):
            break
    # The cut is the output of the operation just before it; it must feed everything after.
    cut = i - 1
    if cut < 0 or not cuts[cut]:
        raise KaryoError(f"model '{model.name}': the layers before its first MCDropout do not end "
                         f"in a single tensor; cannot run them once per image")
    if isinstance(operations[cut], keras.layers.InputLayer):
        # A new wrapper (sharing the layers), so that the compiled-function cache does not
        # keep ``model`` itself alive.
        return None, keras.Model(model.inputs, model.outputs[0], name="stochastic_part")
    deterministic = keras.Model(model.inputs, outputs[cut], name="deterministic_part")
    stochastic = keras.Model(outputs[cut], model.outputs[0], name="stochastic_part")
    return deterministic, stochastic


def mc_dropout_layers_of(layer):
    """The ``MCDropout`` layers in ``layer`` itself or inside it (if it is a model)."""

    if isinstance(layer, MCDropout):
        return [layer]
    return mc_dropout_layers(layer) if hasattr(layer, "layers") else []


def _compiled(model):
    """The parts of ``model`` and a compiled function running the stochastic part T times."""
    if model in _COMPILED:
        return _COMPILED[model]
    import tensorflow as tf

    deterministic, stochastic = split_at_first_mc_dropout(model)
    spec = tf.TensorSpec((None,) + tuple(stochastic.inputs[0].shape[1:]), tf.float32)

    @tf.function(input_signature=[spec, tf.TensorSpec((), tf.int32)])
    def passes(features, T):
        # A graph loop: one pass per iteration, each drawing fresh masks from the layers' seed
        # generators in the same order as T calls of the full model would.
        out = tf.TensorArray(tf.float32, size=T)
        for t in tf.range(T):
            out = out.write(t, tf.cast(stochastic(features, training=False), tf.float32))
        return out.stack()

    _COMPILED[model] = (deterministic, stochastic, passes)
    return _COMPILED[model]


def _check(images, T, batch_size, shape, what):
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 1:
        raise KaryoError(f"the number of MC passes must be a positive whole number, not {T!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise KaryoError(f"batch size must be a positive whole number, not {batch_size!r}")
    array = np.asarray(images)
    if array.ndim != len(shape) + 1 or tuple(array.shape[1:]) != tuple(shape):
        raise KaryoError(f"{what} of shape {array.shape[1:]} do not fit the network, which takes "
                         f"{tuple(shape)}")
    return array.astype(np.float32, copy=False)


def _squeeze(out):
    # Binary task (one sigmoid): (T, N); multi-class: (T, N, C).
    return out[..., 0] if out.shape[-1] == 1 else out


def mc_predict(model, images, T=DEFAULT_PASSES, batch_size=32, features=None, seed=None,
               progress=False):
    """T Monte Carlo Dropout passes for every image, running the backbone once per image.

    Args:
        model: a model with ``MCDropout`` layers (``karyo.models.network.build_model``).
        images: array (N, H, W, 3) of RGB pixels in 0..255; ignored when ``features`` is given.
        T: passes per image (thesis: 100).
        batch_size: images per batch (the same batches as :func:`naive_mc_predict`).
        features: the deterministic part's output for the images, if already known (e.g. from
            ``karyo.models.features.cached_features`` with ``split_model(model, 0)[0]``): the
            backbone is then not run at all.
        seed: rewind the dropout masks first (see :func:`reset_mc_dropout_seeds`); None keeps
            the layers' current random state.
        progress: show a tqdm bar over the batches.

    Returns:
        float32 array (T, N) of probabilities of the positive class ("abnormal") for a
        one-output model, or (T, N, C) of class probabilities.

    Raises:
        KaryoError: bad T / batch size, images or features of the wrong shape, or a model
            without ``MCDropout``.
    """
    from tqdm.auto import tqdm

    deterministic, stochastic, passes = _compiled(model)
    if features is not None:
        data = _check(features, T, batch_size, stochastic.inputs[0].shape[1:], "features")
    else:
        data = _check(images, T, batch_size, model.inputs[0].shape[1:], "images")
    if seed is not None:
        reset_mc_dropout_seeds(model, seed)
    n_out = int(model.outputs[0].shape[-1])
    out = np.empty((int(T), len(data), n_out), np.float32)
    starts = range(0, len(data), int(batch_size))
    for start in tqdm(starts, desc="MC Dropout", unit="batch", disable=not progress, leave=False):
        chunk = data[start:start + batch_size]
        if features is None and deterministic is not None:
            chunk = np.asarray(deterministic.predict_on_batch(chunk), np.float32)
        out[:, start:start + len(chunk)] = passes(chunk, np.int32(T)).numpy()
    return _squeeze(out)


def naive_mc_predict(model, images, T=DEFAULT_PASSES, batch_size=32, seed=None):
    """T Monte Carlo Dropout passes by calling the whole network T times (the slow reference).

    Same arguments and result as :func:`mc_predict`; with the same ``seed`` both give the
    same passes.
    """
    data = _check(images, T, batch_size, model.inputs[0].shape[1:], "images")
    if seed is not None:
        reset_mc_dropout_seeds(model, seed)
    n_out = int(model.outputs[0].shape[-1])
    out = np.empty((int(T), len(data), n_out), np.float32)
    for start in range(0, len(data), int(batch_size)):
        chunk = data[start:start + batch_size]
        for t in range(int(T)):
            out[t, start:start + len(chunk)] = model.predict_on_batch(chunk)
    return _squeeze(out)
