"""Measure the leakage guard's hash: distances of augmented copies against distinct karyograms.

Builds (once, into ``--work``) the data the threshold in :mod:`karyo.data.leakage` was chosen on:
the synthetic alpha-dataset in G- and Q-banding (146 karyograms each), real karyograms assembled
from ``../shared/data`` (gband612: 584 cells; BioImLab Q-band: 119 cells), and each of them
augmented as ``karyo data augment`` does (G-band synthetic also with ``--blur 1.5``). It then
prints, per category of image pair, the number of pairs and the min / median / max hash distance
(share of differing bits), for karyo's hash and for a classic 64-bit pHash, plus the share of
pairs at or below the threshold and the hashing speed.

    python scripts/leakage_study.py [--work /tmp/karyo-leakage] [--data ../shared/data] [--threshold 0.10]

With ``--sizes 32 64 96 160 416`` it instead measures, at each size, how distinct synthetic
karyograms (``--cells``, rendered at the size, or at synth's 64 px minimum and shrunk) and
four augmented copies of each separate: the numbers behind ``karyo.leakage.MIN_REFUSE_SIDE``.

About 30 s on 2 CPU cores when the data are already built (about a minute more to build them).
"""

import argparse
import csv
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from karyo.data import leakage  # noqa: E402
from karyo.data.imageio import decode_image, encode_png  # noqa: E402


def build(work, data):
    """Create the datasets that are missing; return {name: manifest folder}."""
    from karyo.karyograms.assemble import assemble_cells
    from karyo.data.augment import augment_manifest
    from karyo.karyograms.synth import synthesize

    plan = {
        "syn-g": lambda out: synthesize(out, stain="g", seed=0, progress=False),
        "syn-q": lambda out: synthesize(out, stain="q", seed=1, progress=False),
    }
    if data and (data / "gband612").is_dir():
        plan["real-g"] = lambda out: assemble_cells(data / "gband612", out, progress=False)
    if data and (data / "bioimlab_qband").is_dir():
        plan["real-q"] = lambda out: assemble_cells(data / "bioimlab_qband", out, progress=False)
    folders = {}
    for name, make in plan.items():
        folders[name] = work / name
        if not (work / name / "manifest.csv").is_file():
            print(f"building {name} ...", flush=True)
            make(work / name)
        variants = [("aug-" + name, {})] + ([("augblur-" + name, {"blur": 1.5})] if name == "syn-g" else [])
        for aug_name, kwargs in variants:
            folders[aug_name] = work / aug_name
            if not (work / aug_name / "manifest.csv").is_file():
                print(f"building {aug_name} ...", flush=True)
                augment_manifest(work / name / "manifest.csv", work / aug_name, progress=False, **kwargs)
    return folders


def read_rows(folder):
    with open(folder / "manifest.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def classic_phash(image):
    """The usual pHash: gray 32x32, 8x8 lowest DCT frequencies without DC, above their median."""
    import cv2

    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    c = cv2.dct(cv2.resize(gray, (32, 32), interpolation=cv2.INTER_AREA))[:8, :8].ravel()[1:]
    return c > np.median(c)


def hashes_of(folder, rows, which):
    if which == "karyo":
        return leakage.hash_files([folder / r["path"] for r in rows])
    return np.stack([classic_phash(decode_image(folder / r["path"])) for r in rows])


def categories(rows, label):
    """Boolean upper-triangle masks of the pair categories of one augmented dataset."""
    n = len(rows)
    source = np.array([r["source"] for r in rows])
    augmented = np.array([r["augmented"] == "1" for r in rows])
    same_source = source[:, None] == source[None, :]
    upper = np.triu(np.ones((n, n), bool), 1)
    out = {
        f"{label}: image vs its augmented copies": same_source & (augmented[:, None] != augmented[None, :]) & upper,
        f"{label}: augmented copies of one image": same_source & augmented[:, None] & augmented[None, :] & upper,
    }
    if label.startswith("augblur"):
        return out
    original = ~augmented
    distinct = ~same_source & original[:, None] & original[None, :] & upper
    if "cell" in rows[0]:
        case = np.array([r["group"] for r in rows])
        same_case = case[:, None] == case[None, :]
        out[f"{label}: distinct karyograms, same patient"] = distinct & same_case
        out[f"{label}: distinct karyograms, other patients"] = distinct & ~same_case
    else:
        karyotype = np.array([r["karyotype"] for r in rows])
        same = karyotype[:, None] == karyotype[None, :]
        out[f"{label}: distinct karyograms, same karyotype"] = distinct & same
        out[f"{label}: distinct karyograms, other karyotype"] = distinct & ~same
    return out


def re_encoded(folder, rows, work, limit=60):
    """Originals against an exact copy, a JPEG (quality 75) and a 0.7x / 2x rescaled re-save."""
    import cv2

    tmp = work / "re-encoded"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    originals = [r for r in rows if r.get("augmented", "0") == "0"][:limit]
    kinds = {"exact copy (other file name)": [], "JPEG quality 75": [], "re-saved at 0.7x size": [],
             "re-saved at 2x size": []}
    for i, row in enumerate(originals):
        src = folder / row["path"]
        image = decode_image(src)
        h, w = image.shape[:2]
        shutil.copyfile(src, tmp / f"{i}.copy.png")
        kinds["exact copy (other file name)"].append(tmp / f"{i}.copy.png")
        bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        cv2.imwrite(str(tmp / f"{i}.jpg"), bgr, [cv2.IMWRITE_JPEG_QUALITY, 75])
        kinds["JPEG quality 75"].append(tmp / f"{i}.jpg")
        for factor, name in ((0.7, "re-saved at 0.7x size"), (2.0, "re-saved at 2x size")):
            small = cv2.resize(image, (int(w * factor), int(h * factor)),
                               interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_CUBIC)
            (tmp / f"{i}.{factor}.png").write_bytes(encode_png(small))
            kinds[name].append(tmp / f"{i}.{factor}.png")
    base = leakage.hash_files([folder / r["path"] for r in originals])
    return {kind: np.diag(leakage.hamming_distances(base, leakage.hash_files(paths)))
            for kind, paths in kinds.items()}


def row_text(name, values, threshold):
    if values.size == 0:
        return None
    flagged = float(np.mean(values <= threshold))
    return (f"| {name} | {values.size} | {values.min():.3f} | {np.median(values):.3f} | "
            f"{values.max():.3f} | {100 * flagged:.1f} % |")


def size_study(sizes, cells=146, stain="g", threshold=leakage.DEFAULT_THRESHOLD, copies=4):
    """Per size: distinct-pair and image-copy distances (min / 1st percentile / median / max)."""
    import cv2

    from karyo.data.augment import augment_image
    from karyo.karyograms.synth import MIN_SIZE, plan_dataset, render_karyogram

    plan = plan_dataset(cells * 2 // 3, cells - cells * 2 // 3, seed=1)
    print(f"| size | distinct: min / 1 % / median | distinct <= {threshold:.2f} | copies: median / max "
          f"| copies <= {threshold:.2f} |\n|---|---|---|---|---|")
    for size in sizes:
        images = [render_karyogram(k, max(size, MIN_SIZE), np.random.default_rng([1, i]), stain)
                  for i, k in enumerate(plan)]
        if size < MIN_SIZE:
            images = [cv2.resize(x, (size, size), interpolation=cv2.INTER_AREA) for x in images]
        hashes = np.array([leakage.perceptual_hash(x) for x in images])
        distinct = leakage.hamming_distances(hashes, hashes)[np.triu_indices(len(hashes), 1)]
        near = np.concatenate([leakage.hamming_distances(hashes[i], np.array(
            [leakage.perceptual_hash(augment_image(x, np.random.default_rng([i, k]))) for k in range(copies)])).ravel()
            for i, x in enumerate(images)])
        print(f"| {size} | {distinct.min():.3f} / {np.percentile(distinct, 1):.3f} / {np.median(distinct):.3f} "
              f"| {np.mean(distinct <= threshold):.1%} | {np.median(near):.3f} / {near.max():.3f} "
              f"| {np.mean(near <= threshold):.1%} |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/karyo-leakage"),
                        help="folder for the generated datasets (reused when present)")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data",
                        help="the shared real data (skipped when absent)")
    parser.add_argument("--threshold", type=float, default=leakage.DEFAULT_THRESHOLD)
    parser.add_argument("--sizes", type=int, nargs="+", help="measure separation at these image sizes instead")
    parser.add_argument("--cells", type=int, default=146, help="distinct karyograms per size (--sizes)")
    parser.add_argument("--stain", choices=("g", "q"), default="g", help="banding of --sizes' karyograms")
    args = parser.parse_args(argv)
    if args.sizes:
        size_study(args.sizes, args.cells, args.stain, args.threshold)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    folders = build(args.work, args.data if args.data.is_dir() else None)

    header = ("| pairs | n | min | median | max | <= threshold |\n|---|---|---|---|---|---|")
    tables = {"karyo": [], "classic": []}
    timing = None
    for name, folder in folders.items():
        if not name.startswith(("aug-", "augblur-")):
            continue
        rows = read_rows(folder)
        for which in tables:
            t0 = time.perf_counter()
            hashes = hashes_of(folder, rows, which)
            if which == "karyo" and name == "aug-syn-g":
                timing = (len(rows), time.perf_counter() - t0)
            d = leakage.hamming_distances(hashes, hashes)
            for cat, mask in categories(rows, name).items():
                line = row_text(cat, d[mask], args.threshold)
                if line:
                    tables[which].append(line)
    for source in ("syn-g", "real-g"):
        if source in folders:
            for kind, values in re_encoded(folders[source], read_rows(folders[source]), args.work).items():
                tables["karyo"].append(row_text(f"{source}: {kind}", values, args.threshold))

    print(f"\n## karyo's hash ({leakage.hash_bits()} bits), threshold {args.threshold:.2f}\n")
    print(header)
    print("\n".join(tables["karyo"]))
    print("\n## classic pHash (63 bits; 32 px gray, 8x8 DCT), for comparison\n")
    print(header)
    print("\n".join(tables["classic"]))
    if timing:
        n, seconds = timing
        print(f"\nhashing {n} images of 416 px (read + hash): {seconds:.1f} s ({n / seconds:.0f} images/s)")


if __name__ == "__main__":
    main()
