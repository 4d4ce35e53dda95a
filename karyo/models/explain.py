"""Why the karyotype detector flags a karyogram: its slots' evidence put into words.

The detector (:mod:`karyo.models.detector`) turns each slot's measurements into P(slot abnormal).
A cytogeneticist reviewing a call wants the measurement behind it, in the words of the trade::

    slot 21: 3 chromosomes (expected 2)
    slot 9: homologs differ in length (ratio 0.71)
    slot 5: homologs' banding differs

:func:`slot_reasons` reads the raw feature rows of :func:`karyo.models.detector.karyogram_features`
(the same numbers the slot head saw, each z-scored against the normal training cells) and names, for
the most probable abnormal slots, every measure beyond :data:`EVIDENCE_Z` of its normal spread.
"""

import numpy as np

from karyo.karyograms.layout import SLOTS
from karyo.models.detector import FEATURE_NAMES

#: A measure counts as evidence when it lies this many normal spreads (z) away from typical.
EVIDENCE_Z = 2.0
#: Slots below this P(slot abnormal) are not given a reason unless ``top_always``.
MIN_PROB = 0.5
#: At most this many slots get a reason, and at most this many measures per slot.
TOP_SLOTS, TOP_MEASURES = 3, 2

_COL = {name: i for i, name in enumerate(FEATURE_NAMES)}


def _chromosomes(n):
    return "no chromosome" if n == 0 else f"{n} chromosome" + ("" if n == 1 else "s")


def slot_evidence(row, homolog_ratio=None):
    """The measures of one slot's raw feature row that lie outside the normal spread, strongest first.

    Args:
        row: one row of :func:`karyo.models.detector.karyogram_features` (raw, not normalised).
        homolog_ratio: the slot's shorter / longer homologue length, for the wording (optional).

    Returns:
        list of ``(strength, words)``; a count deviation is always first.
    """
    row = np.asarray(row, np.float64)
    count, deviation = int(round(row[_COL["count"]])), int(round(row[_COL["deviation"]]))
    found = []
    if deviation:
        found.append((np.inf, f"{_chromosomes(count)} (expected {count - deviation})"))
    if count >= 2:
        ratio = "" if homolog_ratio is None else f" (ratio {homolog_ratio:.2f})"
        found.append((row[_COL["pair_len_ratio"]], f"homologs differ in length{ratio}"))
        found.append((row[_COL["pair_prof_d"]], "homologs' banding differs"))
        found.append((row[_COL["pair_area_ratio"]], "homologs differ in size"))
    if count:
        shortest, longest = row[_COL["len_z_min"]], row[_COL["len_z_max"]]
        if shortest <= -EVIDENCE_Z:
            found.append((-shortest, f"a chromosome is short for its slot (z {shortest:.1f})"))
        if longest >= EVIDENCE_Z:
            found.append((longest, f"a chromosome is long for its slot (z {longest:.1f})"))
        found.append((row[_COL["prof_d_max"]], "banding unlike this slot's normal pattern"))
        if row[_COL["class_margin_max"]] > 0:
            # the margin mixes length and banding units, so it cannot be ranked against a z: it comes
            # last, as the weakest kind of evidence (a short chromosome resembles a smaller class)
            found.append((EVIDENCE_Z, "a chromosome looks more like another class"))
    kept = [(s, w) for s, w in found if s >= EVIDENCE_Z]
    return sorted(kept, key=lambda t: -t[0])  # stable: the class margin stays behind a measure of equal z


def homolog_ratios(reading):
    """``{slot: shorter / longer homologue length}`` of a compact reading (slots with >= 2 chromosomes)."""
    out = {}
    for slot, chromosomes in reading.items():
        lengths = sorted(c[0] for c in chromosomes)
        if len(lengths) >= 2 and lengths[-1] > 0:
            out[slot] = float(lengths[0] / lengths[-1])
    return out


def slot_reasons(features, slot_probs, reading=None, top=TOP_SLOTS, min_prob=MIN_PROB, top_always=False):
    """The top reasons of one karyogram, in words: ``["slot 21: 3 chromosomes (expected 2)", ...]``.

    Args:
        features: ``(24, n)`` raw features of :func:`karyo.models.detector.karyogram_features`.
        slot_probs: ``(24,)`` P(slot abnormal) (mean over the MC passes), slot order 1..22, X, Y.
        reading: the compact reading (:func:`karyo.models.detector.compact`), to quote homologue
            length ratios; optional.
        top: at most this many slots, most probable first.
        min_prob: slots below this probability get no reason (unless ``top_always``).
        top_always: give the ``top`` most probable slots a reason whatever their probability.

    Returns:
        one string per slot given a reason, ``"slot K: measure; measure"``; a slot whose
        probability is high but no single measure stands out says so.
    """
    features = np.asarray(features, np.float64)
    slot_probs = np.asarray(slot_probs, np.float64)
    ratios = homolog_ratios(reading) if reading is not None else {}
    reasons = []
    for i in np.argsort(-slot_probs, kind="stable")[:top]:
        if slot_probs[i] < min_prob and not top_always:
            break
        slot = SLOTS[i]
        evidence = slot_evidence(features[i], ratios.get(slot))
        words = "; ".join(w for _, w in evidence[:TOP_MEASURES]) or "no single measure stands out"
        reasons.append(f"slot {slot}: {words}")
    return reasons
