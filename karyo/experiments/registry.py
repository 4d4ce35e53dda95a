"""The experiment registry: every run the project knows, declared once as data.

The first seven entries are the rows of the thesis' Table 5.1 (section 5), with the numbers it
published and the confusion counts its chapter 4 reports, so a reproduction can be set beside
them. Further entries go beyond the thesis (SPEC 5): other backbones, training from scratch, a
deep ensemble instead of MC Dropout. Run any of them by name: ``karyo train NAME``,
``karyo.experiments.training.train_experiment(get_experiment(NAME), ...)``, or from the notebooks.

Defaults quote the thesis: input 416x416 (3.1.2), Adam with learning rate 1e-3 and batch size
16 (3.2, chosen by Bayesian search), 100 MC Dropout passes and an 80 % referral threshold (3.4).
"""

from dataclasses import asdict, dataclass, field, fields, replace

from karyo.errors import KaryoError
from karyo.thesis import (BATCH_SIZE, IMAGE_SIZE, LEARNING_RATE, MC_PASSES, REFERRAL_THRESHOLD, TABLE_5_1,
                          ThesisResult)


@dataclass(frozen=True)
class Experiment:
    """One training run, declared as data.

    Attributes:
        name: registry key, used by the CLI, notebooks and tests.
        title: the row's wording (the thesis' where it has one).
        backbone: a key of :data:`karyo.models.backbones.BACKBONES`.
        augmented: train on the thesis' augmented data (brightness +-25 %, noise on up to 5 % of
            the pixels, balanced to 376 normal / 316 abnormal from 105 / 41).
        unfreeze: backbone blocks fine-tuned after the head is trained: 0 (frozen backbone,
            thesis 4.1-4.2), 1 or 2 (VGG16's last one or two blocks, thesis 4.3.2-4.3.3) or
            ``"all"`` (InceptionV3 entirely, thesis 4.3.4).
        weights: ``imagenet`` (the thesis), ``none`` (from scratch) or ``auto``.
        ensemble: number of independently seeded members; > 1 makes a deep ensemble whose
            pooled members replace MC Dropout as the uncertainty estimate.
        image_size: input side in pixels (thesis: 416).
        epochs: head-training epochs; fine_tune_epochs: epochs after unfreezing.
        batch_size, lr: thesis 3.2's choice, 16 and 1e-3.
        fine_tune_lr: learning rate after unfreezing (1e-5: the thesis' 1e-3 / 100, the usual
            fine-tuning convention; the thesis does not say which it used).
        dense_units, dropout: the head's width and dropout rate (not given in the thesis).
        per_pair: also rotate, mirror and shift each chromosome pair inside its slot in the
            augmented copies (the thesis' future work, 5.3; needs ``augmented``).
        mc_passes, threshold: 100 passes and 80 % (thesis 3.4).
        thesis: the published result, for the seven Table 5.1 rows.
        family: ``thesis`` or ``beyond``.
        kind: ``network`` (a backbone and the thesis' head, trained on whole karyograms) or
            ``detector`` (:mod:`karyo.experiments.detection`: the karyogram read slot by slot;
            ``backbone`` is then ``none`` and ``epochs`` trains its slot head; ``augmented`` then adds
            degraded copies of the training cells, as other laboratories cut their crops).
    """

    name: str
    title: str
    backbone: str
    augmented: bool = True
    unfreeze: object = 0
    weights: str = "imagenet"
    ensemble: int = 1
    image_size: int = IMAGE_SIZE
    epochs: int = 30
    fine_tune_epochs: int = 30
    batch_size: int = BATCH_SIZE
    lr: float = LEARNING_RATE
    fine_tune_lr: float = 1e-5
    dense_units: int = 256
    dropout: float = 0.5
    per_pair: bool = False
    patience: int = 10
    mc_passes: int = MC_PASSES
    threshold: float = REFERRAL_THRESHOLD
    thesis: ThesisResult = field(default=None, compare=False)
    family: str = "thesis"
    kind: str = "network"

    def to_dict(self):
        return asdict(self)

    @property
    def uncertainty(self):
        return "deep ensemble" if self.ensemble > 1 else "MC Dropout"


#: The seven rows of thesis Table 5.1, in its order.
THESIS_EXPERIMENTS = (
    Experiment("vgg16_original", "original data on VGG16", "vgg16", augmented=False,
               thesis=TABLE_5_1["vgg16_original"]),
    Experiment("inceptionv3_original", "original data on InceptionV3", "inceptionv3", augmented=False,
               thesis=TABLE_5_1["inceptionv3_original"]),
    Experiment("vgg16_augmented", "processed data on VGG16", "vgg16",
               thesis=TABLE_5_1["vgg16_augmented"]),
    Experiment("inceptionv3_augmented", "processed data on InceptionV3", "inceptionv3",
               thesis=TABLE_5_1["inceptionv3_augmented"]),
    Experiment("vgg16_unfreeze1", "VGG16 with one block layers trained", "vgg16", unfreeze=1,
               thesis=TABLE_5_1["vgg16_unfreeze1"]),
    Experiment("vgg16_unfreeze2", "VGG16 with two blocks layers trained", "vgg16", unfreeze=2,
               thesis=TABLE_5_1["vgg16_unfreeze2"]),
    Experiment("inceptionv3_unfreeze_all", "InceptionV3 with entire network trained", "inceptionv3",
               unfreeze="all", thesis=TABLE_5_1["inceptionv3_unfreeze_all"]),
)

#: Runs beyond the thesis (SPEC 5): scratch vs ImageNet, deep ensemble vs MC Dropout, backbones.
BEYOND_EXPERIMENTS = (
    Experiment("vgg16_scratch", "VGG16 trained from scratch (no ImageNet weights)", "vgg16",
               weights="none", unfreeze="all", lr=1e-4, fine_tune_lr=1e-4, family="beyond"),
    Experiment("vgg16_ensemble", "VGG16 deep ensemble of 5 (instead of MC Dropout)", "vgg16",
               ensemble=5, family="beyond"),
    Experiment("vgg16_per_pair", "processed data on VGG16, each pair also rotated, mirrored and shifted in its slot",
               "vgg16", per_pair=True, family="beyond"),
    Experiment("resnet50_augmented", "processed data on ResNet50", "resnet50", family="beyond"),
    Experiment("densenet121_augmented", "processed data on DenseNet121", "densenet121", family="beyond"),
    Experiment("efficientnetv2b0_augmented", "processed data on EfficientNetV2-B0", "efficientnetv2b0",
               family="beyond"),
    Experiment("convnext_tiny_augmented", "processed data on ConvNeXt-Tiny", "convnext_tiny",
               family="beyond"),
    Experiment("mobilenetv3large_augmented", "processed data on MobileNetV3-Large", "mobilenetv3large",
               family="beyond"),
    Experiment("xception_augmented", "processed data on Xception", "xception", family="beyond"),
    Experiment("karyotype_detector", "karyotype detector: each slot's count and homologs, MC Dropout per slot",
               "none", augmented=False, weights="none", epochs=30, family="beyond", kind="detector"),
    Experiment("karyotype_detector_degraded", "karyotype detector trained also on degraded crops (other labs' "
               "raw boxes)", "none", augmented=True, weights="none", epochs=30, family="beyond", kind="detector"),
)

#: name -> Experiment, every registered run.
EXPERIMENTS = {e.name: e for e in THESIS_EXPERIMENTS + BEYOND_EXPERIMENTS}


def list_experiments(family=None):
    """Registered experiments, in registry order (optionally one family)."""
    return [e for e in EXPERIMENTS.values() if family in (None, e.family)]


def get_experiment(name, **overrides):
    """The experiment ``name`` with ``overrides`` applied (unknown fields or names raise).

    Example:
        >>> get_experiment("vgg16_augmented", image_size=32, epochs=2).image_size
        32
    """
    try:
        experiment = EXPERIMENTS[name]
    except KeyError:
        known = ", ".join(EXPERIMENTS)
        raise KaryoError(f"unknown experiment '{name}' (known: {known})") from None
    valid = {f.name for f in fields(Experiment)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise KaryoError(f"unknown experiment setting(s): {', '.join(unknown)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    experiment = replace(experiment, **overrides)
    if experiment.per_pair and not experiment.augmented:
        raise KaryoError(f"{name}: per-pair augmentation works on the augmented copies, and this experiment "
                         "trains on the original images only (choose an augmented one, e.g. vgg16_augmented)")
    return experiment
