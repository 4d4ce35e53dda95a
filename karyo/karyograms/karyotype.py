"""Karyotypes as data: what each slot of a karyogram holds, in ISCN terms.

A chromosome is a tuple of :class:`Segment` s of the hg38 cytoband table, read from pter to qter.
A segment runs between two *points*: ``"pter"``, ``"qter"`` or an ISCN band such as ``"p14"``
or ``"q34.1"`` (the break lies at the middle of that band, sub-bands included, because ISCN
places a break *in* a band). A segment whose start lies below its end on the other arm is drawn
reversed, which is how an inversion is written. Structural changes cut and join segments:

* ``del(5)(p14)`` (cri-du-chat): 5p14 -> 5qter; the distal short arm 5pter -> 5p14 is lost;
* ``t(9;22)(q34;q11.2)`` (Philadelphia): der(9) = 9pter->9q34::22q11.2->22qter (longer than a 9)
  and der(22) = 22pter->22q11.2::9q34->9qter (the short Philadelphia chromosome), each drawn in
  its own chromosome's slot to the right of the normal homologue, as ISCN orders them;
* ``inv(9)(p12q13)``: a pericentric inversion of 9, a common normal variant (label ``normal``):
  same length, the centromere and the 9q12 heterochromatin moved.

Parsing arbitrary ISCN is out of scope: the karyotypes are declared in :data:`KARYOTYPES`, a
plain dict ``name -> Karyotype``. The band table is read lazily (not at import).

Examples:
    >>> from karyo.karyograms.karyotype import get, counts
    >>> get("trisomy21_xy").iscn
    '47,XY,+21'
    >>> counts(get("monosomyX"))["X"], counts(get("monosomyX"))["Y"]
    (1, 0)
"""

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from karyo.errors import KaryoError
from karyo.data.manifest import CHROMOSOME_LABELS

#: Slot keys of a karyogram in karyotype order (the classes of the single-chromosome task).
SLOTS = CHROMOSOME_LABELS
AUTOSOMES = SLOTS[:22]
#: Chromosomes whose short arm carries a stalk and satellites (nucleolar organisers).
ACROCENTRIC = ("13", "14", "15", "21", "22")
#: The abnormalities of the synthetic dataset, sampled evenly (SPEC 3).
ABNORMALITIES = ("trisomy21", "trisomy18", "trisomy13", "monosomyX", "klinefelter", "triplex",
                 "xyy", "cri_du_chat", "philadelphia")
#: Normal variants: drawn as hard negatives, labelled ``normal``.
VARIANTS = ("inv9_variant",)

CYTOBAND_FILE = Path(__file__).parents[1] / "data" / "cytoband_hg38.tsv"


@dataclass(frozen=True)
class Band:
    """One row of the cytoband table: a band of a chromosome, in base pairs of hg38."""

    chrom: str
    start: int
    end: int
    name: str
    stain: str

    @property
    def length(self):
        return self.end - self.start


@dataclass(frozen=True)
class Segment:
    """A stretch of chromosome ``chrom`` from point ``start`` to point ``end`` (pter/qter/band)."""

    chrom: str
    start: str = "pter"
    end: str = "qter"


@dataclass(frozen=True)
class Chromosome:
    """A drawn chromosome: its ISCN name (``"5"``, ``"del(5)(p14)"``, ``"der(9)"``) and segments."""

    name: str
    segments: tuple

    @property
    def is_normal(self):
        return len(self.segments) == 1 and self.segments[0] == Segment(self.name)


@dataclass(frozen=True)
class Karyotype:
    """A karyotype: ISCN string, label, abnormality's short name, sex chromosomes, slot contents.

    ``slots`` is a tuple of ``(slot, (Chromosome, ...))`` for all 24 slots in karyotype order;
    ``sex`` is the sex-chromosome complement (``"XX"``, ``"XY"``, ``"X"``, ``"XXY"`` ...).
    """

    name: str
    iscn: str
    label: str
    abnormality: str
    sex: str
    slots: tuple

    def chromosomes(self):
        """``{slot: (Chromosome, ...)}`` in karyotype order."""
        return dict(self.slots)


def whole(chrom):
    """A normal chromosome ``chrom`` (one segment pter -> qter)."""
    return Chromosome(chrom, (Segment(chrom),))


def make_karyotype(name, iscn, abnormality="none", sex="XX", label=None, extra=(), replace=None):
    """Declare a karyotype from its numerical and structural changes.

    Args:
        name: registry key.
        iscn: the ISCN string written to manifests.
        abnormality: short name (``"none"`` for normal cells and variants).
        sex: the sex chromosomes, e.g. ``"XY"`` or ``"XXY"``.
        label: ``normal``/``abnormal`` (default: abnormal unless ``abnormality`` is ``none`` or a
            variant).
        extra: slots that gain one more normal chromosome (trisomies).
        replace: ``{slot: Chromosome}``: the second homologue of that slot is replaced by a
            structurally changed one (drawn to the right of the normal homologue).
    """
    slots = {k: [whole(k), whole(k)] for k in AUTOSOMES}
    slots["X"] = [whole("X") for s in sex if s == "X"]
    slots["Y"] = [whole("Y") for s in sex if s == "Y"]
    for slot in extra:
        slots[slot].append(whole(slot))
    for slot, chromosome in (replace or {}).items():
        slots[slot][-1] = chromosome
    if label is None:
        label = "normal" if abnormality == "none" or abnormality in VARIANTS else "abnormal"
    return Karyotype(name, iscn, label, abnormality, sex,
                     tuple((k, tuple(slots[k])) for k in SLOTS))


# Structural rearrangements, as segment lists (see the module docstring).
DEL_5P = Chromosome("del(5)(p14)", (Segment("5", "p14", "qter"),))
DER_9 = Chromosome("der(9)t(9;22)(q34;q11.2)",
                   (Segment("9", "pter", "q34"), Segment("22", "q11.2", "qter")))
DER_22 = Chromosome("der(22)t(9;22)(q34;q11.2)",
                    (Segment("22", "pter", "q11.2"), Segment("9", "q34", "qter")))
INV_9 = Chromosome("inv(9)(p12q13)", (Segment("9", "pter", "p12"), Segment("9", "q13", "p12"),
                                      Segment("9", "q13", "qter")))


def _declare():
    table = {}

    def add(k):
        table[k.name] = k

    for sex in ("XX", "XY"):
        s = sex.lower()
        add(make_karyotype(f"normal_{s}", f"46,{sex}", sex=sex))
        for n in ("21", "18", "13"):
            add(make_karyotype(f"trisomy{n}_{s}", f"47,{sex},+{n}", f"trisomy{n}", sex, extra=(n,)))
        add(make_karyotype(f"cri_du_chat_{s}", f"46,{sex},del(5)(p14)", "cri_du_chat", sex,
                           replace={"5": DEL_5P}))
        add(make_karyotype(f"philadelphia_{s}", f"46,{sex},t(9;22)(q34;q11.2)", "philadelphia",
                           sex, replace={"9": DER_9, "22": DER_22}))
        add(make_karyotype(f"inv9_variant_{s}", f"46,{sex},inv(9)(p12q13)", "inv9_variant", sex,
                           replace={"9": INV_9}))
    add(make_karyotype("monosomyX", "45,X", "monosomyX", "X"))
    add(make_karyotype("klinefelter", "47,XXY", "klinefelter", "XXY"))
    add(make_karyotype("triplex", "47,XXX", "triplex", "XXX"))
    add(make_karyotype("xyy", "47,XYY", "xyy", "XYY"))
    return table


#: Registry: name -> :class:`Karyotype` (normal, abnormal and normal-variant karyotypes).
KARYOTYPES = _declare()


def get(name):
    """The registered karyotype ``name``.

    Raises:
        KaryoError: unknown name (the message lists the known ones).
    """
    try:
        return KARYOTYPES[name]
    except KeyError:
        raise KaryoError(f"unknown karyotype '{name}' (known: {', '.join(KARYOTYPES)})") from None


def list_karyotypes():
    """Names of the registered karyotypes."""
    return list(KARYOTYPES)


def for_abnormality(abnormality, sex="XX"):
    """The karyotype of an abnormality (or ``"none"`` / a variant) for a sex ``"XX"``/``"XY"``.

    Sex-chromosome aneuploidies have their own sex complement and ignore ``sex``.
    """
    if sex not in ("XX", "XY"):
        raise KaryoError(f"sex must be XX or XY, got '{sex}'")
    name = "normal" if abnormality == "none" else abnormality
    for key in (f"{name}_{sex.lower()}", name):
        if key in KARYOTYPES:
            return KARYOTYPES[key]
    raise KaryoError(f"unknown abnormality '{abnormality}' (known: none, "
                     f"{', '.join(ABNORMALITIES + VARIANTS)})")


def counts(karyotype):
    """``{slot: number of chromosomes}``: what a karyogram of this karyotype shows per slot."""
    return {slot: len(chromosomes) for slot, chromosomes in karyotype.slots}


# --- the cytoband table ----------------------------------------------------------------------

@lru_cache(maxsize=None)
def cytobands(path=None):
    """``{chrom: (Band, ...)}`` from the hg38 cytoband table shipped in ``karyo/data``.

    Raises:
        KaryoError: the table is missing or malformed.
    """
    path = Path(path) if path else CYTOBAND_FILE
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise KaryoError(f"{path}: cytoband table cannot be read ({exc})") from None
    table = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.startswith(("#", "chrom\t")):
            continue
        parts = line.split("\t")
        if len(parts) != 5:
            raise KaryoError(f"{path}: line {number}: expected 5 tab-separated columns")
        chrom, start, end, name, stain = parts
        chrom = chrom.removeprefix("chr")
        table.setdefault(chrom, []).append(Band(chrom, int(start), int(end), name, stain))
    missing = [k for k in SLOTS if k not in table]
    if missing:
        raise KaryoError(f"{path}: no bands for chromosome(s) {', '.join(missing)}")
    return {k: tuple(sorted(v, key=lambda b: b.start)) for k, v in table.items()}


def point(chrom, where):
    """Position (bp) of a point of ``chrom``: ``pter``, ``qter``, ``cen`` or an ISCN band.

    A band (``"p14"``, ``"q34.1"``) stands for the middle of all bands whose name begins with it:
    ISCN puts a break *in* a band without saying where.

    Raises:
        KaryoError: no band of that chromosome has that name.
    """
    bands = cytobands()[chrom]
    if where == "pter":
        return bands[0].start
    if where == "qter":
        return bands[-1].end
    if where == "cen":
        acen = [b for b in bands if b.stain == "acen"]
        return acen[0].end if len(acen) == 2 else (acen[0].start + acen[-1].end) // 2
    hits = [b for b in bands if b.name == where or b.name.startswith(where)
            and not b.name[len(where)].isdigit()]
    if not hits:
        # "p1" is ISCN region 1 of the short arm: every band p1x.
        hits = [b for b in bands if b.name.startswith(where)]
    if not hits:
        raise KaryoError(f"chromosome {chrom} has no band '{where}'")
    return (min(b.start for b in hits) + max(b.end for b in hits)) // 2


def segment_bands(segment):
    """The bands of one segment in drawing order, clipped at its points: ``[(Band, length)]``."""
    a, b = point(segment.chrom, segment.start), point(segment.chrom, segment.end)
    lo, hi = min(a, b), max(a, b)
    out = [(band, min(band.end, hi) - max(band.start, lo))
           for band in cytobands()[segment.chrom] if band.end > lo and band.start < hi]
    return out if a <= b else out[::-1]


def chromosome_bands(chromosome):
    """A chromosome's bands pter -> qter: ``[(Band, length_bp), ...]`` (clipped at breaks)."""
    return [item for segment in chromosome.segments for item in segment_bands(segment)]


def chromosome_length(chromosome):
    """Length in base pairs of hg38: the relative length a karyogram draws."""
    return sum(length for _, length in chromosome_bands(chromosome))


def centromere_position(chromosome):
    """Distance (bp) from pter to the centromere: the middle of the chromosome's ``acen`` bands."""
    pos, spans = 0, []
    for band, length in chromosome_bands(chromosome):
        if band.stain == "acen":
            spans.append((pos, pos + length))
        pos += length
    if not spans:
        return None
    return (spans[0][0] + spans[-1][1]) / 2
