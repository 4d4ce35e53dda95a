"""Synthetic G-banded karyograms rendered from the UCSC hg38 cytoband table.

The thesis' alpha-dataset (105 normal + 41 abnormal karyograms at 416x416, section 3.1.2) is
private, so karyo renders its own, with known ground truth: 22 autosome pairs and the sex
chromosomes in the standard layout of :mod:`karyo.karyograms.layout` (rows 1-5 / 6-12 / 13-18 / 19-22, X, Y)
with pair numbers under the slots. The karyotypes (normal, trisomies, sex-chromosome aneuploidies,
cri-du-chat, the Philadelphia translocation, the inv(9) normal variant) come from
:mod:`karyo.karyograms.karyotype`.

What is drawn, and from what:

* length: each chromosome's length in the cytoband table (hg38 bp), so relative sizes are right,
  and structural changes (a deleted arm, a translocated segment) change it;
* bands: darkness from the Giemsa stain class (``gneg`` light ... ``gpos100`` dark, ``gvar``
  heterochromatin, ``acen`` centromere, ``stalk``), smoothed to a band resolution that follows the
  cell's condensation;
* shape: a constriction at the centromere (between the ``acen`` bands), rounded telomeres, two
  sister chromatids with a faint groove, and on the acrocentrics (13, 14, 15, 21, 22) a thin pale
  stalk carrying a satellite;
* variation: cell-level condensation (how long the chromosomes are against their width, and how
  fine the bands), per-chromosome tilt, bend and width, homologues that differ slightly (length,
  heterochromatin size, staining), stain contrast and texture, camera noise, slight blur.

``stain="q"`` draws Q-banding instead: bright bands on a dark field (Q-bright = G-dark, with the
large heterochromatin blocks dull except the brilliant distal Yq).

The same seed gives the same bytes.
"""

import hashlib
import math
from pathlib import Path

import numpy as np

from karyo import thesis
from karyo.atomic import atomic_dir
from karyo.errors import KaryoError
from karyo.data.imageio import DEFAULT_SIZE, encode_png
from karyo.karyograms.karyotype import (ABNORMALITIES, ACROCENTRIC, chromosome_bands, for_abnormality)
from karyo.karyograms.layout import MIN_SIZE, arrange_karyogram, fit_scale, get_layout
from karyo.data.manifest import check_output_folder, write_manifest

#: The thesis' alpha-dataset (section 3.1.2: "105 regular cases and 41 abnormal cases").
ALPHA_NORMAL, ALPHA_ABNORMAL = thesis.ALPHA_NORMAL, thesis.ALPHA_ABNORMAL
#: Share of the normal karyograms that carry inv(9)(p12q13) when ``variants=True``.
VARIANT_SHARE = 0.1
STAINS = ("g", "q")
#: Manifest columns of a synthetic dataset.
COLUMNS = ("path", "label", "group", "karyotype", "abnormality", "sex", "sha256")

#: G-banding: darkness (0 = paper white .. 1 = black) of each Giemsa stain class.
G_DARKNESS = {"gneg": 0.24, "gpos25": 0.42, "gpos50": 0.58, "gpos75": 0.74, "gpos100": 0.90,
              "acen": 0.50, "gvar": 0.70, "stalk": 0.26}
#: Q-banding: brightness (0 = dark field .. 1 = white) of each stain class (Q-bright = G-dark).
Q_BRIGHTNESS = {"gneg": 0.28, "gpos25": 0.40, "gpos50": 0.52, "gpos75": 0.64, "gpos100": 0.78,
                "acen": 0.34, "gvar": 0.26, "stalk": 0.28}
#: Width of the chromosome body at special bands, as a share of the chromatid pair's width.
STALK_WIDTH, SATELLITE_WIDTH, SHORT_ARM_WIDTH = 0.34, 0.74, 0.86
#: Width of a chromatid pair against the length of chromosome 1 at unit condensation
#: (metaphase chromosome 1 is about 7-10 um long and 1.2-1.5 um wide).
WIDTH_TO_CHR1 = 0.12
#: Along-length sampling step of the band profile, in output pixels.
STEP = 0.25


def sample_cell(rng, stain):
    """Cell-level parameters: one metaphase, one slide, one camera."""
    return {
        # > 1: long prometaphase chromosomes (fine bands); < 1: condensed ones (coarse bands).
        "condensation": rng.uniform(0.8, 1.15),
        "width": WIDTH_TO_CHR1 * 249.0 * rng.uniform(0.9, 1.1),
        "contrast": rng.uniform(0.85, 1.1),
        "band_sigma": rng.uniform(1.0, 1.6),
        "groove": rng.uniform(0.08, 0.22),
        "background": 255 - int(rng.integers(0, 6)) if stain == "g" else int(rng.integers(4, 14)),
        "blur": rng.uniform(0.35, 0.7),
        "noise": rng.uniform(0.6, 2.0),
        "max_tilt": math.radians(rng.uniform(1.5, 4.0)),
        "max_bend": rng.uniform(0.02, 0.06),
    }


def sample_chromosome(rng, chromosome, cell, stain):
    """Per-chromosome parameters: the bands with their darkness, and the pose."""
    bands = []
    for band, length in chromosome_bands(chromosome):
        if band.stain == "gvar" and not (band.chrom in ACROCENTRIC and band.name.startswith("p")):
            length *= rng.uniform(0.75, 1.25)  # heterochromatin heteromorphism (1qh, 9qh, 16qh, Yqh)
        if stain == "g":
            level = G_DARKNESS[band.stain]
            if band.stain == "gvar":
                level = rng.uniform(0.55, 0.85)
        else:
            level = Q_BRIGHTNESS[band.stain]
            if band.stain == "gvar":
                if band.chrom == "Y":
                    level = 0.95  # distal Yq fluoresces brilliantly with quinacrine
                elif band.chrom in ACROCENTRIC:
                    level = rng.uniform(0.35, 0.75)  # variable satellites and short arms
        level = level * rng.uniform(0.93, 1.07)
        role = "body"
        if band.stain == "stalk":
            role = "stalk"
        elif band.chrom in ACROCENTRIC and band.name.startswith("p13"):
            role = "satellite"
        elif band.chrom in ACROCENTRIC and band.name.startswith("p11.2"):
            role = "short_arm"
        bands.append((length, level, role, band.stain == "acen"))
    total_mb = sum(b[0] for b in bands) / 1e6
    return {
        "bands": bands,
        "length": total_mb * cell["condensation"] * rng.uniform(0.98, 1.02),
        "width": cell["width"] * rng.uniform(0.94, 1.06),
        "tilt": rng.uniform(-1, 1) * cell["max_tilt"],
        "bend": rng.uniform(-1, 1) * cell["max_bend"],
        "contrast": cell["contrast"] * rng.uniform(0.95, 1.05),
        "constriction": rng.uniform(0.28, 0.4),
        "seed": int(rng.integers(0, 2**31 - 1)),
    }


def extent(c):
    """Bounding (height, width) of a posed chromosome, in the same units as its length."""
    length, width, tilt = c["length"], c["width"], abs(c["tilt"])
    half_w = width / 2 + abs(c["bend"]) * length
    height = length * math.cos(tilt) + 2 * half_w * math.sin(tilt)
    return height, length * math.sin(tilt) + 2 * half_w * math.cos(tilt)


def _profiles(c, length_px, width_px, band_sigma):
    """Darkness, relative width and groove weight sampled every :data:`STEP` px along the length."""
    import cv2

    n = max(4, int(math.ceil(length_px / STEP)))
    t = (np.arange(n) + 0.5) * STEP * (length_px / (n * STEP))
    lengths = np.array([b[0] for b in c["bands"]], dtype=np.float64)
    edges = np.concatenate([[0.0], np.cumsum(lengths)]) / lengths.sum() * length_px
    index = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, len(lengths) - 1)
    level = np.array([b[1] for b in c["bands"]], dtype=np.float32)[index]
    roles = np.array([b[2] for b in c["bands"]])[index]
    rel_width = np.ones(n, np.float32)
    rel_width[roles == "stalk"] = STALK_WIDTH
    rel_width[roles == "satellite"] = SATELLITE_WIDTH
    rel_width[roles == "short_arm"] = SHORT_ARM_WIDTH

    def smooth(values, sigma_px):
        sigma = max(sigma_px / STEP, 0.5)
        return cv2.GaussianBlur(values.reshape(1, -1), (0, 0), sigmaX=sigma,
                                borderType=cv2.BORDER_REPLICATE).ravel()

    level = smooth(level, band_sigma)
    rel_width = smooth(rel_width, 0.4)
    # Centromere: a constriction between the acen bands.
    acen = [i for i, b in enumerate(c["bands"]) if b[3]]
    if acen:
        centre = (edges[acen[0]] + edges[acen[-1] + 1]) / 2
        rel_width *= 1 - c["constriction"] * np.exp(-(((t - centre) / (0.45 * width_px)) ** 2))
        level = np.where(np.abs(t - centre) < 0.25 * width_px, level * 0.92, level)
    # Rounded telomeres: an elliptical cap a third of the local width long (blunt, not domed).
    for d in (t, length_px - t):
        r = np.maximum(0.35 * width_px * rel_width, 0.5)
        cap = np.sqrt(np.clip(1 - (1 - np.minimum(d / r, 1.0)) ** 2, 0, 1))
        rel_width = rel_width * cap
    groove = np.clip((rel_width - 0.6) / 0.25, 0, 1)
    return t, level, rel_width, groove


def render_chromosome(c, px_per_unit, stain, background, band_sigma, groove_depth):
    """Draw one posed chromosome as a gray ``uint8`` crop on ``background``.

    Pixels are evaluated analytically (inverse pose -> position along and across the
    chromosome), so edges are anti-aliased without supersampling.
    """
    rng = np.random.default_rng(c["seed"])
    length_px = c["length"] * px_per_unit
    width_px = c["width"] * px_per_unit
    bend_px = c["bend"] * length_px
    t, level, rel_width, groove_w = _profiles(c, length_px, width_px, band_sigma)
    h, w = extent({**c, "length": length_px, "width": width_px})
    hh, hw = int(math.ceil(h / 2)) + 2, int(math.ceil(w / 2)) + 2
    ys, xs = np.mgrid[-hh:hh, -hw:hw].astype(np.float32) + 0.5
    cos_t, sin_t = math.cos(c["tilt"]), math.sin(c["tilt"])
    xr = cos_t * xs + sin_t * ys
    yr = -sin_t * xs + cos_t * ys
    s = yr + length_px / 2  # distance from pter along the chromosome
    u = xr - bend_px * (1 - (2 * yr / length_px) ** 2)  # across, after undoing the bend
    half = 0.5 * width_px * np.interp(s, t, rel_width, left=0.0, right=0.0)
    alpha = np.clip(half - np.abs(u) + 0.5, 0.0, 1.0)
    alpha[(s < -1) | (s > length_px + 1)] = 0.0
    # Two sister chromatids: a rounded body, a little lighter along the groove between them.
    ru = np.clip(np.abs(u) / np.maximum(half, 1e-3), 0, 1)
    body = 0.78 + 0.22 * np.sqrt(1 - ru ** 2)
    groove = 1 - groove_depth * np.interp(s, t, groove_w) * np.exp(-((u / (0.12 * width_px)) ** 2))
    # Stain texture: slow along the chromosome, fine grain everywhere.
    slow = np.interp(s, np.linspace(0, length_px, 8), rng.normal(0, 0.04, 8))
    grain = rng.normal(0, 0.035, s.shape)
    value = np.interp(s, t, level) * body * groove * (1 + slow + grain) * c["contrast"]
    value = np.clip(value, 0, 1) * alpha
    if stain == "g":
        crop = background * (1 - value)
    else:
        crop = background + (255 - background) * value
    # Keep only the chromosome's own bounding box (plus a pixel of background around it).
    rows, cols = np.nonzero(alpha > 0.02)
    if rows.size == 0:
        return np.full((1, 1), background, np.uint8)
    y0, y1 = max(rows.min() - 1, 0), min(rows.max() + 2, crop.shape[0])
    x0, x1 = max(cols.min() - 1, 0), min(cols.max() + 2, crop.shape[1])
    return np.clip(crop[y0:y1, x0:x1], 0, 255).round().astype(np.uint8)


def render_karyogram(karyotype, size=DEFAULT_SIZE, rng=None, stain="g", layout="standard"):
    """Render one karyogram of ``karyotype`` as an RGB ``uint8`` array of ``size`` x ``size``.

    Args:
        karyotype: a :class:`karyo.karyograms.karyotype.Karyotype`.
        size: side in pixels (the thesis' 416 by default; at least 64).
        rng: ``numpy.random.Generator``, the only source of randomness (default: seed 0).
        stain: ``"g"`` (G-banding: dark bands on white) or ``"q"`` (Q-banding: bright on dark).
        layout: ``standard`` or ``compact`` (:data:`karyo.karyograms.layout.LAYOUTS`).

    Raises:
        KaryoError: unknown stain or layout, or a size too small for a karyogram.
    """
    import cv2

    if stain not in STAINS:
        raise KaryoError(f"unknown stain '{stain}' (choose g or q)")
    if not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
        raise KaryoError(f"image size {size} is too small for a karyogram (at least {MIN_SIZE} px)")
    get_layout(layout)
    rng = np.random.default_rng(0) if rng is None else rng
    cell = sample_cell(rng, stain)
    posed = {slot: [sample_chromosome(rng, ch, cell, stain) for ch in chromosomes]
             for slot, chromosomes in karyotype.slots}
    # One scale for the whole karyogram, a little under the fit so that drawn crops (which
    # gain a pixel of anti-aliasing) are never resampled by the layout.
    px_per_unit = 0.97 * fit_scale({s: [extent(c) for c in cs] for s, cs in posed.items()}, size, layout)
    band_sigma = cell["band_sigma"] * max(1.0, size / 416) / cell["condensation"]
    crops = {slot: [render_chromosome(c, px_per_unit, stain, cell["background"], band_sigma,
                                      cell["groove"]) for c in cs]
             for slot, cs in posed.items()}
    laid = arrange_karyogram(crops, size, background=cell["background"], scale=1.0,
                             ink=45 if stain == "g" else 200, layout=layout)
    gray = laid.image[:, :, 0].astype(np.float32)
    gray = cv2.GaussianBlur(gray, (0, 0), sigmaX=cell["blur"] * max(1.0, size / 416))
    gray += rng.normal(0.0, cell["noise"], gray.shape).astype(np.float32)
    gray = np.clip(gray, 0, 255).round().astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def plan_dataset(normal=ALPHA_NORMAL, abnormal=ALPHA_ABNORMAL, seed=0, variants=False):
    """The karyotypes of a synthetic dataset, in image order.

    Normal cells are half 46,XX and half 46,XY; abnormal ones cycle through
    :data:`karyo.karyograms.karyotype.ABNORMALITIES` in shuffled rounds (so every abnormality appears
    ``abnormal // 9`` or one more times), each autosomal one in either sex. With ``variants``,
    :data:`VARIANT_SHARE` of the normal cells carry inv(9)(p12q13), labelled ``normal``.
    The order is shuffled, so an image's number says nothing about its label.
    """
    rng = np.random.default_rng([seed, 104729])
    sexes = ["XX"] * (normal // 2) + ["XY"] * (normal // 2)
    if normal % 2:
        sexes.append(str(rng.choice(["XX", "XY"])))
    sexes = [sexes[i] for i in rng.permutation(len(sexes))]
    n_variants = int(round(normal * VARIANT_SHARE)) if variants else 0
    plan = [for_abnormality("inv9_variant" if i < n_variants else "none", sex)
            for i, sex in enumerate(sexes)]
    names = []
    while len(names) < abnormal:
        names += [ABNORMALITIES[i] for i in rng.permutation(len(ABNORMALITIES))]
    for i, name in enumerate(names[:abnormal]):
        plan.append(for_abnormality(name, str(rng.choice(["XX", "XY"]))))
    return [plan[i] for i in rng.permutation(len(plan))]


def synthesize(out_dir, normal=ALPHA_NORMAL, abnormal=ALPHA_ABNORMAL, size=DEFAULT_SIZE, seed=0,
               stain="g", variants=False, progress=True, layout="standard"):
    """Render a synthetic karyogram dataset into ``out_dir``: ``manifest.csv`` + ``images/*.png``.

    Defaults are the thesis' alpha-dataset: 105 normal and 41 abnormal karyograms at 416x416
    (section 3.1.2). Each image is its own group (``synth-0007``); the manifest has the columns
    ``path,label,group,karyotype,abnormality,sex,sha256``. The folder appears whole or not at
    all, and the same arguments give identical bytes. ``layout="compact"`` draws the karyograms
    with thin gaps and no pair numbers (the thesis' future work, 5.3) and adds a ``layout`` column.

    Returns:
        path of the manifest.

    Raises:
        KaryoError: nothing to render, a negative seed, an unknown stain or a too-small size.
    """
    if normal < 0 or abnormal < 0 or normal + abnormal == 0:
        raise KaryoError(f"nothing to render (normal={normal}, abnormal={abnormal})")
    if seed < 0:
        raise KaryoError(f"seed must be a non-negative integer, got {seed}")
    if stain not in STAINS:
        raise KaryoError(f"unknown stain '{stain}' (choose g or q)")
    if not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
        raise KaryoError(f"image size {size} is too small for a karyogram (at least {MIN_SIZE} px)")
    layout = get_layout(layout).name
    check_output_folder(out_dir)  # never replace a file or a folder of someone else's files
    plan = plan_dataset(normal, abnormal, seed, variants)
    iterator = enumerate(plan)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, total=len(plan), desc="render karyograms", unit="img")
    out_dir = Path(out_dir)
    rows = []
    with atomic_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        for i, karyotype in iterator:
            image = render_karyogram(karyotype, size, np.random.default_rng([seed, i]), stain, layout)
            name = f"synth-{i:04d}"
            data = encode_png(image[:, :, 0])  # gray PNG: the three channels are equal
            (tmp / "images" / f"{name}.png").write_bytes(data)
            rows.append({"path": f"images/{name}.png", "label": karyotype.label, "group": name,
                         "karyotype": karyotype.iscn, "abnormality": karyotype.abnormality,
                         "sex": karyotype.sex, "sha256": hashlib.sha256(data).hexdigest()}
                        | ({"layout": layout} if layout != "standard" else {}))
        write_manifest(tmp / "manifest.csv", rows, list(COLUMNS) + (["layout"] if layout != "standard" else []))
    return out_dir / "manifest.csv"
