"""Manifests: reading, writing, importing class folders and verifying every row."""

import csv

import pytest

from karyo.errors import ManifestError
from karyo.data.manifest import (
    import_folder,
    read_manifest,
    sha256_file,
    verify_manifest,
    write_manifest,
)


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_import_then_verify_is_clean(class_folder):
    out = import_folder(class_folder, class_folder / "manifest.csv")
    manifest = read_manifest(out)
    assert len(manifest) == 10
    assert manifest.labels == ["normal", "abnormal"]
    assert {r["label"] for r in manifest.rows} == {"normal", "abnormal"}
    row = manifest.rows[0]
    assert row["sha256"] == sha256_file(class_folder / row["path"])
    assert len({r["group"] for r in manifest.rows}) == 10
    assert verify_manifest(out) == []


def test_truncated_image_is_the_only_bad_row(class_folder):
    out = import_folder(class_folder, class_folder / "manifest.csv")
    victim = class_folder / "abnormal" / "abnormal_2.png"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    problems = verify_manifest(out, labels=("normal", "abnormal"))
    # The sha256 no longer matches: that is what verify reports first for the changed file.
    mismatch = "sha256 mismatch (the file changed since the manifest was made)"
    assert problems == [("abnormal/abnormal_2.png", mismatch)]
    rows = [dict(r, sha256="") for r in read_manifest(out).rows]
    write_manifest(out, rows)
    assert verify_manifest(out) == [("abnormal/abnormal_2.png", "truncated PNG (no IEND chunk at the end)")]


def test_escaping_path_and_unknown_label_are_named(class_folder):
    out = import_folder(class_folder, class_folder / "manifest.csv")
    rows = read_manifest(out).rows
    rows[0]["path"] = "../outside.png"
    rows[1]["label"] = "maybe"
    write_manifest(out, rows)
    problems = dict(verify_manifest(out))
    assert problems == {
        "../outside.png": "path escapes the manifest's folder",
        rows[1]["path"]: "unknown label 'maybe' (expected one of normal, abnormal)",
    }


def test_read_rejects_structural_problems(tmp_path):
    missing = _write_csv(tmp_path / "m1.csv", ["path", "label"], [["a.png", "normal"]])
    with pytest.raises(ManifestError, match="missing column\\(s\\) group"):
        read_manifest(missing)
    dup = _write_csv(tmp_path / "m2.csv", ["path", "label", "group"],
                     [["a.png", "normal", "g1"], ["a.png", "abnormal", "g2"]])
    with pytest.raises(ManifestError, match="line 3: duplicate path a.png \\(first on line 2\\)"):
        read_manifest(dup)
    empty = _write_csv(tmp_path / "m3.csv", ["path", "label", "group"], [])
    with pytest.raises(ManifestError, match="no rows"):
        read_manifest(empty)
    absolute = _write_csv(tmp_path / "m4.csv", ["path", "label", "group"], [["/etc/passwd", "normal", "g"]])
    with pytest.raises(ManifestError, match="absolute path"):
        read_manifest(absolute)
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(tmp_path / "nope.csv")


def test_extra_columns_survive_a_roundtrip(tmp_path):
    rows = [{"path": "a.png", "label": "abnormal", "group": "case1", "karyotype": "47,XY,+21",
             "scanner": "S1"}]
    write_manifest(tmp_path / "m.csv", rows)
    back = read_manifest(tmp_path / "m.csv")
    assert back.rows == rows
    assert back.columns == ["path", "label", "group", "karyotype", "scanner"]


def test_import_refuses_output_outside_folder(class_folder, tmp_path):
    with pytest.raises(ManifestError, match="write the manifest directly in"):
        import_folder(class_folder, tmp_path / "elsewhere.csv")


def test_import_refuses_empty_class(class_folder):
    (class_folder / "uncertain").mkdir()
    with pytest.raises(ManifestError, match="class 'uncertain' has no images"):
        import_folder(class_folder, class_folder / "manifest.csv")
