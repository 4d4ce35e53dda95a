"""Regenerate data_manifests/gband612.csv and data_manifests/bioimlab_qband.csv.

Each manifest lists every single-chromosome crop of one cell-based set (layout
``<set>/cells/<cell>/<k>/<i>.png``, k = 1..22, 23 = X, 24 = Y, and ``<set>/cells.csv``) by its
path relative to the set's root, with its chromosome class, its case as ``group`` (cells of
one patient must never straddle splits), its cell, the cell's karyotype and label, and the
file's sha256, so that anyone can prove which bytes a run used::

    python scripts/make_data_manifests.py [--data ../shared/data] [--out data_manifests]
    karyo data verify data_manifests/gband612.csv --root ../shared/data/gband612
"""

import argparse
import csv
import sys
from pathlib import Path

from tqdm.auto import tqdm

from karyo.errors import KaryoError, ManifestError
from karyo.data.manifest import CHROMOSOME_LABELS, sha256_file, write_manifest

#: The sets described, by folder name under the data root.
SETS = ("gband612", "bioimlab_qband")
#: Manifest columns, in order.
COLUMNS = ("path", "label", "group", "karyotype", "sha256", "cell", "cell_label")
HERE = Path(__file__).resolve().parent


def chromosome_label(folder_name):
    """Class of a ``<k>`` folder: ``"1"``..``"22"``, 23 -> ``"X"``, 24 -> ``"Y"``."""
    try:
        k = int(folder_name)
    except ValueError:
        k = 0
    if not 1 <= k <= 24:
        raise ManifestError(f"{folder_name}: not a chromosome class folder (expected 1..24)")
    return CHROMOSOME_LABELS[k - 1]


def read_cells(set_root):
    """``cells.csv`` as a dict cell -> row, in file order."""
    path = Path(set_root) / "cells.csv"
    if not path.is_file():
        raise ManifestError(f"{path}: not found (is {set_root} a cell-based set?)")
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    missing = {"cell", "case", "karyotype", "label"} - set(rows[0] if rows else {})
    if missing:
        raise ManifestError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
    return {row["cell"]: row for row in rows}


def _number(path):
    """Sort key: numeric file/folder names in numeric order, others after them by name."""
    return (0, int(path.stem), "") if path.stem.isdigit() else (1, 0, path.name)


def crop_rows(set_root, progress=True):
    """One manifest row per crop of a cell-based set, cells in ``cells.csv`` order.

    Raises:
        ManifestError: a cell folder is not in ``cells.csv`` or a listed cell has no folder.
    """
    set_root = Path(set_root)
    cells = read_cells(set_root)
    folders = {p.name for p in (set_root / "cells").iterdir() if p.is_dir()}
    unknown = sorted(folders - set(cells))
    if unknown:
        raise ManifestError(f"{set_root / 'cells' / unknown[0]}: cell not listed in cells.csv")
    absent = [c for c in cells if c not in folders]
    if absent:
        raise ManifestError(f"{set_root / 'cells' / absent[0]}: listed in cells.csv but missing")
    rows = []
    for cell, info in tqdm(cells.items(), desc=set_root.name, unit="cell", disable=not progress):
        cell_dir = set_root / "cells" / cell
        for class_dir in sorted((p for p in cell_dir.iterdir() if p.is_dir()), key=_number):
            label = chromosome_label(class_dir.name)
            for crop in sorted(class_dir.glob("*.png"), key=_number):
                rows.append({
                    "path": crop.relative_to(set_root).as_posix(),
                    "label": label,
                    "group": info["case"],
                    "karyotype": info["karyotype"],
                    "sha256": sha256_file(crop),
                    "cell": cell,
                    "cell_label": info["label"],
                })
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data",
                        help="folder holding gband612/ and bioimlab_qband/ (default ../shared/data)")
    parser.add_argument("--out", type=Path, default=HERE.parent / "data_manifests",
                        help="folder to write the manifests to (default data_manifests/)")
    args = parser.parse_args(argv)
    try:
        for name in SETS:
            rows = crop_rows(args.data / name)
            path = write_manifest(args.out / f"{name}.csv", rows, list(COLUMNS))
            print(f"{path}: {len(rows)} crops, "
                  f"{len({r['cell'] for r in rows})} cells, {len({r['group'] for r in rows})} cases")
    except KaryoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
