"""The search space of thesis 3.2, as a keras-tuner ``HyperModel``.

``KaryogramHyperModel.build(hp)`` declares the learning rate (log-uniform) and the batch size
(powers of two, applied in ``fit``, as keras-tuner's guide does), and for ``space="extended"``
the number of unfrozen blocks and the dropout rate; ``space="biotune"`` declares BioTune's genome
instead (one gene per block and a threshold gene, :mod:`karyo.models.selective`): any subset of
blocks fine-tuned, each at its own rate. ``fit(hp, model)`` trains what ``karyo train`` would
train with those values, on the cached features of the frozen part, and returns the best
epoch's validation loss and accuracy. :mod:`karyo.experiments.tuning` runs the search.
"""

import math

import keras
import keras_tuner
import numpy as np
from keras_tuner.errors import FailedTrialError

from karyo import thesis
from karyo.data.pipeline import make_dataset, steps_per_epoch
from karyo.errors import KaryoError
from karyo.experiments.fit import epoch_seeding
from karyo.models.backbones import get_backbone
from karyo.models.features import cached_features
from karyo.models.network import build_head, build_model, split_model
from karyo.models.selective import biotune_configuration, first_trained_block, scaled_optimizer, train_blocks
from karyo.models.unfreeze import unfreeze_blocks

#: The batch sizes the thesis' search could choose from (3.2: 16 or 32 best, 512 out of memory).
BATCH_SIZES = (8, 16, 32, 64, 128, 256, 512)
#: Learning-rate range searched, log-uniformly (the thesis found [7e-4, 3e-2] to work).
LR_RANGE = (1e-5, 1e-1)
#: The thesis' choices (3.2), used as the defaults of the search space.
THESIS_LR, THESIS_BATCH_SIZE = thesis.LEARNING_RATE, thesis.BATCH_SIZE
#: Dropout rates the extended space searches (both MCDropout layers of the head share one).
DROPOUT_RANGE = (0.1, 0.7, 0.1)
#: The search spaces: the thesis' (3.2), with the blocks and dropout too, and BioTune's genome.
SPACES = ("thesis", "extended", "biotune")
#: The threshold gene's name in the biotune space (each block's gene is ``gene_<block>``).
THRESHOLD_GENE = "threshold"


def gene_name(block):
    """The biotune space's hyperparameter for ``block``: ``gene_<block>``."""
    return f"gene_{block}"


def trial_configuration(values, backbone, base_lr):
    """A biotune trial's ``{block: learning rate or None}`` from its hyperparameter values."""
    genes = {b: values[gene_name(b)] for b in get_backbone(backbone).block_names()}
    return biotune_configuration(genes, values[THRESHOLD_GENE], backbone, base_lr)


def batch_size_choices(n_train):
    """Powers of two from 8 to 512 (thesis 3.2), without those larger than the training set.

    A batch larger than the training set is the whole set, like the next smaller power, so it
    would only repeat a trial. At least the smallest value remains.
    """
    return [b for b in BATCH_SIZES if b <= n_train] or [BATCH_SIZES[0]]


def unfreeze_choices(backbone):
    """How many of the backbone's last blocks the extended space may fine-tune.

    0, 1 and 2 for every backbone: the thesis trained VGG16's last one and two blocks (4.3.2,
    4.3.3). Backbones cut into many small blocks (8 or more: InceptionV3's stem and 11
    Inception modules, Xception, EfficientNetV2-B0, MobileNetV3) also get half of their blocks
    and all of them, which is what the thesis did with InceptionV3 (4.3.4).
    """

    n = len(get_backbone(backbone).blocks)
    choices = [0, 1, 2] + ([n // 2, n] if n >= 8 else [])
    return sorted({c for c in choices if c <= n})


def unfreeze_value(k, backbone):
    """The depth as ``karyo train`` takes it: ``"all"`` when every block is unfrozen."""

    return "all" if k and k == len(get_backbone(backbone).blocks) else int(k)


def compile_trial(model, lr, optimizer=None):
    """Adam at ``lr`` (or ``optimizer``), binary cross-entropy, accuracy: the metrics of thesis
    Figs. 3.3 / 3.4."""
    optimizer = optimizer if optimizer is not None else keras.optimizers.Adam(learning_rate=lr)
    model.compile(optimizer=optimizer, loss="binary_crossentropy",
                  metrics=[keras.metrics.BinaryAccuracy(name="accuracy")])
    return model


def fit_trial(model, x_train, y_train, x_val, y_val, lr, batch_size, epochs, seed, verbose,
              stream="trial", optimizer=None):
    """Fit ``model`` for ``epochs``; return its best epoch's metrics (lowest validation loss).

    ``optimizer`` replaces Adam at ``lr`` (the biotune space's per-block rates).

    Each epoch's order and dropout masks are drawn from (seed, ``stream``, epoch) alone
    (``karyo.experiments.fit.epoch_seeding``): a trial run again after a kill scores the same."""
    compile_trial(model, lr, optimizer)
    seeding = epoch_seeding(seed, stream)
    train = make_dataset(x_train, y_train.astype("float32"), batch_size, shuffle=True,
                         seed=seeding.data_seed, first_epoch=0)
    val = make_dataset(x_val, y_val.astype("float32"), batch_size)
    history = model.fit(train, validation_data=val, epochs=epochs, verbose=verbose, shuffle=False,
                        steps_per_epoch=steps_per_epoch(len(x_train), batch_size),
                        callbacks=[seeding]).history
    val_loss = np.asarray(history["val_loss"], dtype=np.float64)
    if not np.isfinite(val_loss).any():
        raise FailedTrialError(f"training diverged: the validation loss is {val_loss[-1]} "
                               f"(learning rate {lr:.3g})")
    best = int(np.nanargmin(np.where(np.isfinite(val_loss), val_loss, np.nan)))
    return {name: float(values[best]) for name, values in history.items()}


class KaryogramHyperModel(keras_tuner.HyperModel):
    """The thesis' network with the search space of thesis 3.2 (see :func:`tune`).

    ``build(hp)`` returns the trainable part: the head on pooled features (``unfreeze`` 0)
    or the whole network (``unfreeze`` > 0, split into phases in ``fit``).
    ``fit(hp, model, data)`` applies the batch size and trains on ``data``, which arrives as
    keras-tuner's guide has it, through ``tuner.search(data=...)``; it returns the best epoch's
    ``val_loss`` and ``val_accuracy``.
    """

    def __init__(self, backbone, image_size, weights_arg, cache_key, space, lr_range,
                 batch_sizes, epochs, seed, input_dim, cache_dir, dense_units, dropout,
                 fine_tune_lr, progress=False):
        super().__init__(name="karyogram")
        self.backbone, self.image_size, self.weights_arg = backbone, image_size, weights_arg
        self.cache_key, self.space, self.lr_range = list(cache_key), space, tuple(lr_range)
        self.batch_sizes, self.epochs, self.seed = list(batch_sizes), int(epochs), int(seed)
        self.input_dim, self.cache_dir = int(input_dim), cache_dir
        self.dense_units, self.dropout, self.fine_tune_lr = dense_units, dropout, fine_tune_lr
        self.unfreeze = unfreeze_choices(backbone) if space == "extended" else [0]
        self.blocks = get_backbone(backbone).block_names()
        self.progress = progress

    def values(self, hp):
        """Register the search space in ``hp`` (idempotent) and return this trial's values."""
        low, high = self.lr_range
        default_lr = THESIS_LR if low <= THESIS_LR <= high else math.sqrt(low * high)
        default_batch = THESIS_BATCH_SIZE if THESIS_BATCH_SIZE in self.batch_sizes \
            else self.batch_sizes[0]
        values = {"dropout": self.dropout, "unfreeze": 0, "dense_units": self.dense_units}
        if self.space == "biotune":
            # BioTune's genome only: the head phase keeps the thesis' rate and batch size, so
            # trials differ by which blocks train and how fast. Defaults: nothing trains.
            values.update(lr=THESIS_LR, batch_size=default_batch)
            for block in self.blocks:
                values[gene_name(block)] = hp.Float(gene_name(block), 0.0, 1.0, default=0.5)
            values[THRESHOLD_GENE] = hp.Float(THRESHOLD_GENE, 0.0, 1.0, default=1.0)
            return values
        values["lr"] = hp.Float("lr", low, high, sampling="log", default=default_lr)
        values["batch_size"] = hp.Choice("batch_size", self.batch_sizes, default=default_batch)
        if self.space == "extended":
            low_d, high_d, step = DROPOUT_RANGE
            values["unfreeze"] = hp.Choice("unfreeze", self.unfreeze, default=0)
            values["dropout"] = hp.Float("dropout", low_d, high_d, step=step,
                                         default=self.dropout)
        return values

    def declare_hyperparameters(self, hp):
        # The whole space up front, so the oracle samples the batch size from the first
        # trial on (it is only read in ``fit``) and the chief knows the space without data.
        self.values(hp)

    def build(self, hp):
        v = self.values(hp)
        keras.utils.set_random_seed(self.seed)
        if v["unfreeze"] == 0 and not self.trains_blocks(v):
            return build_head(self.input_dim, v["dense_units"], v["dropout"], seed=self.seed)
        return build_model(self.backbone, self.image_size, weights=self.weights_arg,
                           dense_units=v["dense_units"], dropout=v["dropout"], seed=self.seed)

    def fit(self, hp, model, *args, data=None, verbose=0, **kwargs):
        """Train a trial on ``data``: ``{"images", "labels", "pooled"}``, each a dict by split."""
        # keras-tuner's callbacks (a checkpoint of every best epoch) are not used: the
        # search keeps hyperparameters, not models.
        if data is None:
            raise KaryoError("a trial needs data: pass it to the search, tuner.search(data=...)")
        v = self.values(hp)
        labels, pooled = data["labels"], data["pooled"]
        y_train, y_val = labels["train"], labels["val"]
        if v["unfreeze"] == 0 and not self.trains_blocks(v):
            return fit_trial(model, pooled["train"], y_train, pooled["val"], y_val, v["lr"],
                             v["batch_size"], self.epochs, self.seed, verbose)
        # As ``karyo train`` does: the head on the pooled features first, then the last
        # blocks with the head at the fine-tuning rate, on the frozen part's cached output.
        _, head = split_model(model, 0)
        fit_trial(head, pooled["train"], y_train, pooled["val"], y_val, v["lr"],
                  v["batch_size"], self.epochs, self.seed, verbose)
        optimizer = None
        if self.space == "biotune":
            # The chosen blocks (any subset) at their own rates, the head at the base rate;
            # everything from the first chosen block on runs, the part before it is cached.
            configuration = trial_configuration(v, self.backbone, self.fine_tune_lr)
            k = len(self.blocks) - first_trained_block(configuration)
            variables = train_blocks(model, [b for b, rate in configuration.items() if rate is not None])
            ratios = [(var, configuration[b] / self.fine_tune_lr) for b, vs in variables.items() for var in vs]
            optimizer = scaled_optimizer(keras.optimizers.Adam(learning_rate=self.fine_tune_lr), ratios)
        else:
            k = v["unfreeze"]
            unfreeze_blocks(model, k)
        frozen, trainable = split_model(model, k)
        images = data["images"]
        if frozen is None:  # the first block trains: the network trains on the images
            x = {p: images[p].astype("float32") for p in ("train", "val")}
        else:
            # Keyed by the cut point alone: trials (of any space) that cut there share it.
            key = self.cache_key + [f"unfreeze{k}"]
            x = {p: cached_features(frozen, images[p], key, self.cache_dir, progress=self.progress)
                 for p in ("train", "val")}
        return fit_trial(trainable, x["train"], y_train, x["val"], y_val, self.fine_tune_lr,
                         v["batch_size"], self.epochs, self.seed, verbose, stream="fine_tune",
                         optimizer=optimizer)

    def trains_blocks(self, values):
        """True if a biotune trial's genome trains at least one block."""
        if self.space != "biotune":
            return False
        configuration = trial_configuration(values, self.backbone, self.fine_tune_lr)
        return first_trained_block(configuration) is not None
