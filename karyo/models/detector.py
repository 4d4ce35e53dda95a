"""The karyotype detector: per-slot evidence -> P(slot abnormal) -> P(karyogram abnormal).

A cytogeneticist counts each pair and compares the two homologues band by band. The detector
does the same with the measurements of :mod:`karyo.karyograms.slots`::

    karyogram -> read_slots -> per slot: count vs expected (sex from the Y slot),
                 lengths and areas against the slot's reference, homologue length / area ratios,
                 banding-profile distances (aligned, either end up) to the homologue and to the
                 slot's reference, how much more the chromosome resembles another class
              -> normalised features (one row per slot, 24 per karyogram)
              -> head: MCDropout -> Dense(relu) -> BatchNormalization -> MCDropout -> Dense(1)
                 (``karyo.models.network.build_head``), run T times (MC Dropout)
              -> per pass, the karyogram's probability = max over slots (or noisy-OR)
              -> ``karyo.uncertainty.confidence.summarize_passes``: label, confidence, refer

The references (each slot's typical relative length, area and banding profile, and the spread
of each) are fitted on the training karyograms' normal cells and saved with the model, so that a
test karyogram is measured against training data only. An optional ``encoder`` (a callable from
a list of chromosome crops to embeddings, e.g. a chromosome-pretrained CNN) adds the embedding
distance between homologues and to the slot's centroid; it is not saved with the detector.

Examples:
    >>> from karyo.models.detector import fit_detector, predict_passes   # doctest: +SKIP
    >>> detector = fit_detector(readings, labels)                 # doctest: +SKIP
    >>> slot_probs, probs = predict_passes(detector, new_readings)  # doctest: +SKIP
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from karyo.atomic import atomic_path, atomic_write_text, write_csv
from karyo.errors import KaryoError
from karyo.karyograms.layout import SLOTS
from karyo.karyograms.slots import count_deviations, expected_counts, PROFILE_LENGTH, read_slots
from karyo.models.network import build_head
from karyo.models.saving import load_model
from karyo.uncertainty.confidence import DEFAULT_THRESHOLD, predictions_table, summarize_passes, write_predictions
from karyo.uncertainty.mc_dropout import DEFAULT_PASSES, mc_predict

#: How a karyogram's probability is made from its slots' (per MC pass).
COMBINE = ("max", "noisy_or")
#: Largest shift (profile samples) tried when aligning two banding profiles.
MAX_SHIFT = 4
#: Head: hidden width and dropout rates (after the features, after the dense layer). The input
#: rate is low because a hand-made feature such as the count is not redundant the way a CNN's are.
DENSE_UNITS, DROPOUT = 64, (0.1, 0.3)
#: Files of a saved detector.
MODEL_FILE, REFERENCE_FILE = "detector.keras", "detector.json"
SLOT_PROBS_FILE = "slot_probabilities.csv"
_AUTOSOMES_LARGE = SLOTS[:12]


# --- compact readings: what the detector keeps of read_slots ------------------------------------

def compact(readings):
    """``{slot: [(length, area, profile), ...]}`` of :func:`karyo.karyograms.slots.read_slots`' result.

    Keeps what the detector uses and drops masks and crops (small enough to cache thousands).
    """
    return {r.slot: [(float(c.length), float(c.area), np.asarray(c.profile, np.float32))
                     for c in r.chromosomes] for r in readings}


def _counts(cr):
    return {s: len(cr.get(s, [])) for s in SLOTS}


# --- profile comparison --------------------------------------------------------------------------

def profile_distance(p, q, max_shift=MAX_SHIFT):
    """Mean absolute difference of two banding profiles after the best shift, either end up.

    Examples:
        >>> p = np.linspace(0, 1, 64)
        >>> float(profile_distance(p, p[::-1]))
        0.0
    """
    p = np.asarray(p, np.float64)
    q = np.asarray(q, np.float64)
    best = np.inf
    n = len(p)
    for cand in (q, q[::-1]):
        for s in range(-max_shift, max_shift + 1):
            a = p[max(0, s):n + min(0, s)]
            b = cand[max(0, -s):n - max(0, s)]
            best = min(best, float(np.abs(a - b).mean()))
    return best


def _distances_to(profiles, refs, max_shift=MAX_SHIFT):
    """``(n, m)`` aligned distances of n profiles to m references, vectorised over shifts and flips."""
    P = np.asarray(profiles, np.float64)[:, None, :]
    out = np.full((P.shape[0], len(refs)), np.inf)
    R = np.asarray(refs, np.float64)
    n = P.shape[-1]
    for cand in (R, R[:, ::-1]):
        cand = cand[None]
        for s in range(-max_shift, max_shift + 1):
            a = P[..., max(0, s):n + min(0, s)]
            b = cand[..., max(0, -s):n - max(0, s)]
            out = np.minimum(out, np.abs(a - b).mean(axis=-1))
    return out


# --- references fitted on normal training karyograms ---------------------------------------------

def _cell_scale(cr, ref_len):
    """Pixels per unit of reference length: median over the slots of length / reference."""
    ratios = [c[0] / ref_len[s] for s in SLOTS[:22] for c in cr.get(s, [])]
    return float(np.median(ratios)) if ratios else 1.0


def _rms(values, fallback):
    """Root mean square of ``values`` (at least 0.03), or ``fallback`` when there are none."""
    return float(max(np.sqrt(np.mean(np.square(values))) if len(values) else fallback, 0.03))


def fit_references(normal_readings):
    """Each slot's typical relative length, area and profile (and their spreads) from normal cells.

    Args:
        normal_readings: compact readings (:func:`compact`) of normal karyograms.

    Returns:
        a JSON-able dict.

    Raises:
        KaryoError: no normal karyogram, or a slot never holds a chromosome.
    """
    if not normal_readings:
        raise KaryoError("the detector needs normal karyograms to learn what a normal slot looks like")
    # first guess: lengths against the large autosomes' mean, then the robust cell scale
    ref_len = {}
    for s in SLOTS:
        values = []
        for cr in normal_readings:
            big = [c[0] for k in _AUTOSOMES_LARGE for c in cr.get(k, [])]
            values += [c[0] / np.mean(big) for c in cr.get(s, [])] if big else []
        if not values:
            raise KaryoError(f"no normal training karyogram holds a chromosome in slot {s}")
        ref_len[s] = float(np.median(values))
    for _ in range(2):
        scales = [_cell_scale(cr, ref_len) for cr in normal_readings]
        ref_len = {s: float(np.median([c[0] / k for cr, k in zip(normal_readings, scales)
                                       for c in cr.get(s, [])])) for s in SLOTS}
    scales = [_cell_scale(cr, ref_len) for cr in normal_readings]
    refs = {"slots": {}, "profile_length": PROFILE_LENGTH}
    for s in SLOTS:
        items = [(c, k) for cr, k in zip(normal_readings, scales) for c in cr.get(s, [])]
        log_len = np.log([c[0] / k / ref_len[s] for c, k in items])
        rel_area = np.array([c[1] / k ** 2 for c, k in items])
        profiles = np.stack([c[2] for c, _ in items]).astype(np.float64)
        mean = profiles.mean(axis=0)
        for _ in range(2):  # orient every profile towards the mean before averaging
            same = np.abs(profiles - mean).mean(axis=1) <= np.abs(profiles[:, ::-1] - mean).mean(axis=1)
            mean = np.where(same[:, None], profiles, profiles[:, ::-1]).mean(axis=0)
        dist = _distances_to(profiles, mean[None])[:, 0]
        pairs, pair_len, pair_area = [], [], []
        for cr in normal_readings:
            cs = cr.get(s, [])
            if len(cs) >= 2:
                pairs.append(profile_distance(cs[0][2], cs[1][2]))
                pair_len.append(np.log(cs[0][0] / cs[1][0]))
                pair_area.append(np.log(cs[0][1] / cs[1][1]))
        refs["slots"][s] = {
            "length": ref_len[s],
            "log_length_sd": float(max(np.std(log_len), 0.03)),
            "area": float(np.median(rel_area)),
            "log_area_sd": float(max(np.std(np.log(rel_area / np.median(rel_area))), 0.03)),
            "profile": mean.round(6).tolist(),
            "profile_distance": float(max(np.median(dist), 1e-3)),
            "pair_distance": float(max(np.median(pairs), 1e-3)) if pairs else float(max(np.median(dist), 1e-3)),
            # homologues of one cell share its condensation: their spread is the one to judge a pair by
            "pair_log_length_sd": _rms(pair_len, np.std(log_len)),
            "pair_log_area_sd": _rms(pair_area, np.std(np.log(rel_area))),
        }
    return refs


# --- features -----------------------------------------------------------------------------------

FEATURE_NAMES = (
    [f"slot_{s}" for s in SLOTS]
    + ["count", "deviation", "dev_-2", "dev_-1", "dev_0", "dev_+1", "dev_+2", "male", "empty", "single",
       "len_z_min", "len_z_max", "len_z_absmax", "area_z_absmax", "prof_d_max", "prof_d_mean",
       "class_margin_max", "pair_len_ratio", "pair_area_ratio", "pair_prof_d", "slot_len_z"]
)


def karyogram_features(cr, refs, encoder_features=None):
    """``(24, n_features)`` raw (unnormalised) features of one karyogram's compact reading.

    Args:
        cr: compact reading (:func:`compact`).
        refs: :func:`fit_references`' result.
        encoder_features: optional ``(24, k)`` extra columns (from an encoder) appended.
    """
    slots = refs["slots"]
    ref_len = {s: slots[s]["length"] for s in SLOTS}
    scale = _cell_scale(cr, ref_len)
    counts = _counts(cr)
    dev = count_deviations(counts)
    male = expected_counts(counts)["Y"] == 1
    ref_profiles = np.array([slots[s]["profile"] for s in SLOTS])
    prof_scale = np.array([slots[s]["profile_distance"] for s in SLOTS])
    len_sd = np.array([slots[s]["log_length_sd"] for s in SLOTS])
    ref_lens = np.array([ref_len[s] for s in SLOTS])
    rows = []
    for i, s in enumerate(SLOTS):
        ref = slots[s]
        cs = cr.get(s, [])
        n = len(cs)
        d = dev[s]
        row = [0.0] * len(SLOTS)
        row[i] = 1.0
        row += [n, d] + [float(np.clip(d, -2, 2) == k) for k in (-2, -1, 0, 1, 2)]
        row += [float(male), float(n == 0), float(n == 1)]
        if n:
            lens = np.array([c[0] / scale for c in cs])
            areas = np.array([c[1] / scale ** 2 for c in cs])
            len_z = np.log(lens / ref["length"]) / ref["log_length_sd"]
            area_z = np.log(areas / ref["area"]) / ref["log_area_sd"]
            dists = _distances_to([c[2] for c in cs], ref_profiles) / prof_scale[None]
            len_all = np.abs(np.log(lens[:, None] / ref_lens[None])) / len_sd[None]
            score = dists + len_all  # how unlike each class (own one included) a chromosome is
            others = np.delete(score, i, axis=1).min(axis=1)
            margin = score[:, i] - others
            row += [len_z.min(), len_z.max(), np.abs(len_z).max(), np.abs(area_z).max(),
                    dists[:, i].max(), dists[:, i].mean(), margin.max()]
            slot_len_z = np.log(lens.sum() / (ref["length"] * max(n, 1))) / ref["log_length_sd"]
        else:
            row += [0.0] * 7
            slot_len_z = 0.0
        if n >= 2:
            lr = ar = pd = 0.0
            for a in range(n):
                for b in range(a + 1, n):
                    lr = max(lr, abs(np.log(cs[a][0] / cs[b][0])) / ref["pair_log_length_sd"])
                    ar = max(ar, abs(np.log(cs[a][1] / cs[b][1])) / ref["pair_log_area_sd"])
                    pd = max(pd, profile_distance(cs[a][2], cs[b][2]) / ref["pair_distance"])
            row += [lr, ar, pd]
        else:
            row += [0.0, 0.0, 0.0]
        row += [slot_len_z]
        rows.append(row)
    out = np.asarray(rows, np.float32)
    if encoder_features is not None:
        out = np.concatenate([out, np.asarray(encoder_features, np.float32)], axis=1)
    return out


def encoder_slot_features(crops_by_slot, encoder, centroids=None):
    """``(24, 2)`` embedding evidence per slot: largest homologue distance, largest distance to centroid.

    Args:
        crops_by_slot: ``{slot: [gray crop, ...]}`` (e.g. from :func:`karyo.karyograms.slots.read_slots`).
        encoder: callable taking a list of crops and returning an ``(n, k)`` array.
        centroids: ``{slot: (k,) array}`` of normal training chromosomes, or None (column 2 is 0).
    """
    out = np.zeros((len(SLOTS), 2), np.float32)
    for i, s in enumerate(SLOTS):
        crops = crops_by_slot.get(s, [])
        if not crops:
            continue
        emb = np.asarray(encoder(crops), np.float64)
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-9)
        if len(emb) >= 2:
            out[i, 0] = float((1 - emb @ emb.T).max())
        if centroids is not None and s in centroids:
            c = np.asarray(centroids[s], np.float64)
            out[i, 1] = float((1 - emb @ (c / max(np.linalg.norm(c), 1e-9))).max())
    return out


# --- the fitted detector ---------------------------------------------------------------------------

@dataclass
class Detector:
    """A fitted detector: the slot head, the references, the feature normalisation and the combination."""

    model: object
    references: dict
    mean: np.ndarray
    std: np.ndarray
    combine: str = "max"
    config: dict = field(default_factory=dict)
    decision: float = 0.5


def build_slot_head(n_features, seed=None):
    """The slot head: ``karyo.models.network.build_head`` with the detector's width and dropout rates."""

    return build_head(n_features, dense_units=DENSE_UNITS, dropout=DROPOUT, seed=seed, name="slot_head")


def _normalised(detector, features):
    return ((np.asarray(features, np.float32) - detector.mean) / detector.std).astype(np.float32)


def fit_detector(readings, slot_labels, normal=None, epochs=40, batch_size=256, lr=1e-3, seed=0,
                 combine="max", extra=None, balance=False, verbose=0):
    """Fit references on the normal karyograms, then the slot head on every slot.

    Args:
        readings: compact readings (:func:`compact`) of the training karyograms.
        slot_labels: per karyogram ``{slot: 0/1}`` (or a length-24 sequence in slot order).
        normal: per karyogram, True if it is a real normal cell (fits the references); default:
            those whose slot labels are all 0.
        epochs, batch_size, lr, seed: training of the head (Adam, binary cross-entropy).
        balance: weight abnormal slots up to balance the classes. Off by default: with 24 slots
            per karyogram and the max over them, balanced slot probabilities flag most normal
            karyograms at 0.5 (measured: 77 % of normal test cells).
        combine: ``max`` or ``noisy_or`` (see :func:`combine_slots`).
        extra: optional per-karyogram ``(24, k)`` extra feature columns (an encoder's).

    Returns:
        :class:`Detector`.
    """
    import keras

    if combine not in COMBINE:
        raise KaryoError(f"unknown slot combination '{combine}' (choose from {', '.join(COMBINE)})")
    if len(readings) != len(slot_labels) or not readings:
        raise KaryoError(f"{len(readings)} readings but {len(slot_labels)} label sets")
    y = np.array([[lab[s] for s in SLOTS] if isinstance(lab, dict) else list(lab) for lab in slot_labels],
                 np.float32)
    if normal is None:
        normal = y.sum(axis=1) == 0
    refs = fit_references([r for r, ok in zip(readings, normal) if ok])
    X = np.stack([karyogram_features(r, refs, None if extra is None else extra[i])
                  for i, r in enumerate(readings)])
    X = X.reshape(-1, X.shape[-1])
    y = y.reshape(-1)
    mean, std = X.mean(axis=0), X.std(axis=0)
    std = np.where(std < 1e-6, 1.0, std)
    keras.utils.set_random_seed(int(seed))
    model = build_slot_head(X.shape[1], seed=seed)
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="binary_crossentropy")
    pos = max(float(y.sum()), 1.0)
    weight = {0: 1.0, 1: float(min(50.0, (len(y) - pos) / pos)) if balance else 1.0}
    detector = Detector(model, refs, mean.astype(np.float32), std.astype(np.float32), combine,
                        {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
                         "n_karyograms": len(readings), "n_abnormal_slots": int(y.sum()), "balance": balance,
                         "feature_names": FEATURE_NAMES, "n_features": int(X.shape[1])})
    model.fit(_normalised(detector, X), y, epochs=int(epochs), batch_size=int(batch_size), shuffle=True,
              class_weight=weight, verbose=verbose)
    return detector


def combine_slots(slot_probs, how="max"):
    """Karyogram probabilities from slot probabilities ``(..., 24)``: max or noisy-OR over the slots."""
    p = np.asarray(slot_probs, np.float64)
    if how == "max":
        return p.max(axis=-1)
    if how == "noisy_or":
        return 1.0 - np.prod(1.0 - p, axis=-1)
    raise KaryoError(f"unknown slot combination '{how}' (choose from {', '.join(COMBINE)})")


def calibrate_decision(detector, normal_readings, fpr=0.05, T=DEFAULT_PASSES, seed=0):
    """Set the detector's decision threshold so that ``fpr`` of these normal karyograms are flagged.

    Use validation cells (never test cells). A pass votes abnormal when its karyogram probability
    reaches the decision; the threshold is at least 0.5 so that a well-calibrated head is kept.

    Returns:
        the decision threshold (also stored in ``detector.decision``).
    """
    _, probs = predict_passes(detector, normal_readings, T=T, seed=seed)
    level = float(np.quantile(probs.mean(axis=0), 1.0 - fpr)) if len(normal_readings) else 0.5
    detector.decision = float(max(0.5, min(level, 0.99)))
    return detector.decision


def predict_passes(detector, readings, T=DEFAULT_PASSES, seed=None, extra=None):
    """MC Dropout passes of the slot head: ``(slot probs (T, N, 24), karyogram probs (T, N))``."""
    if not readings:
        return np.zeros((T, 0, len(SLOTS)), np.float32), np.zeros((T, 0))
    X = np.stack([karyogram_features(r, detector.references, None if extra is None else extra[i])
                  for i, r in enumerate(readings)])
    n = len(readings)
    flat = _normalised(detector, X.reshape(n * len(SLOTS), -1))
    passes = mc_predict(detector.model, flat, T=T, batch_size=4096, seed=seed)
    slot_probs = passes.reshape(T, n, len(SLOTS))
    return slot_probs, np.clip(combine_slots(slot_probs, detector.combine), 0.0, 1.0)


# --- saving and loading ------------------------------------------------------------------------

def save_detector(detector, run_dir):
    """Write ``detector.keras`` and ``detector.json`` (references, normalisation, config) into ``run_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(run_dir / MODEL_FILE) as tmp:
        detector.model.save(tmp)
    state = {"references": detector.references, "mean": detector.mean.tolist(),
             "std": detector.std.tolist(), "combine": detector.combine, "config": detector.config,
             "decision": detector.decision}
    atomic_write_text(run_dir / REFERENCE_FILE, json.dumps(state, indent=1))
    return run_dir


def load_detector(run_dir):
    """A detector saved by :func:`save_detector` (Keras safe mode).

    Raises:
        KaryoError: a file is missing or unreadable.
    """

    run_dir = Path(run_dir)
    path = run_dir / REFERENCE_FILE
    if not path.is_file():
        raise KaryoError(f"{path}: not found (not a detector run folder?)")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        refs, mean, std = state["references"], state["mean"], state["std"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise KaryoError(f"{path}: unreadable detector state ({exc})") from None
    model = load_model(run_dir / MODEL_FILE)
    return Detector(model, refs, np.asarray(mean, np.float32), np.asarray(std, np.float32),
                    state.get("combine", "max"), state.get("config", {}), float(state.get("decision", 0.5)))


# --- prediction on image files -------------------------------------------------------------------

def predict_karyograms(detector, paths, labels=None, out=None, T=DEFAULT_PASSES,
                       threshold=DEFAULT_THRESHOLD, seed=None, readings=None):
    """Read, score and summarise karyogram images; optionally write ``predictions.csv`` and slot CSV.

    Args:
        detector: a :class:`Detector`.
        paths: karyogram image files (karyo's layout).
        labels: true labels (``normal``/``abnormal``) or None.
        out: path of ``predictions.csv`` to write; the per-slot probabilities go to
            ``slot_probabilities.csv`` beside it (one row per karyogram, one column per slot:
            the mean over the passes).
        T: MC Dropout passes (the thesis' 100).
        threshold: refer below this confidence (the thesis' 0.8).
        seed: rewind the dropout masks (reproducible passes).
        readings: the karyograms' compact readings (:func:`compact`) when the caller read them
            already (e.g. from arrays); ``paths`` then only name the rows.

    Returns:
        ``(rows of predictions.csv, (N, 24) mean slot probabilities)``.

    Raises:
        KaryoError: an image cannot be read (one line naming the file).
    """
    if readings is None:
        readings = [compact(read_slots(p)) for p in paths]
    slot_probs, probs = predict_passes(detector, readings, T=T, seed=seed)
    summary = summarize_passes(probs, threshold=threshold, decision=detector.decision)
    counts = [";".join(f"{s}:{len(r[s])}" for s in SLOTS if count_deviations(_counts(r))[s]) for r in readings]
    rows = predictions_table(paths, labels, summary, extra={"count_deviations": counts})
    mean_slots = slot_probs.mean(axis=0)
    if out is not None:
        write_predictions(out, rows)
        write_slot_probabilities(Path(out).with_name(SLOT_PROBS_FILE), paths, mean_slots)
    return rows, mean_slots


def write_slot_probabilities(path, paths, mean_slots):
    """Write ``path,p_1..p_22,p_X,p_Y`` (mean over the passes) atomically."""
    rows = [[str(p)] + [f"{float(v):.6g}" for v in row] for p, row in zip(paths, np.asarray(mean_slots))]
    return write_csv(path, rows, ["path"] + [f"p_{s}" for s in SLOTS])
