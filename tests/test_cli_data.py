"""The data commands, as a user runs them: exit codes and the one line that names the problem."""

import subprocess
import sys

from karyo.cli import main


def test_import_verify_roundtrip_and_bad_rows(class_folder, capsys):
    manifest = class_folder / "manifest.csv"
    assert main(["data", "import", "--folder", str(class_folder), "--out", str(manifest)]) == 0
    assert "10 images (6 normal, 4 abnormal)" in capsys.readouterr().out
    assert main(["data", "verify", str(manifest), "--quiet"]) == 0

    victim = class_folder / "normal" / "normal_3.png"
    victim.write_bytes(victim.read_bytes()[:50])
    assert main(["data", "verify", str(manifest), "--quiet"]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["normal/normal_3.png: sha256 mismatch (the file changed since the manifest was made)"]


def test_missing_manifest_is_one_line_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "karyo", "data", "verify", str(tmp_path / "none.csv")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"karyo: error: {tmp_path / 'none.csv'}: manifest not found"
    assert "Traceback" not in proc.stderr


def test_debug_shows_the_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "karyo", "data", "verify", str(tmp_path / "none.csv"), "--debug"],
        capture_output=True, text=True,
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_import_into_wrong_place_leaves_nothing(class_folder, tmp_path, capsys):
    out = tmp_path / "elsewhere" / "m.csv"
    assert main(["data", "import", "--folder", str(class_folder), "--out", str(out)]) == 2
    assert "write the manifest directly in" in capsys.readouterr().err
    assert not out.exists()
