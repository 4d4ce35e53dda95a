"""A full disk ends a command with one line naming the folder and the size needed, and keeps nothing partial."""

import errno
import os
from pathlib import Path

import pytest

from karyo import atomic
from karyo.atomic import atomic_dir, atomic_path, atomic_write_bytes, is_disk_full
from karyo.errors import KaryoError

FULL = OSError(errno.ENOSPC, "No space left on device")


def fail_fsync_of(monkeypatch, name):
    """Make ``os.fsync`` raise ENOSPC for temporary files of ``name`` (atomic writes sync before renaming)."""
    real = os.fsync
    failed = []

    def fsync(fd):
        if f"/.{name}." in os.readlink(f"/proc/self/fd/{fd}"):
            failed.append(name)
            raise FULL
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return failed


needs_proc = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux /proc")


@needs_proc
def test_a_file_that_does_not_fit_keeps_the_old_one_and_names_folder_and_size(tmp_path, monkeypatch):
    target = tmp_path / "out" / "metrics.json"
    atomic_write_bytes(target, b"old")
    fail_fsync_of(monkeypatch, "metrics.json")
    with pytest.raises(KaryoError) as caught:
        atomic_write_bytes(target, b"x" * 2500)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'out'}: disk full: writing metrics.json needed 2.5 kB, ")
    assert "\n" not in message and "free there" in message
    assert target.read_bytes() == b"old" and os.listdir(target.parent) == ["metrics.json"]


def test_writers_that_wrap_the_error_and_whole_folders_leave_nothing(tmp_path):
    def h5_like(tmp):  # h5py keeps only the text of the OSError
        tmp.write_bytes(b"y" * 1200)
        raise RuntimeError("Unable to synchronously write data (file write failed: errno = 28)")

    with pytest.raises(KaryoError, match=r"disk full: writing model.weights.h5 needed more than 1.2 kB"):
        with atomic_path(tmp_path / "model.weights.h5") as tmp:
            h5_like(tmp)
    with pytest.raises(KaryoError, match=r"disk full: writing synth/ needed more than 3.0 kB"):
        with atomic_dir(tmp_path / "synth") as tmp:
            (tmp / "a.png").write_bytes(b"z" * 3000)
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError):  # other failures pass through unchanged
        with atomic_path(tmp_path / "x.png"):
            raise ValueError("not a disk problem")
    assert not is_disk_full(ValueError("no")) and is_disk_full(KaryoError("wrapped").with_traceback(None)) is False
    wrapped = KaryoError("saving failed")
    wrapped.__cause__ = FULL
    assert is_disk_full(wrapped)
    assert atomic.disk_full_error(tmp_path, "f", 10).args[0].startswith(f"{tmp_path}: disk full: writing f needed 10 B")


@pytest.mark.slow
@needs_proc
@pytest.mark.parametrize("name", ["split.csv", "metrics.json"])  # the run's first and last file
def test_train_on_a_full_disk_prints_one_line_and_leaves_no_run_folder(tmp_path, monkeypatch, capsys, name):
    from karyo.cli import main
    from karyo.karyograms.synth import synthesize

    data = synthesize(tmp_path / "syn", normal=12, abnormal=8, size=128, seed=1, progress=False)
    failed = fail_fsync_of(monkeypatch, name)
    out = tmp_path / "run"
    capsys.readouterr()
    code = main(["train", "vgg16_original", "--data", str(data), "--out", str(out), "--image-size", "32",
                 "--weights", "none", "--epochs", "1", "--mc", "3", "--cache", str(tmp_path / "cache")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("karyo:")]
    assert failed == [name] and code == 2
    assert len(lines) == 1 and lines[0].startswith(f"karyo: error: {out}: disk full: writing {name} needed "), lines
    assert not out.exists()
