"""An on-disk cache of what the frozen part of a network computes (SPEC 6).

A frozen backbone gives the same output for the same image every time, so it only needs to run
once per image: the head (or, after unfreezing the last blocks, the rest of the network) then
trains on the cached tensors, epoch after epoch and trial after trial (keras-tuner).

Layout::

    cache_dir/<key>/key.json            what the key is made of (for people)
    cache_dir/<key>/<image sha256>.npy  the frozen part's output for one image (float32), then
                                        a 40-byte trailer: b"karyosha" + sha256 of the .npy bytes

``<key>`` is a hash of the caller's ``key_parts`` (backbone name, weights identity such as
``imagenet`` / ``none:seed=0`` / a weights file's sha256, image size, split point ...) together
with a fingerprint of the frozen part itself: its input and output shapes, its layer types and
every weight's bytes. A changed network therefore never reads stale features, even if the key
parts forget something (an unseeded random initialisation gets a new key every time). Images
are keyed by the sha256 of their pixels, so adding images reuses the rest.

Every file is written atomically (temporary file + rename): several processes (keras-tuner
workers, two ``karyo train`` runs) may fill the same cache at once; at worst two of them compute
the same image and the last identical file wins (a backbone's output for an image does not
depend on the other images of its batch: measured bit-identical on VGG16). Every entry is
verified when read (checksum, shape, dtype): a truncated or corrupted one is recomputed, and
one line on standard error says how many were.

Disk use: pooled features are small (VGG16: 2 KB per image); the output of a partly frozen
network is not (VGG16 ``block4_pool`` at 416 pixels: 26 x 26 x 512 floats, 1.4 MB per image).
"""

import hashlib
import io
import json
import os
import sys
from pathlib import Path

import numpy as np

from karyo.atomic import atomic_write_bytes, atomic_write_text
from karyo.errors import KaryoError


def image_digest(image):
    """sha256 of an image array's shape, dtype and pixels (hex)."""
    image = np.ascontiguousarray(image)
    digest = hashlib.sha256(f"{image.shape}|{image.dtype.str}|".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def model_fingerprint(model):
    """sha256 (hex) of a model's input/output shapes, layer types and weight values."""
    digest = hashlib.sha256()
    digest.update(repr([tuple(t.shape) for t in model.inputs + model.outputs]).encode())
    # Types and shapes, not names: Keras numbers unnamed layers per session (conv2d_94).
    operations = getattr(model, "operations", None) or model.layers  # Sequential has no operations
    digest.update(repr([type(op).__name__ for op in operations]).encode())
    for weight in model.weights:
        value = np.ascontiguousarray(weight.numpy())
        digest.update(f"{value.shape}|{value.dtype.str}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def cache_key(frozen_part, key_parts):
    """The cache folder name for ``frozen_part`` and the caller's ``key_parts`` (24 hex digits).

    Returns:
        ``(key, description)``: the description is what ``key.json`` records.
    """
    import tensorflow as tf

    description = {
        "key_parts": _jsonable(key_parts),
        "input_shape": list(frozen_part.inputs[0].shape[1:]),
        "output_shape": list(frozen_part.outputs[0].shape[1:]),
        "fingerprint": model_fingerprint(frozen_part),
        # Features computed by another TensorFlow or with oneDNN switched differently differ in
        # their last bits, and training amplifies that: they are not reused across the two.
        "numerics": {"tensorflow": tf.__version__,
                     "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "unset (on)")},
    }
    text = json.dumps(description, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24], description


def _jsonable(value):
    try:
        return json.loads(json.dumps(value, sort_keys=True, default=str))
    except (TypeError, ValueError):
        return str(value)


#: Ends every cache entry: this tag and the sha256 of the ``.npy`` bytes before it.
TRAILER_TAG = b"karyosha"
TRAILER_SIZE = len(TRAILER_TAG) + 32


def read_entry(path, shape):
    """One cache entry's features, verified against its checksum and the expected shape.

    Returns:
        ``(value, problem)``: the float32 array and ``None``, or ``None`` and why the entry
        cannot be used (``"missing"``, ``"truncated"``, ``"checksum mismatch"``, ...).
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None, "missing"
    except OSError as exc:
        return None, f"unreadable ({exc.strerror or exc})"
    body, tag, checksum = data[:-TRAILER_SIZE], data[-TRAILER_SIZE:-32], data[-32:]
    if len(data) < TRAILER_SIZE or tag != TRAILER_TAG:
        return None, "truncated or without checksum"
    if hashlib.sha256(body).digest() != checksum:
        return None, "checksum mismatch"
    try:
        value = np.load(io.BytesIO(body), allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None, "not a .npy array"
    if value.shape != tuple(shape) or value.dtype != np.float32:
        return None, f"holds {value.dtype} {value.shape}, not float32 {tuple(shape)}"
    return value, None


def entry_bytes(array):
    """A cache entry: the array as ``.npy`` bytes, then :data:`TRAILER_TAG` and their sha256."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    body = buffer.getvalue()
    return body + TRAILER_TAG + hashlib.sha256(body).digest()


def cached_features(frozen_part, images_uint8, key_parts, cache_dir, batch_size=32, progress=True):
    """The output of ``frozen_part`` for every image, computed only for images not yet cached.

    Args:
        frozen_part: a Keras model (e.g. the first result of ``karyo.models.network.split_model``).
        images_uint8: array (N, H, W, 3) of RGB pixels in 0..255 (uint8, or floats in that range).
        key_parts: what identifies the computation besides the network itself, JSON-able, e.g.
            ``["vgg16", "imagenet", 416, "pooled"]`` (backbone, weights identity, size, split).
        cache_dir: the cache's root folder (created if needed).
        batch_size: images per forward pass.
        progress: show a tqdm progress bar over the batches that must be computed.

    Returns:
        float32 array (N, ...) in the order of ``images_uint8``.

    Raises:
        KaryoError: the images do not fit the model, or the cache folder cannot be written.
    """
    images = np.asarray(images_uint8)
    want = tuple(frozen_part.inputs[0].shape[1:])
    if images.ndim != 4 or tuple(images.shape[1:]) != want:
        raise KaryoError(f"images of shape {images.shape[1:]} do not fit the network's input "
                         f"{want} (resize them to the model's image size)")
    out_shape = tuple(int(d) for d in frozen_part.outputs[0].shape[1:])
    result = np.empty((len(images),) + out_shape, np.float32)
    if len(images) == 0:
        return result

    key, description = cache_key(frozen_part, key_parts)
    folder = Path(cache_dir) / key
    digests = [image_digest(image) for image in images]
    missing = {}  # digest -> first index; duplicates are computed once
    damaged = {}
    for i, digest in enumerate(digests):
        value, problem = read_entry(folder / f"{digest}.npy", out_shape)
        if value is None:
            missing.setdefault(digest, i)
            if problem != "missing":
                damaged.setdefault(digest, problem)
        else:
            result[i] = value
    if damaged:
        # Another program's crash, a full disk or a bad copy: recomputed below, said once.
        digest, problem = next(iter(damaged.items()))
        print(f"karyo: warning: feature cache {folder}: {len(damaged)} damaged entr"
              f"{'y' if len(damaged) == 1 else 'ies'} recomputed (e.g. {digest[:12]}.npy: {problem})",
              file=sys.stderr)
    if missing:
        _compute(frozen_part, images, missing, folder, description, result, batch_size, progress)
        first = {digest: result[i] for digest, i in missing.items()}
        for i, digest in enumerate(digests):
            if digest in first:
                result[i] = first[digest]
    return result


def _compute(frozen_part, images, missing, folder, description, result, batch_size, progress):
    from tqdm.auto import tqdm

    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "key.json").is_file():
            atomic_write_text(folder / "key.json", json.dumps(description, indent=2, sort_keys=True))
    except OSError as exc:
        raise KaryoError(f"{folder}: cannot write the feature cache ({exc.strerror or exc})") from None
    items = list(missing.items())
    starts = range(0, len(items), max(1, int(batch_size)))
    bar = tqdm(starts, desc="backbone features", unit="batch", disable=not progress, leave=False)
    for start in bar:
        chunk = items[start:start + batch_size]
        index = [i for _, i in chunk]
        values = np.asarray(frozen_part.predict_on_batch(images[index].astype(np.float32)), np.float32)
        for (digest, i), value in zip(chunk, values):
            result[i] = value
            try:
                atomic_write_bytes(folder / f"{digest}.npy", entry_bytes(value))
            except OSError as exc:
                raise KaryoError(f"{folder}: cannot write the feature cache "
                                 f"({exc.strerror or exc})") from None


def default_cache_dir():
    """Where backbone features are cached: ``$KARYO_CACHE`` or ``~/.cache/karyo``."""
    return Path(os.environ.get("KARYO_CACHE", Path.home() / ".cache" / "karyo"))
