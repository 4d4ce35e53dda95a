"""One common test over every registered experiment, and the thesis' own numbers."""

import pytest

from karyo.models.backbones import get_backbone
from karyo.cli import main
from karyo.errors import KaryoError
from karyo.experiments.registry import EXPERIMENTS, THESIS_EXPERIMENTS, get_experiment, list_experiments

TABLE_51_NAMES = ["vgg16_original", "inceptionv3_original", "vgg16_augmented", "inceptionv3_augmented",
                  "vgg16_unfreeze1", "vgg16_unfreeze2", "inceptionv3_unfreeze_all"]


def test_the_seven_thesis_rows_in_table_order():
    assert [e.name for e in THESIS_EXPERIMENTS] == TABLE_51_NAMES
    assert [e.name for e in list_experiments("thesis")] == TABLE_51_NAMES
    for e in THESIS_EXPERIMENTS:
        assert e.thesis is not None and e.lr == 1e-3 and e.batch_size == 16 and e.image_size == 416
        assert e.mc_passes == 100 and e.threshold == 0.8 and e.weights == "imagenet"
    assert get_experiment("vgg16_original").augmented is False
    assert get_experiment("vgg16_unfreeze2").unfreeze == 2
    assert get_experiment("inceptionv3_unfreeze_all").unfreeze == "all"


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_every_experiment_is_buildable_as_declared(name):
    from karyo.models.network import n_blocks_arg

    e = get_experiment(name)
    assert e.kind in ("network", "detector") and e.ensemble >= 1 and e.title
    if e.kind == "detector":  # no backbone: the karyogram is read slot by slot
        assert e.backbone == "none" and e.epochs > 0 and e.mc_passes > 0
        return
    backbone = get_backbone(e.backbone)
    assert e.image_size >= backbone.min_size
    n_blocks_arg(e.unfreeze, len(backbone.blocks))  # a valid depth for this backbone
    assert e.ensemble >= 1 and 0 < e.dropout < 1 and e.title


def test_thesis_confusion_counts_recompute_the_table_where_they_agree():
    # Sections 4.1.1, 4.1.2 and 4.3.4 agree with Table 5.1; 4.3.3's counts give 0.957, not 0.98.
    for name in ("vgg16_original", "inceptionv3_original", "inceptionv3_unfreeze_all"):
        t = EXPERIMENTS[name].thesis
        r = t.recomputed()
        assert abs(r["accuracy"] - t.accuracy) < 0.01 and abs(r["recall"] - t.recall) < 0.01
    r = EXPERIMENTS["vgg16_unfreeze2"].thesis.recomputed()
    assert round(r["accuracy"], 3) == 0.957 and r["n"] == 139


def test_overrides_and_unknown_names():
    assert get_experiment("vgg16_augmented", image_size=32, epochs=2).image_size == 32
    with pytest.raises(KaryoError, match="unknown experiment 'nope'"):
        get_experiment("nope")
    with pytest.raises(KaryoError, match="unknown experiment setting"):
        get_experiment("vgg16_augmented", colour="blue")


def test_karyo_list_shows_every_experiment(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in EXPERIMENTS:
        assert name in out
    assert "thesis: acc 0.83 prec 0.83 rec 0.56 AUC 0.79" in out
