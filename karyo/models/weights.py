"""Where a backbone's starting weights come from: ImageNet, a file, or none.

``"imagenet"`` downloads through Keras' own path into the Keras cache (``$KERAS_HOME/models``, by
default ``~/.keras/models``); offline this fails with one :class:`~karyo.errors.KaryoError` saying
which file to place there. ``"none"`` is a random initialisation (seed it:
``karyo.models.network.build_backbone``'s ``seed``), ``"auto"`` is ImageNet when it can be had and
otherwise none, and a file path loads weights from a file (see :func:`load_backbone_weights` for
the accepted formats).
"""

import contextlib
import os
import socket
import sys
from pathlib import Path

from karyo.data.manifest import sha256_file
from karyo.errors import KaryoError
from karyo.models.backbones import get_backbone
from karyo.models.saving import load_model

#: Seconds a stalled socket may wait while ImageNet weights download. Long enough for a slow
#: link (it bounds each read, not the whole download), short enough that an offline machine
#: whose packets are silently dropped does not hang for minutes.
DOWNLOAD_TIMEOUT = 30.0
#: The ``weights`` values besides a file path.
WEIGHTS_CHOICES = ("imagenet", "none", "auto", "chromosome")


def keras_cache_dir():
    """The folder Keras keeps downloaded models in (``$KERAS_HOME/models``)."""
    # Keras reads KERAS_HOME once, when it is imported: ask it rather than the environment
    # (it has no public accessor), and mirror its fallback to /tmp/.keras when the home folder
    # is not writable.
    try:
        from keras.src.backend.config import keras_home

        home = keras_home()
    except ImportError:
        home = os.environ.get("KERAS_HOME", "~/.keras")
    home = os.path.expanduser(home)
    if not os.access(home, os.W_OK):
        home = os.path.join("/tmp", ".keras")
    return Path(home) / "models"


def imagenet_weights_path(name):
    """Where Keras looks for ``name``'s ImageNet file (it may not exist yet)."""
    return keras_cache_dir() / get_backbone(name).weights_file


@contextlib.contextmanager
def _socket_timeout(seconds):
    # urllib (which Keras' get_file uses) has no timeout of its own: a black-holed network
    # would block forever. The default timeout is process-wide, so restore it afterwards.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


class _HeldFirstLine:
    """A stand-in for ``sys.stdout`` that holds back what is written until more than one line came.

    Keras' ``get_file`` prints "Downloading data from URL" before it connects, then a progress
    bar once bytes arrive: holding the first line until the bar starts shows it for a download
    that works and drops it for one that fails at once (offline), whose error says it all.
    """

    def __init__(self, stream):
        self.stream, self.held, self.passing = stream, "", False

    def write(self, text):
        if self.passing:
            return self.stream.write(text)
        self.held += text
        if self.held.count("\n") > 1 or not self.held.endswith("\n") and "\n" in self.held:
            self.release()
        return len(text)

    def release(self):
        self.passing = True
        self.stream.write(self.held)
        self.held = ""

    def flush(self):
        if self.passing:
            self.stream.flush()

    def __getattr__(self, name):  # isatty, encoding, fileno ...: the real stream's
        return getattr(self.stream, name)


#: Backbones whose ImageNet download already failed in this process, with the error: offline, a
#: reproduction of 14 runs would otherwise wait for the download timeout 14 times.
_FAILED_DOWNLOADS = {}


def fetch_imagenet_weights(name, timeout=DOWNLOAD_TIMEOUT):
    """Make sure ``name``'s ImageNet file is in the Keras cache; download it if it is not.

    Uses ``keras.utils.get_file`` with the file name, URL and hash that ``keras.applications``
    itself uses, so the network's constructor finds the file afterwards.

    Returns:
        The local path of the weights file.

    Raises:
        KaryoError: the download failed (offline, blocked, or a corrupt file); the message says
            where to place the file by hand.
    """
    import keras

    backbone = get_backbone(name)
    target = imagenet_weights_path(name)
    if backbone.name in _FAILED_DOWNLOADS and not target.is_file():
        raise KaryoError(_FAILED_DOWNLOADS[backbone.name])
    held = _HeldFirstLine(sys.stdout)
    try:
        with _socket_timeout(timeout), contextlib.redirect_stdout(held):
            path = keras.utils.get_file(backbone.weights_file, backbone.weights_url,
                                        cache_subdir="models", file_hash=backbone.weights_hash)
        if held.held and not held.passing:
            held.release()  # a download too fast for a progress bar: say it happened
    except Exception as exc:  # Keras raises a bare Exception on URL failure, ValueError on a bad hash
        reason = str(exc).replace(backbone.weights_url, "<url>").strip() or type(exc).__name__
        message = (
            f"cannot obtain the ImageNet weights for {backbone.name} ({reason}). Offline? "
            f"Download {backbone.weights_url} on a connected machine and place it at {target} "
            f"(the Keras cache: $KERAS_HOME/models, by default ~/.keras/models), "
            f"or use --weights none or --weights auto")
        _FAILED_DOWNLOADS[backbone.name] = message
        raise KaryoError(message) from None
    return Path(path)


def resolve_weights(weights, backbone, timeout=DOWNLOAD_TIMEOUT, chromosome=None):
    """Decide which weights a backbone will start from, before it is built.

    Args:
        weights: ``"imagenet"``, ``"chromosome"``, ``"auto"`` (ImageNet when it can be had, else
            ``chromosome``), ``"none"`` (or ``None``: a random initialisation) or a path to a
            weights file (``.weights.h5``, ``.h5`` or a saved karyo ``.keras`` model).
        backbone: a registered backbone name.
        timeout: socket timeout for the ImageNet download, in seconds.
        chromosome: a function returning the path of karyo's chromosome-pretrained weights for
            this backbone (``karyo.experiments.pretrain.starting_weights`` passes the cached
            pretraining); without it ``chromosome`` and an offline ``auto`` are refused, so that
            no run ever falls back to random weights silently.

    Returns:
        ``(weights_arg, used, note)``: ``weights_arg`` is what ``karyo.models.network.build_backbone``
        and ``build_model`` take (``"imagenet"``, ``None`` or a file's path); ``used`` is
        ``"imagenet"``, ``"chromosome"``, ``"none"`` or ``"file"``; ``note`` is a sentence for the
        run's config and report (for ``auto`` it says why ImageNet weights were not used).

    Raises:
        KaryoError: unknown value, a missing file, or ``imagenet`` that cannot be downloaded.
    """
    bb = get_backbone(backbone)
    if weights is None or str(weights).strip().lower() == "none":
        return None, "none", "random initialisation (no pre-trained weights)"
    text = str(weights).strip()
    if text.lower() == "imagenet":
        path = fetch_imagenet_weights(bb.name, timeout)
        return "imagenet", "imagenet", f"ImageNet weights ({path})"
    if text.lower() in ("chromosome", "auto") and chromosome is None:
        raise KaryoError(f"--weights {text}: chromosome-pretrained weights are resolved by "
                         f"karyo.experiments.pretrain.starting_weights")
    if text.lower() == "chromosome":
        path = chromosome()
        return str(path), "chromosome", f"chromosome-pretrained weights ({path})"
    if text.lower() == "auto":
        try:
            path = fetch_imagenet_weights(bb.name, timeout)
        except KaryoError as exc:
            path = chromosome()
            return str(path), "chromosome", (
                f"--weights auto: ImageNet weights unavailable, so the {bb.name} backbone starts from "
                f"karyo's chromosome-pretrained weights ({path}). Reason: {exc}")
        return "imagenet", "imagenet", f"--weights auto: ImageNet weights ({path})"
    path = Path(text).expanduser()
    if not path.name.endswith((".h5", ".hdf5", ".keras")):
        raise KaryoError(f"--weights {text}: expected one of {', '.join(WEIGHTS_CHOICES)} or a "
                         f"weights file (.weights.h5, .h5 or .keras)")
    if not path.is_file():
        raise KaryoError(f"{path}: weights file not found")
    return str(path), "file", f"weights loaded from {path}"


def weights_identity(used, weights_arg=None, seed=None):
    """A short string that names the starting weights, for cache keys and run configs.

    ``imagenet``; ``none:seed=<seed>`` (a random initialisation is only reproducible with its
    seed); ``chromosome:<cache folder>:sha256:<hex>`` for the cached chromosome-pretrained file
    (the folder names its settings); ``sha256:<hex>`` of any other weights file.
    """
    if used == "imagenet":
        return "imagenet"
    if used == "none":
        return f"none:seed={seed}"
    if used == "chromosome":
        return f"chromosome:{Path(weights_arg).parent.name}:sha256:{sha256_file(weights_arg)}"
    return f"sha256:{sha256_file(weights_arg)}"


def load_backbone_weights(model, path):
    """Load a weights file into a built backbone (same architecture; any input size).

    Accepted formats:

    * ``*.weights.h5``: Keras 3 weights of the backbone itself, as written by
      ``backbone.save_weights(...)`` (matched by layer order and type, not by name);
    * ``*.h5`` / ``*.hdf5``: legacy Keras 2 weights in topological order, such as the files
      ``keras.applications`` downloads (e.g. ``vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5``);
    * ``*.keras``: a saved karyo model (``model.keras`` of a run, e.g. the intermediate
      chromosome task of the two-step transfer): its ``backbone`` layer's weights are copied.

    Raises:
        KaryoError: the file is missing, unreadable or does not fit the architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise KaryoError(f"{path}: weights file not found")
    try:
        if path.suffix == ".keras":

            source = load_model(path)
            try:
                donor = source.get_layer("backbone")
            except ValueError:
                raise KaryoError(f"{path}: not a karyo model (it has no layer named 'backbone')") from None
            shapes = [tuple(w.shape) for w in donor.weights]
            if shapes != [tuple(w.shape) for w in model.weights]:
                raise KaryoError(f"{path}: its backbone ({donor.count_params():,} parameters) does "
                                 f"not match this one ({model.count_params():,})")
            model.set_weights(donor.get_weights())
        else:
            model.load_weights(str(path))
    except KaryoError:
        raise
    except Exception as exc:  # Keras raises ValueError / OSError / KeyError for unusable files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KaryoError(f"{path}: cannot load these weights into the {model.name} backbone "
                         f"(a file for another architecture? {first})") from None
    return model
