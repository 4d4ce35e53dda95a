"""Reading and writing karyogram images with OpenCV.

Every image becomes ``uint8`` with three channels: grayscale karyograms are replicated to
3 channels (what ImageNet backbones expect), 16-bit images are scaled to 8 bits, and an alpha
channel is composited over white (karyograms are drawn on white paper). The thesis resized
every karyogram to 416x416 pixels (section 3.1.2); that is the default size here.

Any file that cannot be used raises :class:`karyo.errors.ImageError` naming the file.
"""

import os
from pathlib import Path

import numpy as np

from karyo.atomic import atomic_write_bytes
from karyo.errors import ImageError

#: The thesis' input size (section 3.1.2: "we first resized the images into 416x416 pixels").
DEFAULT_SIZE = 416
#: Extensions the loader accepts.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
#: Smallest side accepted: below this an image carries no karyogram.
MIN_SIDE = 8
#: Largest image accepted, in pixels (a decompression-bomb guard: 100 megapixels).
MAX_PIXELS = 100_000_000


def _cv2():
    # OpenCV reads this limit when it decodes: refuse bombs before they are allocated.
    os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_PIXELS))
    import cv2

    return cv2


def _truncation(data):
    """Return a reason if the bytes are a PNG or JPEG whose end is missing, else None."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and b"IEND" not in data[-16:]:
        return "truncated PNG (no IEND chunk at the end)"
    if data[:2] == b"\xff\xd8" and b"\xff\xd9" not in data[-16:]:
        return "truncated JPEG (no end-of-image marker)"
    return None


def decode_image(path):
    """Read ``path`` into a ``uint8`` array of shape (H, W, 3) at its own size.

    Raises:
        ImageError: the file is missing, empty, truncated, not an image, too small or too large.
    """
    cv2 = _cv2()
    path = Path(path)
    if not path.exists():
        raise ImageError(path, "file not found")
    if path.is_dir():
        raise ImageError(path, "is a folder, not an image")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(path, f"cannot be read ({exc.strerror or exc})") from None
    if not data:
        raise ImageError(path, "empty file (0 bytes)")
    reason = _truncation(data)
    if reason:
        raise ImageError(path, reason)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise ImageError(
            path, f"cannot be decoded as an image (corrupt, not an image, or over {MAX_PIXELS:,} pixels)"
        )
    return to_rgb8(image, path)


def to_rgb8(image, path="<array>"):
    """Convert a decoded OpenCV array (gray, BGR, BGRA; 8/16-bit or float) to RGB ``uint8``."""
    cv2 = _cv2()
    h, w = image.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise ImageError(path, f"too small ({w}x{h} pixels; at least {MIN_SIDE}x{MIN_SIDE} needed)")
    if h * w > MAX_PIXELS:
        raise ImageError(path, f"too large ({w}x{h} pixels; the limit is {MAX_PIXELS:,} pixels)")
    if image.dtype == np.uint16:
        image = (image.astype(np.float32) / 257.0).round().astype(np.uint8)
    elif image.dtype in (np.float32, np.float64):
        hi = 1.0 if float(np.nanmax(image)) <= 1.0 else 255.0
        image = np.clip(np.nan_to_num(image) * (255.0 / hi), 0, 255).round().astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ImageError(path, f"unsupported pixel type {image.dtype}")
    if image.ndim == 2:
        return np.ascontiguousarray(np.repeat(image[:, :, None], 3, axis=2))
    channels = image.shape[2]
    if channels == 1:
        return np.ascontiguousarray(np.repeat(image, 3, axis=2))
    if channels == 4:
        alpha = image[:, :, 3:4].astype(np.float32) / 255.0
        rgb = image[:, :, :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
        return cv2.cvtColor(rgb.round().astype(np.uint8), cv2.COLOR_BGR2RGB)
    if channels == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    raise ImageError(path, f"unsupported number of channels ({channels})")


def resize(image, size):
    """Resize to ``size`` x ``size`` (the thesis' square resize; area filter when shrinking)."""
    cv2 = _cv2()
    if size is None or image.shape[:2] == (size, size):
        return image
    shrinking = image.shape[0] > size or image.shape[1] > size
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interpolation)


def read_image(path, size=DEFAULT_SIZE):
    """Read ``path`` as RGB ``uint8`` resized to ``size`` x ``size`` (``None`` keeps its size)."""
    return resize(decode_image(path), size)


def encode_png(image):
    """Encode an RGB or gray ``uint8`` array as PNG bytes (deterministic for the same array)."""
    cv2 = _cv2()
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 6])
    if not ok:
        raise ImageError("<array>", "could not be encoded as PNG")
    return buf.tobytes()


def write_image(path, image):
    """Write an RGB or gray ``uint8`` array as a PNG file, atomically."""
    atomic_write_bytes(path, encode_png(image))


def is_image_path(path):
    """True if the file name has an image extension the loader accepts."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS
