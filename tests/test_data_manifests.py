"""The shipped data manifests: they parse, group by case, and match the shared data's bytes."""

import csv
import random
from collections import defaultdict
from pathlib import Path, PurePosixPath

import pytest

from karyo.data.manifest import CHROMOSOME_LABELS, read_manifest, verify_manifest, write_manifest

MANIFESTS = Path(__file__).resolve().parents[1] / "data_manifests"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SETS = ("gband612", "bioimlab_qband")


@pytest.fixture(scope="module", params=SETS)
def shipped(request):
    return request.param, read_manifest(MANIFESTS / f"{request.param}.csv")


def test_manifest_parses_with_the_documented_columns(shipped):
    _, manifest = shipped
    assert manifest.columns == ["path", "label", "group", "karyotype", "sha256", "cell",
                                "cell_label"]
    assert len(manifest) > 5000
    assert {row["label"] for row in manifest.rows} == set(CHROMOSOME_LABELS)  # both have males
    assert all(len(row["sha256"]) == 64 for row in manifest.rows)
    assert {row["cell_label"] for row in manifest.rows} <= {"normal", "abnormal", "uncertain"}


def test_paths_agree_with_class_and_cell_columns(shipped):
    _, manifest = shipped
    for row in manifest.rows:
        parts = PurePosixPath(row["path"]).parts
        assert parts[0] == "cells" and parts[1] == row["cell"] and len(parts) == 4
        assert CHROMOSOME_LABELS[int(parts[2]) - 1] == row["label"]


def test_every_group_is_a_case(shipped):
    """A cell belongs to one case only, and cells of one case share its group."""
    name, manifest = shipped
    case_of_cell = defaultdict(set)
    for row in manifest.rows:
        case_of_cell[row["cell"]].add(row["group"])
        if name == "gband612":  # cell ids are <case>.<metaphase>
            assert row["cell"].split(".")[0] == row["group"]
        else:  # BioImLab: one cell per case
            assert row["cell"] == row["group"]
    assert all(len(cases) == 1 for cases in case_of_cell.values())
    if name == "gband612":  # several metaphases per patient: the group is not the cell
        assert len({row["group"] for row in manifest.rows}) < len(case_of_cell)


@pytest.mark.realdata
def test_groups_karyotypes_and_labels_match_cells_csv(shipped):
    name, manifest = shipped
    cells_csv = SHARED_DATA / name / "cells.csv"
    if not cells_csv.is_file():
        pytest.skip("../shared/data is not present")
    with open(cells_csv, newline="") as fh:
        cells = {row["cell"]: row for row in csv.DictReader(fh)}
    per_cell = defaultdict(int)
    for row in manifest.rows:
        cell = cells[row["cell"]]
        assert (row["group"], row["karyotype"], row["cell_label"]) == (
            cell["case"], cell["karyotype"], cell["label"])
        per_cell[row["cell"]] += 1
    assert per_cell == {c: int(r["n_chromosomes"]) for c, r in cells.items()}
    on_disk = {p.relative_to(SHARED_DATA / name).as_posix()
               for p in (SHARED_DATA / name / "cells").glob("*/*/*.png")}
    assert on_disk == {row["path"] for row in manifest.rows}


@pytest.mark.realdata
def test_a_random_sample_verifies_against_the_shared_data(shipped, tmp_path):
    name, manifest = shipped
    root = SHARED_DATA / name
    if not root.is_dir():
        pytest.skip("../shared/data is not present")
    sample = random.Random(0).sample(manifest.rows, 200)
    path = write_manifest(tmp_path / f"{name}_sample.csv", sample, list(manifest.columns))
    assert verify_manifest(path, root=root) == []
    # The check can fail: one wrong hash is reported by path.
    sample[0] = dict(sample[0], sha256="0" * 64)
    path = write_manifest(tmp_path / f"{name}_bad.csv", sample, list(manifest.columns))
    assert verify_manifest(path, root=root) == [
        (sample[0]["path"], "sha256 mismatch (the file changed since the manifest was made)")]
