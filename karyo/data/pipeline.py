"""The input pipeline: manifest rows -> decoded images in memory -> ``tf.data`` batches.

Every later step (training, feature extraction, evaluation, prediction) goes through here, so an
image is decoded and resized once per run (the thesis' 416x416 by default) and evaluation keeps
the manifest's order. Scoring (``karyo evaluate``, ``karyo predict``) streams instead:
:func:`stream_rows` and :func:`stream_paths` decode :data:`STREAM_CHUNK` images at a time, so
memory stays flat whatever the number of karyograms.
"""

import numpy as np

from karyo.errors import ImageError, KaryoError
from karyo.data.imageio import read_image


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
    problems, arrays, good = [], [], []
    for array, names in stream_paths(paths, size, problems):
        arrays.append(array)
        good += names
    array = np.concatenate(arrays) if arrays else np.empty((0, size, size, 3), np.uint8)
    return array, good, problems


#: Images decoded at a time when streaming. A multiple of the MC Dropout batch (32), so the
#: batches, and with them the dropout masks drawn batch after batch, fall exactly as they do
#: over one array of all the images: streamed and in-memory scores are identical. At 416 px a
#: chunk is 33 MB of pixels (133 MB as float32).
STREAM_CHUNK = 64


def stream_rows(manifest, rows, size, chunk=None):
    """Yield the images of ``rows`` as ``uint8`` arrays (n, size, size, 3), ``chunk`` at a time.

    Args:
        chunk: images per array (the last may hold fewer); default :data:`STREAM_CHUNK`.

    Raises:
        ImageError: naming the first file that cannot be used (when the generator reaches it).
    """
    rows = list(rows)
    chunk = chunk or STREAM_CHUNK
    for start in range(0, len(rows), chunk):
        yield load_images(manifest, rows[start:start + chunk], size, progress=False)


def stream_paths(paths, size, problems, chunk=None):
    """Yield ``(images, good_paths)`` for image files, ``chunk`` readable ones at a time.

    Every chunk but the last holds exactly ``chunk`` images, whichever files are skipped, so
    that the batches fall as they do over :func:`load_paths`' one array. Unreadable files are
    appended to ``problems`` as ``(path, reason)`` instead of raising, as :func:`load_paths` does.
    """
    chunk = chunk or STREAM_CHUNK
    images, good = [], []
    for path in paths:
        try:
            images.append(read_image(path, size))
            good.append(path)
        except ImageError as exc:
            problems.append((str(path), exc.reason))
        if len(images) == chunk:
            yield np.stack(images), good
            images, good = [], []
    if images:
        yield np.stack(images), good


def label_indices(rows, class_names):
    """Integer class index of every row (``abnormal`` = 1 for the karyogram task)."""
    index = {name: i for i, name in enumerate(class_names)}
    try:
        return np.array([index[row["label"]] for row in rows], dtype=np.int64)
    except KeyError as exc:
        raise KaryoError(
            f"unknown label {exc.args[0]!r} (expected one of {', '.join(class_names)})"
        ) from None


def make_dataset(x, y=None, batch_size=16, shuffle=False, seed=0, first_epoch=None):
    """A ``tf.data`` pipeline over in-memory arrays: batched, prefetched, optionally shuffled.

    The thesis' batch size 16 (section 3.2) is the default. Without ``shuffle`` the order of
    ``x`` is kept, so predictions line up with manifest rows.

    Training uses ``shuffle`` with ``first_epoch``: an endless stream of epochs ``first_epoch``,
    ``first_epoch + 1``, ... in which epoch e visits every example once, in an order drawn from
    ``(seed, e)`` alone (a stateless shuffle). A training resumed at epoch e after a kill
    therefore sees the same batches as one that never stopped. Give ``fit``
    ``steps_per_epoch=steps_per_epoch(len(x), batch_size)``: Keras then reads the stream with
    one iterator, epoch after epoch (without it Keras refuses an endless dataset). The order is
    drawn inside TensorFlow once per epoch and each batch is one gather: no Python runs per
    batch or per epoch.

    ``shuffle`` without ``first_epoch`` is tf.data's own shuffle, drawn anew at every pass
    from the dataset's generator: fine for one pass, not reproducible across a resume.

    Args:
        x, y: arrays with the same first dimension (``y`` may be None: inputs only).
        batch_size: examples per batch.
        shuffle: shuffled epochs (training) instead of the order of ``x``.
        seed: the shuffle's seed.
        first_epoch: the epoch the stream starts at (the one a resumed training starts at).
    """
    import tensorflow as tf

    if not shuffle or first_epoch is None:
        ds = tf.data.Dataset.from_tensor_slices(x if y is None else (x, y)).cache()
        if shuffle:
            ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
        return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    n = len(x)
    arrays = tuple(tf.convert_to_tensor(a) for a in ((x,) if y is None else (x, y)))
    seed = tf.constant(int(seed), tf.int64)

    def batches_of(epoch):
        order = tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64),
                                                         seed=tf.stack([seed, epoch]))
        return tf.data.Dataset.from_tensor_slices(order).batch(batch_size)

    def gather(index):
        batch = tuple(tf.gather(a, index) for a in arrays)
        return batch[0] if y is None else batch

    ds = (tf.data.Dataset.counter(int(first_epoch)).flat_map(batches_of)
          .map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True))
    return ds.prefetch(tf.data.AUTOTUNE)


def steps_per_epoch(n, batch_size):
    """Batches in one epoch of ``n`` examples (the last one may be smaller)."""
    return -(-int(n) // int(batch_size))
