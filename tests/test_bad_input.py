"""The bad-input corpus (issue 11), run through every command that takes data.

A session-scoped fixture writes a corpus with OpenCV: a sound karyogram dataset, then one
variant per kind of bad input (truncated and zero-byte images, text named ``.png``, a 1x1 image,
a decompression bomb, an unreadable file; manifests with a missing column, an unknown label, a
duplicate row, paths escaping the root, a class with no images, no rows, ...; cell sets for
``data assemble``; damaged run folders for ``evaluate``), and the valid-but-unusual inputs that
must work (RGBA, 16-bit PNG and TIFF, gray, colour JPEG, a non-ASCII file name).

Every command gets every input that applies to it, in-process through ``karyo.cli.main``. The
contract: a non-zero exit, exactly one ``karyo: error:`` line on standard error naming the file
or value, no traceback, and no partial output (the ``--out`` path does not exist afterwards and
nothing new appears beside it or in the input's folder). ``predict`` differs on purpose: good
files are scored, each bad one is named on a ``karyo: skipped`` line, and the exit status is 1.
``data verify`` lists bad rows on standard output, one line each, then one ``karyo: error:`` line.

Commands that train must refuse bad input before training anything: the functions that would
train are replaced by ones that fail the test, so a check that lets bad input through shows up
as an internal error in seconds rather than as a finished run in minutes.
"""

import builtins
import csv
import functools
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from karyo.cli import main
from karyo.errors import ImageError
from karyo.data.imageio import MAX_PIXELS, declared_size, decode_image
from karyo.data.manifest import read_manifest, write_manifest
from tests.common import blob_image as karyogram

#: A 300-megapixel PNG of zeros (20000 x 15000): 0.3 MB on disk, 900 MB once decoded to RGB.
BOMB_SIZE = (20_000, 15_000)
#: The image of the sound dataset that each bad-image variant replaces.
VICTIM = "normal/n2.png"
#: A valid file name that is not ASCII.
NON_ASCII = "karyogramm_ä_染色体.png"
#: The smallest training settings: VGG16 at its 32 px minimum, random weights, one epoch.
TINY = ["--image-size", "32", "--weights", "none", "--epochs", "1"]


# ------------------------------------------------------------------------------- images


def png_bytes(image):
    ok, buf = cv2.imencode(".png", image)
    assert ok
    return buf.tobytes()


def png_bomb(width, height):
    """A valid 8-bit gray PNG of zeros of any size, built in milliseconds.

    The zlib stream is cut into full-flush segments: after ``Z_FULL_FLUSH`` the compressor
    forgets its history, so every segment of identical rows compresses to identical bytes and
    one of them can be repeated. The Adler-32 of n zero bytes is ``(n mod 65521) << 16 | 1``.
    """
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"\x00" * (width + 1) * 64  # 64 rows, each a filter byte and `width` zero pixels
    z = zlib.compressobj(9)
    first = z.compress(rows) + z.flush(zlib.Z_FULL_FLUSH)
    segment = z.compress(rows) + z.flush(zlib.Z_FULL_FLUSH)
    n_segments, rest = divmod(height, 64)
    body = first + segment * (n_segments - 1) + z.compress(b"\x00" * (width + 1) * rest)
    n = (width + 1) * height
    # Sync-flush what is left, then an empty final block (fixed Huffman, end-of-block) and Adler-32.
    body += z.flush(zlib.Z_SYNC_FLUSH) + b"\x03\x00" + struct.pack(">I", (n % 65521) << 16 | 1)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def bad_image_bytes():
    """name -> (file suffix, bytes) of every kind of unusable image."""
    good = png_bytes(karyogram(99))
    ok, jpg = cv2.imencode(".jpg", karyogram(99))
    ok, tif = cv2.imencode(".tif", karyogram(99))
    return {
        "truncated_png": (".png", good[: len(good) // 2]),
        "truncated_jpg": (".jpg", jpg.tobytes()[:-40]),
        "truncated_tif": (".tif", tif.tobytes()[: len(tif) // 2]),
        "zero_byte": (".png", b""),
        "text_named_png": (".png", b"this is a text file, not a karyogram\n" * 20),
        "one_pixel": (".png", png_bytes(np.zeros((1, 1), np.uint8))),
        "bomb": (".png", png_bomb(*BOMB_SIZE)),
        "unreadable": (".png", good),  # chmod 000 after writing
    }


#: The reason each bad image is refused with (the start of ImageError.reason).
BAD_IMAGE_REASONS = {
    "truncated_png": "truncated PNG (no IEND chunk at the end)",
    "truncated_jpg": "truncated JPEG (no end-of-image marker)",
    "truncated_tif": "cannot be decoded as an image",
    "zero_byte": "empty file (0 bytes)",
    "text_named_png": "cannot be decoded as an image",
    "one_pixel": "too small (1x1 pixels; at least 8x8 needed)",
    "bomb": f"too large (20000x15000 pixels; the limit is {MAX_PIXELS:,} pixels)",
    "unreadable": "cannot be read (Permission denied)",
}
BAD_IMAGES = tuple(BAD_IMAGE_REASONS)


def write_unusual(folder, abnormal=False):
    """Valid but unusual karyograms: RGBA, 16-bit PNG and TIFF, gray, colour JPEG, non-ASCII name.

    Each file shows another karyogram: the same picture in two files under two groups is the
    leakage the grouped split refuses (``karyo.data.leakage``)."""
    folder.mkdir(parents=True, exist_ok=True)
    gray = iter(karyogram(7 + k + 100 * abnormal, abnormal=abnormal) for k in range(6))
    alpha = next(gray)
    cv2.imwrite(str(folder / "rgba.png"), np.dstack([cv2.cvtColor(alpha, cv2.COLOR_GRAY2BGR),
                                                     np.full_like(alpha, 200)]))
    cv2.imwrite(str(folder / "gray16.png"), next(gray).astype(np.uint16) * 257)
    cv2.imwrite(str(folder / "gray16.tif"), next(gray).astype(np.uint16) * 257)
    cv2.imwrite(str(folder / "gray.png"), next(gray))
    cv2.imwrite(str(folder / "colour.jpg"), cv2.cvtColor(next(gray), cv2.COLOR_GRAY2BGR))
    # cv2.imwrite cannot open non-ASCII paths on every platform: encode, then write the bytes.
    (folder / NON_ASCII).write_bytes(png_bytes(next(gray)))
    return sorted(folder.iterdir())


# ------------------------------------------------------------------------------- manifests


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def sound_dataset(folder, normal=6, abnormal=6):
    """Class folders of small karyograms and their manifest (one group per image)."""
    rows = []
    for label, count in (("normal", normal), ("abnormal", abnormal)):
        (folder / label).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            rel = f"{label}/{label[0]}{i}.png"
            image = karyogram(i + 100 * (label == "abnormal"), abnormal=label == "abnormal")
            (folder / rel).write_bytes(png_bytes(image))
            rows.append({"path": rel, "label": label, "group": rel[:-4], "sha256": sha256(folder / rel)})
    write_manifest(folder / "manifest.csv", rows)
    return rows


def manifest_variants(folder, rows, outside):
    """Bad manifests beside the sound one: name -> (manifest path, what the error must name)."""
    header = ["path", "label", "group", "sha256"]
    body = [[r[c] for c in header] for r in rows]
    v = {}

    def variant(name, lines, hdr=header, needle=None):
        v[name] = (write_csv(folder / f"{name}.csv", hdr, lines), needle or f"{name}.csv")

    variant("missing_column", [line[:2] for line in body], hdr=header[:2], needle="group")
    variant("unknown_label", body[:3] + [[body[3][0], "abnormall", body[3][2], body[3][3]]] + body[4:],
            needle="abnormall")
    variant("duplicate_row", body + [body[1]], needle=body[1][0])
    variant("escape_dotdot", body + [["../" + outside.name, "normal", "outside", sha256(outside)]],
            needle="../" + outside.name)
    variant("escape_absolute", body + [[str(outside), "normal", "outside", sha256(outside)]],
            needle=str(outside))
    (folder / "link.png").symlink_to(outside)
    variant("escape_symlink", body + [["link.png", "normal", "link", sha256(outside)]], needle="link.png")
    variant("missing_file", body + [["normal/gone.png", "normal", "gone", ""]], needle="gone.png")
    variant("empty_group", body[:4] + [[body[4][0], body[4][1], "", body[4][3]]] + body[5:], needle="empty")
    variant("sha256_mismatch", body[:3] + [body[3][:3] + ["0" * 64]] + body[4:], needle=body[3][0])
    variant("no_rows", [])
    variant("class_with_no_images", [line for line in body if line[1] == "normal"], needle="abnormal")
    (folder / "zero_byte_manifest.csv").write_bytes(b"")
    v["zero_byte_manifest"] = (folder / "zero_byte_manifest.csv", "zero_byte_manifest.csv")
    latin = ("path,label,group\n" + "".join(f"{line[0]},{line[1]},{line[2]}\n" for line in body)
             + "normal/n\xe4.png,normal,x\n").encode("latin-1")
    (folder / "not_utf8.csv").write_bytes(latin)
    v["not_utf8"] = (folder / "not_utf8.csv", "not_utf8.csv")
    v["manifest_not_found"] = (folder / "absent.csv", "absent.csv")
    (folder / "a_folder.csv").mkdir()
    v["manifest_is_a_folder"] = (folder / "a_folder.csv", "a_folder.csv")
    return v


# ------------------------------------------------------------------------------- cell sets


def write_cell_set(folder, cells=(("c1", "p1", "normal"), ("c2", "p2", "abnormal"))):
    """A tiny set in the layout of ../shared/data: cells.csv + cells/<cell>/<k>/<i>.png."""
    rows = []
    for cell, case, label in cells:
        for k in (1, 2, 23):
            crop = np.full((40 - 5 * (k % 3), 14), 255, np.uint8)
            crop[3:-3, 4:10] = 60
            path = folder / "cells" / cell / str(k) / "0.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png_bytes(crop))
        rows.append([cell, case, "46,XX", label, "test", 3])
    write_csv(folder / "cells.csv", ["cell", "case", "karyotype", "label", "status", "n_chromosomes"], rows)
    return folder


def cell_variants(root):
    """Bad cell sets: name -> (set folder, what the error must name)."""
    v = {}

    def variant(name, needle, change):
        folder = write_cell_set(root / f"cells_{name}")
        change(folder)
        v[name] = (folder, needle)

    def rewrite(folder, edit):
        path = folder / "cells.csv"
        with open(path, newline="") as fh:
            rows = edit(list(csv.reader(fh)))
        write_csv(path, rows[0], rows[1:])

    crop = Path("cells") / "c1" / "2" / "0.png"
    for name in ("truncated_png", "zero_byte", "text_named_png", "bomb", "unreadable"):
        data = bad_image_bytes()[name][1]

        def replace(folder, data=data, name=name):
            (folder / crop).write_bytes(data)
            if name == "unreadable":
                (folder / crop).chmod(0)
        variant(f"crop_{name}", crop.as_posix(), replace)
    variant("no_cells_csv", "cells.csv: not found", lambda f: (f / "cells.csv").unlink())
    variant("cells_csv_missing_column", "status",
            lambda f: rewrite(f, lambda rows: [r[:4] + r[5:] for r in rows]))
    variant("cells_csv_unknown_label", "abnormall",
            lambda f: rewrite(f, lambda rows: rows[:2] + [rows[2][:3] + ["abnormall"] + rows[2][4:]]))
    variant("cells_csv_duplicate_cell", "cell c1 listed twice", lambda f: rewrite(f, lambda rows: rows + [rows[1]]))
    variant("cells_csv_no_rows", "cells.csv: no cells listed", lambda f: rewrite(f, lambda rows: rows[:1]))
    variant("cells_csv_count_not_a_number", "n_chromosomes 'three'",
            lambda f: rewrite(f, lambda rows: [rows[0], rows[1][:5] + ["three"], rows[2]]))
    variant("cell_folder_missing", "c2: cell folder not found", lambda f: shutil.rmtree(f / "cells" / "c2"))
    variant("not_a_class_folder", "25: not a chromosome class folder",
            lambda f: (f / "cells" / "c1" / "25").mkdir())
    variant("crop_count_differs", "n_chromosomes=3", lambda f: (f / "cells" / "c1" / "1" / "0.png").unlink())
    v["set_not_found"] = (root / "cells_absent", "cells_absent: folder not found")
    return v


# ------------------------------------------------------------------------------- the corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """Every input of the corpus, written once for the whole session."""
    from karyo.karyograms.assemble import chromosome_manifest

    root = tmp_path_factory.mktemp("corpus")
    c = {"root": root}
    good = root / "good"
    rows = sound_dataset(good)
    c["good"] = good / "manifest.csv"
    outside = root / "outside.png"
    outside.write_bytes(png_bytes(karyogram(50)))
    c["manifests"] = manifest_variants(good, rows, outside)

    # One dataset per bad image: the sound one with VICTIM replaced (sha256 = the bad bytes', so
    # the check reaches the decoder).
    c["bad_images"] = {}
    for name, (suffix, data) in bad_image_bytes().items():
        folder = root / f"img_{name}"
        shutil.copytree(good, folder, ignore=shutil.ignore_patterns("*.csv", "link.png"))
        (folder / VICTIM).unlink()
        victim = (folder / VICTIM).with_suffix(suffix)
        victim.write_bytes(data)
        bad_rows = [dict(r, path=victim.relative_to(folder).as_posix(), sha256=sha256(victim))
                    if r["path"] == VICTIM else r for r in rows]
        if name == "unreadable":
            victim.chmod(0)
        c["bad_images"][name] = (write_manifest(folder / "manifest.csv", bad_rows), victim)

    unusual = root / "unusual"
    c["unusual_files"] = write_unusual(unusual / "normal") + write_unusual(unusual / "abnormal", abnormal=True)
    c["unusual"] = unusual

    cells = write_cell_set(root / "cells_sound")
    c["cells"] = cells
    c["cell_variants"] = cell_variants(root)
    c["chromosomes"] = chromosome_manifest(cells, root / "chromosomes", progress=False)
    bad_chromosomes = root / "chromosomes_truncated"
    shutil.copytree(root / "chromosomes", bad_chromosomes)
    crop = sorted((bad_chromosomes / "images").rglob("*.png"))[0]
    crop.write_bytes(crop.read_bytes()[:30])
    rel = crop.relative_to(bad_chromosomes).as_posix()
    crop_rows = [dict(r, sha256=sha256(crop)) if r["path"] == rel else r
                 for r in read_manifest(bad_chromosomes / "manifest.csv").rows]
    write_manifest(bad_chromosomes / "manifest.csv", crop_rows)
    c["bad_chromosomes"] = (bad_chromosomes / "manifest.csv", f"{crop.name}: truncated PNG")
    yield c
    for path in root.rglob("*"):  # let pytest's clean-up remove the chmod 000 files
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)


@pytest.fixture(scope="session")
def trained_run(corpus, tmp_path_factory):
    """A tiny run trained on the unusual-but-valid karyograms (RGBA, 16-bit, non-ASCII ...)."""
    unusual = corpus["unusual"]
    assert main(["data", "import", "--folder", str(unusual), "--out", str(unusual / "manifest.csv")]) == 0
    out = tmp_path_factory.mktemp("runs") / "vgg16"
    code = main(["train", "vgg16_original", "--data", str(unusual / "manifest.csv"), "--out", str(out),
                 "--cache", str(out.parent / "cache"), "--mc", "5", *TINY])
    assert code == 0
    return out


@functools.lru_cache(maxsize=None)
def chmod_stops_reading():
    """True if a chmod 000 file cannot be read: not for root (CAP_DAC_OVERRIDE) nor on Windows.

    As root, ``setpriv --inh-caps=-dac_override,-dac_read_search --bounding-set=-dac_override,
    -dac_read_search python -m pytest ...`` runs these cases for real.
    """
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe"
        probe.write_bytes(b"x")
        probe.chmod(0)
        try:
            probe.read_bytes()
        except PermissionError:
            return True
        finally:
            probe.chmod(0o600)
    return False


def skip_unreadable_as_root(name):
    if "unreadable" in name and not chmod_stops_reading():
        pytest.skip("chmod 000 does not stop this process from reading (root): "
                    "test_a_refused_read_is_named covers the same path")


@pytest.fixture
def no_training(monkeypatch):
    """Replace what would prepare data or train (after every check has passed) by a failure:
    ``train`` runs ``_train_run``, ``tune`` and ``reproduce`` start with ``prepare_data``, and
    ``transfer`` with the chromosome classifier. Bad input must be refused before any of them."""
    # Every module that calls them is imported first, so that its own names are the real functions
    # once the patches below are undone (a module first imported under a patch would keep it).
    import karyo.experiments.chromosomes
    import karyo.experiments.reproduce
    import karyo.experiments.training
    import karyo.experiments.transfer
    import karyo.experiments.tuning

    def refuse(*args, **kwargs):
        raise AssertionError("bad input got past the checks into training")

    monkeypatch.setattr(karyo.experiments.training, "_train_run", refuse)
    for module in (karyo.experiments.training, karyo.experiments.tuning):
        monkeypatch.setattr(module, "prepare_data", refuse)
    for module in (karyo.experiments.chromosomes, karyo.experiments.transfer):
        monkeypatch.setattr(module, "train_chromosome_classifier", refuse)


# ------------------------------------------------------------------------------- the contract


def run(capsys, *argv):
    """Run the CLI in-process; return (exit status, stdout, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def listing(folder):
    """Every path under ``folder`` with its size (a new, vanished or rewritten file shows)."""
    folder = Path(folder)
    if not folder.exists():
        return None
    return sorted((p.relative_to(folder).as_posix(), p.lstat().st_size) for p in folder.rglob("*"))


def karyo_lines(err):
    return [line for line in err.splitlines() if line.startswith("karyo:")]


def assert_one_error_line(code, out, err, needle):
    """Non-zero exit, one ``karyo: error:`` line naming ``needle``, no traceback anywhere."""
    assert code != 0, (out, err)
    assert "Traceback" not in err and "Traceback" not in out, err
    lines = karyo_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith("karyo: error: "), lines[0]
    assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ------------------------------------------------------------------------------- images


def no_decoding(*args, **kwargs):
    raise AssertionError("an image over the pixel limit reached the decoder")


def test_the_bomb_is_a_valid_png_refused_from_its_header(tmp_path, monkeypatch):
    small = tmp_path / "small_bomb.png"
    small.write_bytes(png_bomb(300, 200))
    decoded = cv2.imdecode(np.frombuffer(small.read_bytes(), np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded.shape == (200, 300) and not decoded.any()  # the generator makes real PNGs
    big = tmp_path / "bomb.png"
    big.write_bytes(png_bomb(*BOMB_SIZE))
    assert big.stat().st_size < 1_000_000
    assert declared_size(big.read_bytes()) == BOMB_SIZE
    # OpenCV's own limit is read when cv2 is imported (here: before karyo set it), so only the
    # header check stands between the bomb and a 900 MB allocation.
    monkeypatch.setattr(cv2, "imdecode", no_decoding)
    with pytest.raises(ImageError) as info:
        decode_image(big)
    assert info.value.reason == BAD_IMAGE_REASONS["bomb"]


#: Formats x pixel kinds OpenCV writes (JPEG and BMP have no 16-bit variant).
FORMATS = [(ext, kind) for ext in (".png", ".jpg", ".tif", ".bmp") for kind in ("gray", "colour", "16-bit")
           if not (kind == "16-bit" and ext in (".jpg", ".bmp"))]


@pytest.mark.parametrize("ext, kind", FORMATS)
def test_declared_size_matches_the_decoded_size(ext, kind):
    image = np.random.default_rng(0).integers(0, 255, (37, 53, 3), dtype=np.uint8)
    if kind == "gray":
        image = image[:, :, 0]
    if kind == "16-bit":
        image = image.astype(np.uint16) * 257
    ok, buf = cv2.imencode(ext, image)
    assert ok
    assert declared_size(buf.tobytes()) == (53, 37)


def test_a_jpeg_declaring_a_huge_frame_is_refused_before_decoding(tmp_path, monkeypatch):
    ok, buf = cv2.imencode(".jpg", karyogram(3))
    data = bytearray(buf.tobytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", 30_000, 30_000)  # height, width
    (tmp_path / "huge.jpg").write_bytes(bytes(data))
    monkeypatch.setattr(cv2, "imdecode", no_decoding)
    with pytest.raises(ImageError, match=r"too large \(30000x30000 pixels"):
        decode_image(tmp_path / "huge.jpg")


def test_unusual_images_decode_as_rgb(corpus):
    for path in corpus["unusual_files"]:
        image = decode_image(path)
        assert image.shape == (48, 48, 3) and image.dtype == np.uint8, path


# ------------------------------------------------------------------------------- manifest commands


def manifest_argv(command, manifest, out, corpus, run=None):
    """The command line of a command that reads a karyogram manifest."""
    cache = out.parent / "cache"
    return {
        "data verify": ["data", "verify", manifest, "--quiet"],
        "data augment": ["data", "augment", manifest, "--out", out],
        "train": ["train", "vgg16_augmented", "--data", manifest, "--out", out, "--cache", cache, *TINY],
        "train original": ["train", "vgg16_original", "--data", manifest, "--out", out, "--cache", cache,
                           "--split", "thesis", *TINY],
        "tune": ["tune", "--data", manifest, "--out", out, "--cache", cache, "--max-trials", "1",
                 "--image-size", "32", "--weights", "none", "--epochs", "1"],
        "reproduce": ["reproduce", "--preset", "tiny", "--data", manifest, "--out", out],
        "transfer": ["transfer", "--intermediate", corpus["chromosomes"], "--target", manifest, "--out", out,
                     "--weights", "none", "--image-size", "32", "--epochs", "1", "--intermediate-epochs", "1"],
        "cross-stain": ["cross-stain", run, manifest, "--mc", "3"],
    }[command]


MANIFEST_COMMANDS = ("data verify", "data augment", "train", "train original", "tune", "reproduce",
                     "transfer", "cross-stain")
MANIFEST_CASES = ("missing_column", "unknown_label", "duplicate_row", "escape_dotdot", "escape_absolute",
                  "escape_symlink", "missing_file", "empty_group", "sha256_mismatch", "no_rows",
                  "class_with_no_images", "zero_byte_manifest", "not_utf8", "manifest_not_found",
                  "manifest_is_a_folder")
#: Inputs that are valid for a command (an all-normal set may be augmented, verified, scored).
VALID_FOR = {"class_with_no_images": ("data verify", "data augment", "cross-stain")}


def check_refused(capsys, corpus, tmp_path, command, manifest, needle, reason=None, run_dir=None):
    """Run a manifest command on bad input and assert the whole contract."""
    out = tmp_path / "out"
    watched = [manifest.parent, corpus["root"] / "chromosomes"] + ([run_dir] if run_dir else [])
    before = [listing(folder) for folder in watched]
    code, stdout, err = run(capsys, *manifest_argv(command, manifest, out, corpus, run_dir))
    if command == "data verify" and code == 1:
        # Bad rows are listed on standard output, then one error line.
        assert_one_error_line(code, stdout, err, manifest.name)
        assert needle in stdout and (reason is None or reason in stdout), stdout
    else:
        line = assert_one_error_line(code, stdout, err, needle)
        assert code == 2
        assert reason is None or reason in line, line
    assert listing(tmp_path) == [], "partial output left behind"
    assert [listing(folder) for folder in watched] == before, "the input's folder changed"


@pytest.mark.parametrize("case", MANIFEST_CASES)
@pytest.mark.parametrize("command", MANIFEST_COMMANDS)
def test_bad_manifest_is_one_line_and_leaves_nothing(
        command, case, corpus, trained_run, tmp_path, capsys, no_training):
    if command in VALID_FOR.get(case, ()):
        pytest.skip(f"{case} is valid input for {command}")
    manifest, needle = corpus["manifests"][case]
    check_refused(capsys, corpus, tmp_path, command, manifest, needle, run_dir=trained_run)


@pytest.mark.parametrize("case", BAD_IMAGES)
@pytest.mark.parametrize("command", MANIFEST_COMMANDS)
def test_bad_image_in_a_manifest_is_named_and_leaves_nothing(
        command, case, corpus, trained_run, tmp_path, capsys, no_training):
    skip_unreadable_as_root(case)
    manifest, victim = corpus["bad_images"][case]
    check_refused(capsys, corpus, tmp_path, command, manifest, victim.name, BAD_IMAGE_REASONS[case],
                  run_dir=trained_run)


@pytest.mark.parametrize("command", ("data verify", "data augment", "cross-stain"))
def test_a_set_without_abnormal_images_is_valid_where_it_makes_sense(
        command, corpus, trained_run, tmp_path, capsys):
    manifest, _ = corpus["manifests"]["class_with_no_images"]
    code, out, err = run(capsys, *manifest_argv(command, manifest, tmp_path / "out", corpus, trained_run))
    assert code == 0, err
    assert "Traceback" not in err and not [line for line in karyo_lines(err) if "error" in line]


def test_transfer_refuses_a_bad_intermediate_before_training(corpus, tmp_path, capsys, no_training):
    out = tmp_path / "out"
    good = corpus["good"]
    bad_crops, crop_name = corpus["bad_chromosomes"]
    for intermediate, needle in ((good, "unknown label 'normal'"), (bad_crops, crop_name),
                                 (tmp_path / "absent.csv", "absent.csv")):
        code, stdout, err = run(capsys, "transfer", "--intermediate", intermediate, "--target", good,
                                "--out", out, "--weights", "none", "--image-size", "32")
        assert_one_error_line(code, stdout, err, needle)
        assert not out.exists()


def test_train_refuses_an_existing_file_as_run_folder(corpus, tmp_path, capsys, no_training):
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    code, out, err = run(capsys, "train", "vgg16_original", "--data", corpus["good"], "--out", taken, *TINY)
    assert_one_error_line(code, out, err, "notes.txt: exists and is not a folder")
    assert taken.read_text() == "mine"


# ------------------------------------------------------------------------------- data import


@pytest.mark.parametrize("case", BAD_IMAGES)
def test_import_refuses_a_bad_image_and_writes_nothing(case, corpus, capsys):
    skip_unreadable_as_root(case)
    _, victim = corpus["bad_images"][case]
    folder = victim.parents[1]
    before = listing(folder)
    code, out, err = run(capsys, "data", "import", "--folder", folder, "--out", folder / "new.csv")
    line = assert_one_error_line(code, out, err, str(victim))
    assert BAD_IMAGE_REASONS[case] in line
    assert listing(folder) == before


def test_import_refuses_bad_folders(corpus, tmp_path, capsys):
    empty_class = tmp_path / "empty_class"
    (empty_class / "abnormal").mkdir(parents=True)
    (empty_class / "normal").mkdir()
    (empty_class / "normal" / "n.png").write_bytes(png_bytes(karyogram(1)))
    no_classes = tmp_path / "no_classes"
    no_classes.mkdir()
    (no_classes / "n.png").write_bytes(png_bytes(karyogram(1)))
    good = corpus["good"].parent
    cases = [
        (empty_class, empty_class / "m.csv", "class 'abnormal' has no images"),
        (no_classes, no_classes / "m.csv", "no class sub-folders"),
        (tmp_path / "absent", tmp_path / "absent" / "m.csv", "absent: folder not found"),
        (corpus["good"], good / "m.csv", "manifest.csv: is a file, not a folder"),
        (good, tmp_path / "m.csv", "write the manifest directly in"),
        (good, good / "normal", "normal: is a folder"),
    ]
    for folder, out, needle in cases:
        before = listing(tmp_path), listing(good)
        code, stdout, err = run(capsys, "data", "import", "--folder", folder, "--out", out)
        assert_one_error_line(code, stdout, err, needle)
        assert (listing(tmp_path), listing(good)) == before


def test_unusual_images_import_verify_augment_and_predict(corpus, trained_run, tmp_path, capsys):
    """RGBA, 16-bit PNG and TIFF, gray, colour JPEG and a non-ASCII name are valid everywhere
    (the session's run was trained on them, which proves ``train`` too)."""
    folder = tmp_path / "unusual"
    shutil.copytree(corpus["unusual"], folder, ignore=shutil.ignore_patterns("*.csv"))
    code, out, err = run(capsys, "data", "import", "--folder", folder, "--out", folder / "m.csv")
    assert code == 0 and "12 images (6 normal, 6 abnormal)" in out, err
    assert f"normal/{NON_ASCII}" in (folder / "m.csv").read_text(encoding="utf-8")
    assert run(capsys, "data", "verify", folder / "m.csv", "--quiet")[0] == 0
    code, out, err = run(capsys, "data", "augment", folder / "m.csv", "--out", tmp_path / "aug")
    assert code == 0, err
    assert run(capsys, "data", "verify", tmp_path / "aug" / "manifest.csv", "--quiet")[0] == 0
    files = corpus["unusual_files"]
    code, out, err = run(capsys, "predict", "--model", trained_run, *files, "--mc", "3",
                         "--out", tmp_path / "p.csv")
    assert code == 0 and karyo_lines(err) == [], err
    with open(tmp_path / "p.csv", encoding="utf-8") as fh:
        scored = [r["path"] for r in csv.DictReader(fh)]
    assert scored == [str(f) for f in files]


# ------------------------------------------------------------------------------- predict


@pytest.mark.parametrize("case", BAD_IMAGES)
def test_predict_scores_the_good_files_and_names_the_bad_one(case, corpus, trained_run, tmp_path, capsys):
    skip_unreadable_as_root(case)
    _, victim = corpus["bad_images"][case]
    good = corpus["good"].parent / "normal" / "n0.png"
    out = tmp_path / "p.csv"
    code, stdout, err = run(capsys, "predict", "--model", trained_run, good, victim, "--mc", "3", "--out", out)
    assert code == 1
    assert "Traceback" not in err + stdout
    lines = karyo_lines(err)
    assert len(lines) == 1 and lines[0].startswith(f"karyo: skipped {victim}: {BAD_IMAGE_REASONS[case]}"), err
    with open(out) as fh:
        assert [r["path"] for r in csv.DictReader(fh)] == [str(good)]
    # Only bad files: nothing to score, nothing written.
    out.unlink()
    code, stdout, err = run(capsys, "predict", "--model", trained_run, victim, "--mc", "3", "--out", out)
    assert code == 1 and len(karyo_lines(err)) == 1 and not out.exists()


def test_predict_refuses_a_folder_that_is_not_a_run(corpus, tmp_path, capsys):
    good = corpus["good"].parent / "normal" / "n0.png"
    for model, needle in ((corpus["good"].parent, "no config.json"), (tmp_path / "absent", "run folder not found")):
        code, out, err = run(capsys, "predict", "--model", model, good, "--out", tmp_path / "p.csv")
        assert_one_error_line(code, out, err, needle)
        assert listing(tmp_path) == []


# ------------------------------------------------------------------------------- evaluate


def damaged_runs(run_dir, corpus, root):
    """Copies of a finished run, each damaged in one way: name -> (folder, what the error names)."""
    runs = {}

    def copy(name):
        folder = root / name
        folder.mkdir()
        for item in run_dir.iterdir():
            # The model is large: link it rather than copy it (loading follows the link).
            if item.name == "model.keras":
                (folder / item.name).symlink_to(item)
            elif item.is_file():
                shutil.copy2(item, folder / item.name)
        return folder

    f = copy("bad_json")
    (f / "config.json").write_text("{not json")
    runs["config_not_json"] = (f, "config.json: not valid JSON")
    f = copy("no_keys")
    (f / "config.json").write_text("{}")
    runs["config_not_a_run"] = (f, "config.json: not a karyo run config")
    f = copy("bad_model")
    (f / "model.keras").unlink()
    (f / "model.keras").write_bytes(b"not a keras file")
    runs["model_damaged"] = (f, "model.keras")
    f = copy("no_model")
    (f / "model.keras").unlink()
    runs["model_missing"] = (f, "no model.keras")
    f = copy("no_split")
    (f / "split.csv").unlink()
    runs["split_missing"] = (f, "split.csv: manifest not found")
    f = copy("data_gone")
    config = json.loads((f / "config.json").read_text())
    config["data"]["split_root"] = str(root / "nowhere")
    (f / "config.json").write_text(json.dumps(config))
    runs["data_gone"] = (f, "the data it was trained on is gone")
    # A test image damaged after training.
    f = copy("test_image_truncated")
    data = root / "data_copy"
    shutil.copytree(Path(json.loads((run_dir / "config.json").read_text())["data"]["split_root"]), data)
    with open(run_dir / "split.csv", encoding="utf-8") as fh:
        test_row = next(r for r in csv.DictReader(fh) if r["split"] == "test")
    victim = data / test_row["path"]
    victim.write_bytes(victim.read_bytes()[:40])
    config = json.loads((f / "config.json").read_text())
    config["data"]["split_root"] = str(data)
    (f / "config.json").write_text(json.dumps(config))
    runs["test_image_truncated"] = (f, f"{victim.name}: truncated")
    runs["not_a_run"] = (corpus["good"].parent, "no config.json")
    runs["run_not_found"] = (root / "absent", "run folder not found")
    return runs


def test_evaluate_refuses_damaged_runs_and_changes_nothing(corpus, trained_run, tmp_path, capsys):
    for name, (folder, needle) in damaged_runs(trained_run, corpus, tmp_path).items():
        before = listing(folder)
        code, out, err = run(capsys, "evaluate", folder, "--mc", "3")
        assert_one_error_line(code, out, err, needle)
        assert listing(folder) == before, name


# ------------------------------------------------------------------------------- cell sets


@pytest.mark.parametrize("command", ("assemble", "chromosomes"))
def test_bad_cell_sets_are_one_line_and_leave_nothing(command, corpus, tmp_path, capsys):
    for name, (folder, needle) in corpus["cell_variants"].items():
        if "unreadable" in name and not chmod_stops_reading():
            continue
        if command == "chromosomes" and name == "crop_count_differs":
            continue  # the chromosome task takes every crop, whatever the cell's count
        out = tmp_path / "out"
        before = listing(folder)
        code, stdout, err = run(capsys, "data", command, "--cells", folder, "--out", out, "--size", "64")
        assert_one_error_line(code, stdout, err, needle)
        assert listing(tmp_path) == [], name
        assert listing(folder) == before, name


def test_one_pixel_crops_and_non_ascii_cell_ids_are_valid(tmp_path, capsys):
    cells = write_cell_set(tmp_path / "set", cells=(("zelle_ä", "p1", "normal"), ("c2", "p2", "abnormal")))
    (cells / "cells" / "c2" / "1" / "0.png").write_bytes(png_bytes(np.zeros((1, 1), np.uint8)))
    for command in ("assemble", "chromosomes"):
        code, out, err = run(capsys, "data", command, "--cells", cells, "--out", tmp_path / command, "--size", "64")
        assert code == 0, err
        assert run(capsys, "data", "verify", tmp_path / command / "manifest.csv", "--quiet")[0] == 0


# ------------------------------------------------------------------------------- output folders


@pytest.mark.parametrize("command", ("synth", "assemble", "chromosomes", "augment"))
def test_an_output_folder_of_other_files_is_never_replaced(command, corpus, tmp_path, capsys):
    taken_file = tmp_path / "notes.txt"
    taken_file.write_text("mine")
    taken_folder = tmp_path / "thesis"
    taken_folder.mkdir()
    (taken_folder / "chapter1.md").write_text("mine")
    source = {"synth": ["--normal", "1", "--abnormal", "1", "--size", "64"],
              "assemble": ["--cells", corpus["cells"], "--size", "64"],
              "chromosomes": ["--cells", corpus["cells"]],
              "augment": [corpus["good"]]}[command]
    for out, needle in ((taken_file, "exists and is not a folder"), (taken_folder, "is not an earlier karyo output")):
        before = listing(tmp_path)
        code, stdout, err = run(capsys, "data", command, *source, "--out", out)
        assert str(out) in assert_one_error_line(code, stdout, err, needle)
        assert listing(tmp_path) == before


def test_synth_refuses_bad_values_before_writing(tmp_path, capsys):
    for args, needle in ((["--size", "4"], "image size 4 is too small"),
                         (["--normal", "0", "--abnormal", "0"], "nothing to render")):
        code, out, err = run(capsys, "data", "synth", "--out", tmp_path / "s", *args)
        assert_one_error_line(code, out, err, needle)
        assert listing(tmp_path) == []


# ------------------------------------------------------------------------------- bad values


@pytest.mark.parametrize("argv, needle", [
    (["predict", "--model", "run", "k.png", "--mc", "0"], "argument --mc: 0 must be positive"),
    (["data", "augment", "m.csv", "--out", "o", "--brightness", "2"], "argument --brightness: 2.0 must lie between"),
    (["train", "vgg16_original", "--data", "m.csv", "--out", "o", "--image-size", "big"],
     "argument --image-size: 'big' is not a whole number"),
    (["data", "augment", "m.csv"], "the following arguments are required: --out"),
    (["trian"], "invalid choice: 'trian'"),
])
def test_a_bad_option_value_is_one_line(argv, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(argv)
    out, err = capsys.readouterr()
    assert info.value.code == 2
    assert err.splitlines() == [err.strip()] and err.startswith("karyo: error: ") and needle in err, err
    assert listing(tmp_path) == []


# ------------------------------------------------------------------------------- unreadable, as root


def test_a_refused_read_is_named(corpus, trained_run, tmp_path, capsys, monkeypatch, no_training):
    """chmod 000 does not stop root, so the operating system's refusal is simulated: opening the
    victim raises PermissionError, as it does for an ordinary user (see the chmod cases)."""
    folder = tmp_path / "data"
    sound_dataset(folder)
    victim = folder / "normal" / "n3.png"
    real_open = builtins.open

    def refusing_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(file) == victim:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    monkeypatch.setattr(io, "open", refusing_open)
    reason = "cannot be read (Permission denied)"
    manifest = folder / "manifest.csv"
    code, out, err = run(capsys, "data", "verify", manifest, "--quiet")
    assert code == 1 and out.strip() == f"normal/n3.png: {reason}"
    for argv in (["data", "import", "--folder", folder, "--out", folder / "new.csv"],
                 ["data", "augment", manifest, "--out", tmp_path / "out"],
                 ["train", "vgg16_original", "--data", manifest, "--out", tmp_path / "out", *TINY]):
        code, out, err = run(capsys, *argv)
        assert_one_error_line(code, out, err, f"{victim}: {reason}")
        assert not (folder / "new.csv").exists() and not (tmp_path / "out").exists()
    code, out, err = run(capsys, "predict", "--model", trained_run, victim, folder / "normal" / "n0.png",
                         "--mc", "3")
    assert code == 1 and karyo_lines(err) == [f"karyo: skipped {victim}: {reason}"]


# ------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("argv, code, needle", [
    (["data", "import", "--folder", "{bomb}", "--out", "{bomb}/new.csv"], 2, "too large (20000x15000 pixels"),
    (["data", "verify", "{truncated_tif}", "--quiet"], 1, "1 bad row(s)"),
    (["data", "verify", "{pgm_bomb}", "--quiet"], 1, "1 bad row(s)"),
    (["train", "vgg16_original", "--data", "{truncated}", "--out", "{tmp}/out", *TINY], 2, "truncated PNG"),
    (["predict", "--model", "{tmp}", "{tmp}/k.png"], 2, "no config.json"),
], ids=["import-bomb", "verify-truncated-tiff", "verify-pgm-bomb", "train-truncated", "predict-not-a-run"])
def test_no_traceback_reaches_the_terminal(argv, code, needle, corpus, tmp_path):
    """Real processes: standard error holds the one line and nothing else (no traceback, no
    OpenCV or TensorFlow log), and nothing is written."""
    # A PGM declaring 300 megapixels: no header check knows PNM, so in a fresh process (where
    # karyo imports OpenCV first and sets its pixel limit) OpenCV itself refuses it by raising.
    pgm = tmp_path / "pgm"
    (pgm / "normal").mkdir(parents=True)
    (pgm / "normal" / "bomb.pgm").write_bytes(b"P5\n20000 15000\n255\n" + bytes(1000))
    write_csv(pgm / "manifest.csv", ["path", "label", "group"], [["normal/bomb.pgm", "normal", "bomb"]])
    names = {"bomb": corpus["bad_images"]["bomb"][0].parent, "pgm_bomb": pgm / "manifest.csv",
             "truncated": corpus["bad_images"]["truncated_png"][0],
             "truncated_tif": corpus["bad_images"]["truncated_tif"][0], "tmp": tmp_path}
    argv = [a.format(**names) for a in argv]
    before = listing(tmp_path), listing(corpus["root"])
    proc = subprocess.run([sys.executable, "-m", "karyo", *argv], capture_output=True, text=True, timeout=300)
    line = assert_one_error_line(proc.returncode, proc.stdout, proc.stderr, needle)
    assert proc.returncode == code
    assert proc.stderr.splitlines() == [line], proc.stderr
    if code == 1:  # data verify: the bad row on standard output
        expected = {"pgm_bomb": f"normal/bomb.pgm: too large (over the limit of {MAX_PIXELS:,} pixels)",
                    "truncated_tif": "normal/n2.tif: cannot be decoded as an image"}
        assert any(proc.stdout.startswith(expected[k]) for k in expected if names[k] == Path(argv[2])), \
            proc.stdout
    assert (listing(tmp_path), listing(corpus["root"])) == before


def test_atomic_dir_never_renames_a_file_away(tmp_path):
    """The library's folder writer refuses a file in its way (the CLI's checks come earlier)."""
    from karyo.atomic import atomic_dir

    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    with pytest.raises(NotADirectoryError):
        with atomic_dir(notes) as tmp:
            (tmp / "manifest.csv").write_text("path,label,group\n")
    assert notes.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
