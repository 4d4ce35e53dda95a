"""The input pipeline: manifest rows -> decoded images in memory -> ``tf.data`` batches.

Every later step (training, feature extraction, evaluation, prediction) goes through here, so an
image is decoded and resized once per run (the thesis' 416x416 by default) and evaluation keeps
the manifest's order.
"""

import numpy as np

from karyo.errors import ImageError, KaryoError
from karyo.imageio import read_image


def load_images(manifest, rows, size, progress=True, desc="images"):
    """Decode and resize the images of ``rows`` into one ``uint8`` array (N, size, size, 3).

    Raises:
        ImageError: naming the first file that cannot be used.
    """
    rows = list(rows)
    out = np.empty((len(rows), size, size, 3), dtype=np.uint8)
    iterator = enumerate(rows)
    if progress and len(rows) > 20:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, total=len(rows), desc=f"load {desc}", unit="img", leave=False)
    for i, row in iterator:
        out[i] = read_image(manifest.resolve(row), size)
    return out


def load_paths(paths, size):
    """Decode the files in ``paths``; return ``(images, good_paths, problems)``.

    Unreadable files are skipped and reported as ``(path, reason)`` instead of raising, for
    ``karyo predict`` on folders where one bad file must not stop the rest.
    """
    images, good, problems = [], [], []
    for path in paths:
        try:
            images.append(read_image(path, size))
            good.append(path)
        except ImageError as exc:
            problems.append((str(path), exc.reason))
    array = np.stack(images) if images else np.empty((0, size, size, 3), np.uint8)
    return array, good, problems


def label_indices(rows, class_names):
    """Integer class index of every row (``abnormal`` = 1 for the karyogram task)."""
    index = {name: i for i, name in enumerate(class_names)}
    try:
        return np.array([index[row["label"]] for row in rows], dtype=np.int64)
    except KeyError as exc:
        raise KaryoError(
            f"unknown label {exc.args[0]!r} (expected one of {', '.join(class_names)})"
        ) from None


def make_dataset(x, y=None, batch_size=16, shuffle=False, seed=0):
    """A ``tf.data`` pipeline over in-memory arrays: cached, optionally shuffled, batched, prefetched.

    The thesis' batch size 16 (section 3.2) is the default. Without ``shuffle`` the order of
    ``x`` is kept, so predictions line up with manifest rows.
    """
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(x if y is None else (x, y)).cache()
    if shuffle:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
