"""Draw the README's gallery of karyograms to docs/gallery.png.

Synthetic karyograms (normal 46,XX and 46,XY, every registered abnormality, one Q-band) and, when
``../shared/data`` is present and ``--no-real`` is not given, one real G-band and one real Q-band
karyogram assembled from its chromosome crops. Tiles are downscaled so that the file stays small
(under 300 KB).

    python scripts/gallery.py [--out docs/gallery.png] [--data ../shared/data] [--no-real]
"""

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from karyo.karyograms import karyotype as kt  # noqa: E402
from karyo.atomic import atomic_write_bytes  # noqa: E402
from karyo.data.imageio import encode_png  # noqa: E402
from karyo.karyograms.synth import render_karyogram  # noqa: E402

#: Synthetic tiles: (karyotype name, stain, seed).
SYNTHETIC = [("normal_xx", "g", 1), ("normal_xy", "g", 2)] + [
    (kt.for_abnormality(a, "XY" if i % 2 else "XX").name, "g", 10 + i)
    for i, a in enumerate(kt.ABNORMALITIES)
] + [("normal_xy", "q", 3)]
#: Real tiles: (set folder, cell, caption).
REAL = [("gband612", "97002217.16", "real G-band (gband612)"),
        ("bioimlab_qband", "1", "real Q-band (BioImLab)")]
RENDER_SIZE = 416
CAPTION_H = 30


def caption_lines(karyotype, stain):
    words = {"none": "normal", "inv9_variant": "normal variant"}
    name = words.get(karyotype.abnormality, karyotype.abnormality.replace("_", "-"))
    return [karyotype.iscn, f"{name}, {'Q-band' if stain == 'q' else 'G-band'} (synthetic)"]


def tile(image, lines, side):
    """A downscaled karyogram with two caption lines under it, on white."""
    import cv2

    gray = image[:, :, 0] if image.ndim == 3 else image
    small = cv2.resize(gray, (side, side), interpolation=cv2.INTER_AREA)
    out = np.full((side + CAPTION_H, side), 255, np.uint8)
    out[:side] = small
    for i, text in enumerate(lines):
        scale = 0.36
        (tw, _), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        while tw > side - 4 and scale > 0.2:
            scale *= 0.9
            (tw, _), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        cv2.putText(out, text, ((side - tw) // 2, side + 12 + 13 * i), cv2.FONT_HERSHEY_SIMPLEX,
                    scale, 0, 1, cv2.LINE_AA)
    return out


def real_tiles(data, side):
    """Assembled real karyograms, if the shared data holds the cells."""
    import csv

    from karyo.karyograms.assemble import assemble_cell

    tiles = []
    for folder, cell, caption in REAL:
        root = data / folder
        if not (root / "cells" / cell).is_dir():
            continue
        with open(root / "cells.csv", newline="", encoding="utf-8") as fh:
            karyotype = next(r["karyotype"] for r in csv.DictReader(fh) if r["cell"] == cell)
        image, _, _ = assemble_cell(root, cell, RENDER_SIZE)
        tiles.append(tile(image, [karyotype, caption], side))
    return tiles


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "gallery.png")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data",
                        help="the shared real data (../shared/data)")
    parser.add_argument("--no-real", action="store_true", help="synthetic karyograms only")
    parser.add_argument("--tile", type=int, default=200, help="tile side in pixels (200)")
    parser.add_argument("--columns", type=int, default=5)
    args = parser.parse_args(argv)

    tiles = []
    for name, stain, seed in SYNTHETIC:
        karyotype = kt.get(name)
        image = render_karyogram(karyotype, RENDER_SIZE, np.random.default_rng(seed), stain)
        tiles.append(tile(image, caption_lines(karyotype, stain), args.tile))
    if not args.no_real and args.data.is_dir():
        tiles += real_tiles(args.data, args.tile)
    rows = -(-len(tiles) // args.columns)
    pad = 6
    h, w = tiles[0].shape
    sheet = np.full((rows * (h + pad) + pad, args.columns * (w + pad) + pad), 255, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, args.columns)
        sheet[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = t
    data = encode_png(sheet)
    atomic_write_bytes(args.out, data)
    print(f"wrote {args.out} ({len(tiles)} karyograms, {len(data) / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
