"""``karyo bench``: the JSON it writes has every figure, and the figures are sane (not fast).

Timings are never asserted (SPEC 6: benchmarks, not timed tests); the test checks the schema,
that numbers are positive and consistent with each other, and that the goals are evaluated.
"""

import json
import math

import numpy as np
import pytest

from karyo.bench import suite as bench
from karyo.errors import KaryoError

RATIO_KEYS = {
    "mc_dropout": ("ratio_vs_single_predict", "naive_ratio_vs_single_predict"),
    "head_training": ("speedup_vs_end_to_end", "extraction_seconds", "break_even_epochs"),
    "unfreeze_last_block": ("speedup", "extraction_seconds"),
    "tuner_trial": ("speedup", "extraction_seconds"),
    "pretraining": ("bf16_speedup", "bf16_matmul_speedup", "gmacs_per_image"),
}
TIMING_KEYS = {
    "mc_dropout": ("single_predict_seconds", "mc_predict_seconds", "naive_single_predict_seconds",
                   "naive_mc_predict_seconds"),
    "head_training": ("head_epoch_seconds", "end_to_end_epoch_seconds"),
    "unfreeze_last_block": ("cached_epoch_seconds", "full_network_epoch_seconds"),
    "tuner_trial": ("cached_trial_seconds", "images_trial_seconds"),
    "pretraining": (),
}


def _positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _check_stats(stats, where):
    assert set(stats) >= {"median", "min", "max", "repeats"}, where
    assert stats["repeats"] >= 1, where
    assert all(_positive(stats[k]) for k in ("median", "min", "max")), where
    assert stats["min"] <= stats["median"] <= stats["max"], where


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "sub" / "bench.json"
    result = bench.run_bench(tiny=True, out=out, progress=False)
    return result, out


@pytest.mark.slow
def test_tiny_bench_writes_complete_json(tiny_result):
    result, out = tiny_result
    written = json.loads(out.read_text())
    assert written["preset"] == "tiny" and written["schema"] == bench.SCHEMA_VERSION
    # Every section of the tiny preset (it leaves out reproduce_overhead: a whole reproduction).
    sections = [s for s in bench.SECTIONS if s in bench.PRESETS["tiny"]]
    assert "reproduce_overhead" not in sections and len(sections) == len(bench.SECTIONS) - 1
    assert set(written) >= set(sections) | {"machine", "goals", "seconds", "settings"}
    for section in sections:
        assert _positive(written[section]["section_seconds"]), section
    assert sum(written[s]["section_seconds"] for s in sections) <= written["seconds"]
    assert not list(out.parent.glob(".*.tmp")), "a temporary file was left behind"
    # What was returned is what was written (numbers survive the JSON round trip).
    assert written["goals"] == json.loads(json.dumps(bench._plain(result["goals"])))

    for section, keys in RATIO_KEYS.items():
        for key in keys:
            assert _positive(written[section][key]), f"{section}.{key}"
        for key in TIMING_KEYS[section]:
            _check_stats(written[section][key], f"{section}.{key}")
        assert written[section]["image_size"] >= 32

    for precision in ("float32", "mixed_bfloat16"):
        fig = written["pretraining"][precision]
        for key in ("images_per_second", "achieved_gflops", "matmul_limit_gflops", "share_of_matmul_limit"):
            assert _positive(fig[key]), f"pretraining.{precision}.{key}"
        _check_stats(fig["epoch_seconds"], f"pretraining.{precision}.epoch_seconds")

    mc = written["mc_dropout"]
    tiny_mc = bench.PRESETS["tiny"]["mc_dropout"]
    assert (mc["T"], mc["images"], mc["naive_images"]) == (tiny_mc["T"], tiny_mc["images"],
                                                           tiny_mc["naive_images"])
    # The ratio is a ratio of the recorded timings (median of per-repeat ratios lies in range).
    assert mc["ratio_spread"]["min"] <= mc["ratio_vs_single_predict"] <= mc["ratio_spread"]["max"]
    head = written["head_training"]
    assert head["speedup_spread"]["min"] <= head["speedup_vs_end_to_end"] <= head["speedup_spread"]["max"]
    assert written["unfreeze_last_block"]["cached_shape"][-1] == 512  # VGG16 block4_pool

    thr = written["backbone_throughput"]
    for name in ("vgg16", "inceptionv3"):
        fig = thr[name]
        assert _positive(fig["images_per_second"]) and _positive(fig["gmacs_per_image"])
        assert fig["images_per_second_min"] <= fig["images_per_second"] <= fig["images_per_second_max"]
        assert _positive(fig["share_of_matmul_limit"])
        # achieved GFLOP/s = images/s x 2 x MACs
        assert fig["achieved_gflops"] == pytest.approx(
            fig["images_per_second"] * 2 * fig["gmacs_per_image"], rel=1e-6)
    assert _positive(thr["matmul"]["limit_gflops"])
    assert thr["matmul"]["limit_gflops"] == max(thr["matmul"]["tensorflow"]["gflops"],
                                                thr["matmul"]["numpy"]["gflops"])

    syn = written["synth_render"]
    if syn["available"]:
        _check_stats(syn["seconds"], "synth_render.seconds")
        assert syn["images"] == 4
    else:
        assert "karyo.karyograms.synth" in syn["reason"]

    machine = written["machine"]
    assert machine["cores"] >= 1 and machine["tensorflow"] and machine["keras"]
    assert machine["mixed_precision_policy"] == "float32"

    mem = written["predict_memory"]
    assert list(mem["peak_rss_mb"]) == [str(n) for n in bench.PRESETS["tiny"]["predict_memory"]["counts"]]
    assert all(_positive(v) for v in mem["peak_rss_mb"].values()) and _positive(mem["in_memory_peak_rss_mb"])
    assert mem["peak_rss_mb_at_most_images"] == mem["peak_rss_mb"][str(mem["counts"][-1])]
    assert _positive(mem["throughput_vs_in_memory"]) and _positive(mem["rss_growth"])

    goals = bench.GOALS + bench.MEASURED_ONLY_GOALS
    assert set(written["goals"]) == {f"{s}.{k}" for s, k, _, _ in goals}
    for key, goal in written["goals"].items():
        section, name = key.split(".")
        assert goal["value"] == written[section][name]
        assert isinstance(goal["met"], bool)


@pytest.mark.slow
def test_format_bench_shows_every_figure(tiny_result):
    text = bench.format_bench(tiny_result[0])
    assert "tiny" in text.splitlines()[0]
    for needle in ("MC Dropout T=10", "naive MC Dropout", "head epoch speedup", "last block",
                   "keras-tuner trial", "vgg16 features at 75px", "inceptionv3 features",
                   "dense matmul", "karyo predict peak RSS", "pretraining mixed_bfloat16",
                   "streamed / in-memory throughput", "karyotype detector, T=10"):
        assert needle in text, needle
    for goal in tiny_result[0]["goals"].values():  # each goal with its verdict
        assert f"{goal['goal']}  {'met' if goal['met'] else 'NOT MET'}" in text


def test_goals_are_judged_against_their_bounds():
    result = {"mc_dropout": {"ratio_vs_single_predict": 1.3},
              "head_training": {"speedup_vs_end_to_end": 50.0}}
    goals = bench.evaluate_goals(result)
    assert goals["mc_dropout.ratio_vs_single_predict"]["met"] is False
    assert goals["head_training.speedup_vs_end_to_end"]["met"] is True
    assert goals["unfreeze_last_block.speedup"] == {"value": None, "goal": ">= 2.5", "met": False}
    assert bench.evaluate_goals({"mc_dropout": {"ratio_vs_single_predict": 1.2}})[
        "mc_dropout.ratio_vs_single_predict"]["met"] is True


def test_format_bench_of_a_partial_result():
    result = {"preset": "quick", "seconds": 3.0, "machine": {"cpu": "x", "cores": 2},
              "mc_dropout": {"backbone": "vgg16", "image_size": 128, "images": 8, "T": 100,
                             "ratio_vs_single_predict": 1.05,
                             "ratio_spread": {"min": 1.0, "max": 1.1},
                             "naive_ratio_vs_single_predict": 97.0,
                             "naive_ratio_spread": {"min": 97.0, "max": 97.0}}}
    result["goals"] = bench.evaluate_goals(result)
    text = bench.format_bench(result)
    assert "1.05x" in text and "<= 1.2  met" in text and "97" in text
    assert "head epoch" not in text


def test_the_memory_section_is_left_out_of_quick_and_judged_only_when_measured():
    assert "predict_memory" not in bench.PRESETS["quick"] and "predict_memory" in bench.PRESETS["full"]
    assert bench.PRESETS["full"]["predict_memory"]["counts"] == (500, 2000, 5000)
    assert not [k for k in bench.evaluate_goals({}) if k.startswith("predict_memory")]
    goals = bench.evaluate_goals({"predict_memory": {"peak_rss_mb_at_most_images": 2100.0,
                                                     "throughput_vs_in_memory": 0.95}})
    assert goals["predict_memory.peak_rss_mb_at_most_images"]["met"] is False
    assert goals["predict_memory.throughput_vs_in_memory"]["met"] is True


def test_count_macs_matches_the_published_vgg16_figure():
    from karyo.models.network import build_backbone

    # VGG16's convolutions at 224 px: 15.35 GMACs (Simonyan & Zisserman's 15.5 G includes
    # the fully connected top, which is removed here). At 32 px, (32 / 224)^2 of that.
    macs = bench.count_macs(build_backbone("vgg16", 32))
    assert macs == pytest.approx(15.35e9 * (32 / 224) ** 2, rel=0.01)


def test_resized_pool_gives_distinct_images():
    base = bench.stand_in_karyograms(3, 64)
    pool = bench._resized_pool(base, 10, 32)
    assert pool.shape == (10, 32, 32, 3) and pool.dtype == np.uint8
    assert len({image.tobytes() for image in pool}) == 10


def test_unknown_section_is_refused():
    with pytest.raises(KaryoError, match="unknown benchmark section 'warp'"):
        bench.run_bench(tiny=True, sections=["warp"], progress=False)


def test_mixed_precision_flag_from_the_environment(monkeypatch):
    monkeypatch.setenv(bench.MIXED_PRECISION_ENV, "1")
    assert bench._mixed_precision(None) is True
    assert bench._mixed_precision(False) is False
    monkeypatch.setenv(bench.MIXED_PRECISION_ENV, "0")
    assert bench._mixed_precision(None) is False


def test_reproduce_overhead_times_training_and_prediction_and_restores_them(monkeypatch, tmp_path):
    """The section's arithmetic on a stand-in reproduction: 0.2 s training, 0.1 s prediction."""
    import time

    from karyo.experiments import hypermodel, runs, training

    originals = (training.train_model, hypermodel.fit_trial, runs.pooled_passes)

    def fake_reproduce(out, **kwargs):
        training.train_model()  # the timed stand-ins below, called through the module
        runs.pooled_passes()
        time.sleep(0.2)  # outside training and prediction

    monkeypatch.setattr(training, "train_model", lambda *a, **k: time.sleep(0.2))
    monkeypatch.setattr(runs, "pooled_passes", lambda *a, **k: time.sleep(0.1))
    monkeypatch.setattr(bench, "reproduce", fake_reproduce)
    patched = (training.train_model, runs.pooled_passes)
    figures = bench.bench_reproduce_overhead({"preset": "tiny"}, None, tmp_path)
    assert figures["train_seconds"] >= 0.2 and figures["predict_seconds"] >= 0.1
    assert 0.25 < figures["share_outside_training_and_prediction"] < 0.6
    assert (training.train_model, runs.pooled_passes) == patched  # the timers are removed again
    assert hypermodel.fit_trial is originals[1]


def test_detector_section_times_each_karyogram_with_its_mc_passes(tmp_path):
    cfg = bench.PRESETS["tiny"]["detector"]
    result = bench.bench_detector(cfg, None, tmp_path / "detector")
    assert result["karyograms"] == cfg["karyograms"] and result["T"] == cfg["T"]
    for key in ("seconds_per_karyogram", "seconds_per_karyogram_one_by_one"):
        assert _positive(result[key]) and result[key] < 60, key
    spread = result["seconds_per_karyogram_spread"]
    assert spread["min"] <= result["seconds_per_karyogram"] <= spread["max"]
    goals = bench.evaluate_goals({"detector": result})
    assert goals["detector.seconds_per_karyogram"]["goal"] == "<= 1"
    assert "karyotype detector" in bench.format_bench({"detector": result, "goals": goals})
    assert "detector" in bench.PRESETS["quick"] and bench.PRESETS["quick"]["detector"]["T"] == 100
