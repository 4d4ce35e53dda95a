"""Dataset manifests: CSV files that describe images by relative path, label and group.

A manifest has at least the columns ``path,label,group`` and optionally ``karyotype``,
``sha256``, ``split`` and any others (kept as they are). ``path`` is relative to the manifest's
folder (or to a data root given explicitly) and must not escape it. ``group`` is the unit that
must never straddle train/val/test: the patient or case, or the source image of augmented copies.
For the karyogram task ``label`` is ``normal`` or ``abnormal`` (abnormal is the positive class,
as in the thesis); the single-chromosome task uses the classes ``1``..``22``, ``X``, ``Y``.
"""

import csv
import functools
import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from karyo.atomic import write_csv
from karyo.errors import ImageError, ManifestError
from karyo.data.imageio import decode_image, is_image_path
from karyo.data.splits import split_rows

REQUIRED_COLUMNS = ("path", "label", "group")
OPTIONAL_COLUMNS = ("karyotype", "sha256", "split")
#: Labels of the karyogram task; ``abnormal`` is the positive class.
KARYOGRAM_LABELS = ("normal", "abnormal")
#: Labels of the single-chromosome task (the two-step transfer's intermediate domain).
CHROMOSOME_LABELS = tuple(str(k) for k in range(1, 23)) + ("X", "Y")
#: Why a row whose path is a link out of the root is refused.
LINK_ESCAPE = "path escapes the manifest's folder (through a link)"


@dataclass
class Manifest:
    """Rows of a manifest (dicts of strings) with the folder their paths are relative to."""

    rows: list
    root: Path
    columns: list = field(default_factory=lambda: list(REQUIRED_COLUMNS))
    source: Path = None

    def __len__(self):
        return len(self.rows)

    @property
    def labels(self):
        """The class names, in a stable order (karyogram and chromosome tasks in their own)."""
        return class_names(row["label"] for row in self.rows)

    def resolve(self, row):
        """Absolute path of a row's image."""
        return self.root / row["path"]

    def subset(self, rows):
        return Manifest(list(rows), self.root, list(self.columns), self.source)


def class_names(labels):
    """Ordered class names: normal/abnormal first, chromosome classes in karyotype order."""
    present = set(labels)
    for known in (KARYOGRAM_LABELS, CHROMOSOME_LABELS):
        if present <= set(known):
            return [name for name in known if name in present] if known is CHROMOSOME_LABELS \
                else list(KARYOGRAM_LABELS)
    return sorted(present)


def sha256_file(path, chunk=1 << 20):
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def check_relative(path_text):
    """Return the reason a manifest path is unusable, or None if it is a clean relative path."""
    if not path_text:
        return "empty path"
    p = PurePosixPath(path_text.replace("\\", "/"))
    if p.is_absolute() or (len(path_text) > 1 and path_text[1] == ":"):
        return "absolute path (paths must be relative to the manifest's folder)"
    if ".." in p.parts:
        return "path escapes the manifest's folder"
    return None


def _read_csv(path):
    """Columns and rows (stripped strings) of a manifest CSV; raises on a missing file or column."""
    path = Path(path)
    if path.is_dir():
        raise ManifestError(f"{path}: is a folder, not a manifest CSV")
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: cannot be read as a UTF-8 CSV ({exc})") from None
    reader = csv.DictReader(io.StringIO(text))
    columns = [c.strip() for c in (reader.fieldnames or [])]
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ManifestError(
            f"{path}: missing column(s) {', '.join(missing)} (a manifest needs path,label,group)"
        )
    rows = [{(k or "").strip(): (v or "").strip() for k, v in raw.items() if k is not None} for raw in reader]
    return columns, rows


def read_manifest(path, root=None):
    """Read and structurally validate a manifest CSV.

    Args:
        path: the CSV file.
        root: folder the ``path`` column is relative to (default: the manifest's folder).

    Raises:
        ManifestError: unreadable file, missing columns, no rows, empty fields, paths that
            escape the root, or duplicate paths; the message names the file and the row.
    """
    path = Path(path)
    columns, raw_rows = _read_csv(path)
    rows, seen = [], {}
    for number, row in enumerate(raw_rows, start=2):
        for column in REQUIRED_COLUMNS:
            if not row.get(column):
                raise ManifestError(f"{path}: line {number}: empty '{column}'")
        reason = check_relative(row["path"])
        if reason:
            raise ManifestError(f"{path}: line {number}: {row['path']}: {reason}")
        if row["path"] in seen:
            raise ManifestError(
                f"{path}: line {number}: duplicate path {row['path']} (first on line {seen[row['path']]})"
            )
        seen[row["path"]] = number
        rows.append(row)
    if not rows:
        raise ManifestError(f"{path}: the manifest has no rows")
    return Manifest(rows, Path(root) if root else path.parent, columns, path)


def write_manifest(path, rows, columns=None):
    """Write rows (dicts) as a manifest CSV, atomically; extra columns are kept after the standard ones."""
    columns = list(columns or [])
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    ordered = [c for c in REQUIRED_COLUMNS + OPTIONAL_COLUMNS if c in columns]
    ordered += [c for c in columns if c not in ordered]
    return write_csv(path, rows, ordered)


def default_labels(rows):
    """The label set rows are checked against: chromosome classes if all labels are such,
    otherwise the karyogram task's normal/abnormal."""
    present = {row.get("label", "") for row in rows}
    if present <= set(CHROMOSOME_LABELS):
        return CHROMOSOME_LABELS
    return KARYOGRAM_LABELS


def verify_manifest(path, root=None, labels=None, check_images=True, progress=False):
    """Check every row of a manifest; return a list of ``(row_path, reason)`` problems.

    A row is sound when its file exists inside the root, decodes as an image, matches its
    ``sha256`` (if the column is filled) and has a known label. Structural problems of the
    whole file (missing columns, no rows) raise :class:`ManifestError` instead.
    """
    path = Path(path)
    _, raw_rows = _read_csv(path)
    if not raw_rows:
        raise ManifestError(f"{path}: the manifest has no rows")
    root = Path(root) if root else path.parent
    root_resolved = root.resolve()
    if labels is None:
        labels = default_labels(raw_rows)
    problems, seen = [], set()
    iterator = raw_rows
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(raw_rows, desc="verify", unit="img")
    for row in iterator:
        rel = row.get("path", "")
        name = rel or "<empty path>"
        reason = check_relative(rel)
        if reason:
            problems.append((name, reason))
            continue
        if rel in seen:
            problems.append((name, "duplicate path"))
            continue
        seen.add(rel)
        if row.get("label", "") not in labels:
            expected = ", ".join(labels)
            problems.append((name, f"unknown label '{row.get('label', '')}' (expected one of {expected})"))
            continue
        if not row.get("group"):
            problems.append((name, "empty group"))
            continue
        reason = file_problem(root / rel, root_resolved, row.get("sha256", ""), check_images)
        if reason:
            problems.append((name, reason))
    return problems


def file_problem(file, root, sha256="", check_images=True):
    """The reason a manifest row's file is unusable, or None.

    A file found sound is remembered for the rest of the process, keyed by its path and what
    its inode says about it (size, modification and change times): ``karyo reproduce`` checks the
    same manifest for each of its runs, and a file is decoded and hashed once, not 15 times. A
    file that changes in between (rewritten, truncated, its permissions changed) is checked anew.

    Args:
        file: the row's file (root / path).
        root: the resolved folder the file must stay inside, also through links.
        sha256: the row's recorded hash ("" skips the comparison).
        check_images: decode the file (otherwise existence and hash only).
    """
    try:
        Path(file).resolve().relative_to(root)
    except ValueError:
        return LINK_ESCAPE
    if not Path(file).is_file():
        return "is a folder, not an image" if Path(file).is_dir() else "file not found"
    try:
        st = Path(file).stat()
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    identity = (str(Path(file).resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return _content_problem(identity, str(file), sha256.lower(), bool(check_images))


@functools.lru_cache(maxsize=65536)
def _content_problem(identity, file, sha256, check_images):
    """:func:`file_problem`'s reading of the file's bytes, once per process and file state."""
    if sha256:
        try:
            if sha256_file(file) != sha256:
                return "sha256 mismatch (the file changed since the manifest was made)"
        except OSError as exc:
            return f"cannot be read ({exc.strerror or exc})"
    if check_images:
        try:
            decode_image(file)
        except ImageError as exc:
            return exc.reason
    return None


def check_manifest(manifest, labels=KARYOGRAM_LABELS, every_class=True, check_images=True, progress=False):
    """Refuse a manifest that a run cannot use, before the run writes anything.

    Training, tuning, ``karyo reproduce`` and two-step transfer call this first, so that a bad
    row fails the command in seconds, with one line naming it, instead of after the first
    phase of training, and leaves no half-made run behind. The checks are those of
    ``karyo data verify`` (which lists every bad row instead of stopping at the first).

    Args:
        manifest: a :class:`Manifest` (``read_manifest`` has already checked its structure:
            columns, empty fields, paths escaping the root, duplicates).
        labels: the task's classes; a row with another label is refused.
        every_class: refuse a manifest in which one of ``labels`` has no image (a classifier
            cannot learn, nor be scored on, a class it never sees).
        check_images: decode every image (otherwise existence and sha256 only).
        progress: show a progress bar over the images.

    Returns:
        ``manifest``, unchanged.

    Raises:
        ManifestError: a row with an unknown label, a class without images, or a path that
            leaves the root through a link; the message names the manifest and the line.
        ImageError: a missing, changed (sha256) or undecodable file; the message names it.
    """
    source = manifest.source or manifest.root
    for number, row in enumerate(manifest.rows, start=2):
        if row["label"] not in labels:
            raise ManifestError(f"{source}: line {number}: unknown label '{row['label']}' "
                                f"(expected one of {', '.join(labels)})")
    if every_class:
        present = {row["label"] for row in manifest.rows}
        for label in labels:
            if label not in present:
                raise ManifestError(f"{source}: no image has label '{label}' (a run needs images of "
                                    f"every class: {', '.join(labels)})")
    root = manifest.root.resolve()
    rows = manifest.rows
    if progress and len(rows) > 20:
        from tqdm.auto import tqdm

        rows = tqdm(rows, desc="check images", unit="img", leave=False)
    for row in rows:
        file = manifest.resolve(row)
        reason = file_problem(file, root, row.get("sha256", ""), check_images)
        if reason == LINK_ESCAPE:
            raise ManifestError(f"{source}: {row['path']}: {reason}")
        if reason:
            raise ImageError(file, reason)
    return manifest


def check_run_data(path, protocols=("grouped",), seed=0, augmented=True, root=None, labels=KARYOGRAM_LABELS,
                   progress=False):
    """Check a run's data before anything is written: the manifest, then the split it will draw.

    ``karyo train``, ``tune``, ``reproduce`` and ``transfer`` call this first. Every row is
    checked (:func:`check_manifest`); then, for each protocol whose split does not depend on the
    augmentation (``grouped``, or any protocol on unaugmented data), the split is drawn, so that a
    class with too few groups fails now rather than after a search.

    Returns:
        The checked :class:`Manifest`.

    Raises:
        ManifestError, ImageError, SplitError: naming the manifest, the row or the value.
    """
    manifest = check_manifest(read_manifest(path, root), labels, progress=progress)
    for protocol in protocols:
        if protocol == "grouped" or not augmented:
            split_rows(manifest.rows, protocol, seed)
    return manifest


def check_output_folder(out_dir, inputs=()):
    """Refuse an output folder whose replacement would destroy something.

    The commands that write a dataset folder (``karyo data synth``, ``assemble``,
    ``chromosomes``, ``augment``) replace it whole. They may replace an empty folder or an
    earlier output (a folder holding ``manifest.csv``), never a file, one of their ``inputs``
    (or a folder holding one), nor a folder of other files.

    Raises:
        ManifestError: naming the folder and why it cannot be replaced.
    """
    out_dir = Path(out_dir)
    target = out_dir.resolve()
    for precious in inputs:
        precious = Path(precious).resolve()
        if precious == target or target in precious.parents:
            raise ManifestError(f"{out_dir}: the output folder would replace the input "
                                f"({precious}); choose another --out")
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise ManifestError(f"{out_dir}: exists and is not a folder; choose another --out")
        if any(target.iterdir()) and not (target / "manifest.csv").is_file():
            raise ManifestError(f"{out_dir}: exists, is not empty and is not an earlier karyo "
                                "output (no manifest.csv); choose another --out")


def import_folder(folder, out, with_sha256=True):
    """Turn class sub-folders (``normal/``, ``abnormal/`` or any class names) into a manifest.

    Every image becomes its own group (``group`` = its path without extension): the folder
    layout says nothing about patients, so edit the column if several images share a case.
    ``out`` must lie directly in ``folder`` so that paths stay relative to the manifest's folder.
    Every image is decoded first: nothing is written if one cannot be used.

    Raises:
        ManifestError: the folder is missing, ``out`` lies outside it or is a folder, no class
            sub-folder has images, or a class sub-folder is empty.
        ImageError: an image cannot be read or decoded (the first such file is named).
    """
    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise ManifestError(f"{folder}: " + ("is a file, not a folder" if folder.exists() else "folder not found"))
    if out.parent.resolve() != folder.resolve():
        raise ManifestError(
            f"{out}: write the manifest directly in {folder} (its paths are relative to its folder)"
        )
    if out.is_dir():
        raise ManifestError(f"{out}: is a folder; name the manifest file to write")
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ManifestError(f"{folder}: no class sub-folders (expected e.g. normal/ and abnormal/)")
    rows = []
    for class_dir in classes:
        files = sorted(p for p in class_dir.rglob("*") if p.is_file() and is_image_path(p))
        if not files:
            raise ManifestError(f"{class_dir}: class '{class_dir.name}' has no images")
        for file in files:
            decode_image(file)  # validate first, then write
            rel = file.relative_to(folder)
            row = {
                "path": rel.as_posix(),
                "label": class_dir.name,
                "group": rel.with_suffix("").as_posix(),
            }
            if with_sha256:
                try:
                    row["sha256"] = sha256_file(file)
                except OSError as exc:
                    raise ImageError(file, f"cannot be read ({exc.strerror or exc})") from None
            rows.append(row)
    return write_manifest(out, rows, list(REQUIRED_COLUMNS) + (["sha256"] if with_sha256 else []))
