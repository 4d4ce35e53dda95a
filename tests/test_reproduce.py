"""`karyo reproduce` end to end with the tiny preset: the report agrees with the run folders."""

import json
import re

import pytest

from karyo.cli import main
from karyo.experiments.registry import THESIS_EXPERIMENTS
from karyo.experiments.report import METRICS, interval_of


@pytest.fixture(scope="module")
def reproduction(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    assert main(["reproduce", "--preset", "tiny", "--out", str(out)]) == 0
    return out


def _table_rows(markdown, heading):
    section = markdown.split(heading, 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ") and "[" in line]


@pytest.mark.slow
def test_report_tables_match_the_run_folders(reproduction):
    report = (reproduction / "report.md").read_text()
    assert (reproduction / "report.html").is_file()
    for protocol in ("thesis", "grouped"):
        rows = _table_rows(report, f"### Protocol `{protocol}`")
        assert len(rows) == 7
        for exp, line in zip(THESIS_EXPERIMENTS, rows):
            cells = [c.strip() for c in line.strip("|").split("|")]
            assert cells[0] == exp.title
            link = re.search(r"\[([^\]]+)\]\(([^)]+)\)", cells[1])
            assert link.group(1) == exp.name
            assert link.group(2) == f"runs/{protocol}/{exp.name}/config.json"
            assert (reproduction / link.group(2)).is_file()
            metrics = json.loads((reproduction / "runs" / protocol / exp.name / "metrics.json").read_text())
            for k, cell in zip(METRICS, cells[2:6]):
                assert cell == ("–" if metrics[k] is None else f"{metrics[k]:.2f}"), (protocol, exp.name, k)
            ci = interval_of({"dir": reproduction / "runs" / protocol / exp.name})
            if ci["auc"][0] is None:
                assert cells[6:9] == ["–"] * 3
            else:
                assert cells[6] == f"[{ci['auc'][0]:.2f}, {ci['auc'][1]:.2f}]"
                assert cells[7] == f"[{ci['recall'][0]:.2f}, {ci['recall'][1]:.2f}]"
                assert cells[8].startswith("yes" if ci["auc"][0] > 0.5 else "no")
            assert cells[9:13] == [f"{getattr(exp.thesis, k):.2f}" for k in METRICS]


@pytest.mark.slow
def test_leakage_tuning_and_rerun_skips_finished_work(reproduction, capsys):
    report = (reproduction / "report.md").read_text()
    assert "## The leakage effect" in report and "Bayesian search" in report
    assert (reproduction / "tuning" / "best.json").is_file()
    assert (reproduction / "figures" / "roc_vgg16_grouped.png").is_file()
    for protocol in ("thesis", "grouped"):
        config = json.loads((reproduction / "runs" / protocol / "vgg16_augmented" / "config.json").read_text())
        assert config["data"]["protocol"] == protocol
    stamp = (reproduction / "runs" / "grouped" / "vgg16_unfreeze1" / "metrics.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["reproduce", "--preset", "tiny", "--out", str(reproduction)]) == 0
    out = capsys.readouterr().out
    assert out.count("finished earlier, skipped") == 15  # 14 runs and the search
    assert (reproduction / "runs" / "grouped" / "vgg16_unfreeze1" / "metrics.json").stat().st_mtime_ns == stamp
    assert main(["report", str(reproduction)]) == 0


@pytest.mark.slow
def test_seeds_add_runs_beside_the_first_and_the_report_gives_mean_and_sd(reproduction, capsys):
    import statistics

    args = ["reproduce", "--preset", "tiny", "--out", str(reproduction), "--no-tune", "--protocols", "grouped",
            "--experiments", "vgg16_augmented", "--seeds", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "[grouped] vgg16_augmented seed 0: finished earlier, skipped" in out  # the first run
    assert "[grouped] vgg16_augmented seed 1: training" in out
    first = json.loads((reproduction / "runs/grouped/vgg16_augmented/config.json").read_text())
    second = json.loads((reproduction / "seeds/1/runs/grouped/vgg16_augmented/config.json").read_text())
    assert (first["seed"], second["seed"]) == (0, 1)
    aucs = [json.loads((folder / "runs/grouped/vgg16_augmented/metrics.json").read_text())["auc"]
            for folder in (reproduction, reproduction / "seeds" / "1")]
    report = (reproduction / "report.md").read_text()
    assert "## Across 2 seeds" in report
    section = report.split("## Across 2 seeds", 1)[1].split("\n## ", 1)[0].split("### Protocol `grouped`")[1]
    row = next(line for line in section.splitlines() if line.startswith("| vgg16_augmented |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "2"
    assert cells[5] == f"{statistics.mean(aucs):.2f} ± {statistics.stdev(aucs):.2f}"
    assert main(["reproduce", "--preset", "tiny", "--out", str(reproduction), "--seeds", "0"]) == 2


@pytest.mark.slow
def test_offline_reproduce_prints_no_download_line_and_each_warning_once(tmp_path, monkeypatch, capsys):
    import keras

    import karyo.models.weights as weights
    from karyo.experiments import pretrain

    # Offline, auto starts from the chromosome-pretrained backbone: a tiny pretraining here.
    monkeypatch.setenv("KARYO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pretrain, "DEFAULT_N_SYNTHETIC", 48)
    monkeypatch.setattr(pretrain, "DEFAULT_EPOCHS", 1)
    calls = []

    def offline(fname, origin, **kwargs):
        # What Keras' get_file does offline: announce the download, then fail to connect.
        calls.append(fname)
        print(f"Downloading data from {origin}")
        raise Exception(f"URL fetch failure on {origin}: None -- [Errno 111] Connection refused")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    monkeypatch.setattr(weights, "_FAILED_DOWNLOADS", {})
    args = ["reproduce", "--preset", "tiny", "--weights", "auto", "--no-tune", "--protocols", "thesis",
            "--experiments", "vgg16_augmented,vgg16_unfreeze1"]
    assert main(args + ["--out", str(tmp_path / "quiet")]) == 0
    out, err = capsys.readouterr()
    assert calls == [weights.get_backbone("vgg16").weights_file]  # never retried in this process
    assert "Downloading data from" not in out + err
    # Both runs read the same augmented data and start from chromosome weights: each warning once.
    lines = [line for line in err.splitlines() if line.startswith("karyo: warning:")]
    assert len(lines) == 2, lines
    assert sum("near-identical image" in line and "[in 2 runs;" in line for line in lines) == 1
    assert sum("ImageNet weights unavailable" in line and "[in 2 runs;" in line for line in lines) == 1

    # --verbose: every run's warnings, each naming its run.
    assert main(args + ["--out", str(tmp_path / "verbose"), "--verbose"]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("karyo: warning:")]
    assert len(lines) == 4, lines
    assert sum(line.startswith("karyo: warning: [thesis] vgg16_unfreeze1: ") for line in lines) == 2
