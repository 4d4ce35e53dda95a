"""Reading and writing karyogram images with OpenCV.

Every image becomes ``uint8`` with three channels: grayscale karyograms are replicated to
3 channels (what ImageNet backbones expect), 16-bit images are scaled to 8 bits, and an alpha
channel is composited over white (karyograms are drawn on white paper). The thesis resized
every karyogram to 416x416 pixels (section 3.1.2); that is the default size here.

Any file that cannot be used raises :class:`karyo.errors.ImageError` naming the file. Images
larger than :data:`MAX_PIXELS` are refused from the size their header declares, before any
pixel is decoded: a decompression bomb (a small file that decodes to gigabytes) never reaches
OpenCV's allocator.
"""

import os
import struct
from pathlib import Path

import numpy as np

from karyo import thesis
from karyo.atomic import atomic_write_bytes
from karyo.errors import ImageError

#: The thesis' input size (section 3.1.2: "we first resized the images into 416x416 pixels").
DEFAULT_SIZE = thesis.IMAGE_SIZE
#: Extensions the loader accepts.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
#: Smallest side accepted: below this an image carries no karyogram.
MIN_SIDE = 8
#: Largest image accepted, in pixels (a decompression-bomb guard: 100 megapixels).
MAX_PIXELS = 100_000_000
#: Largest file accepted, in bytes: an uncompressed 16-bit RGBA image of MAX_PIXELS pixels.
MAX_BYTES = 8 * MAX_PIXELS


def _cv2():
    # OpenCV's own bomb limit, read when cv2 is first imported (so only if karyo imports it
    # first); declared_size() is the guard that always holds.
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


def declared_size(data):
    """Width and height that an image file's header declares, read without decoding; None if unknown.

    Covers the formats karyograms come in (PNG, JPEG, TIFF, BMP). OpenCV's own pixel limit
    (``OPENCV_IO_MAX_IMAGE_PIXELS``) is read once, when ``cv2`` is first imported, so it does
    not hold in a process that imported ``cv2`` before karyo did: this check does.
    """
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n":
            return struct.unpack(">II", data[16:24])
        if data[:2] == b"\xff\xd8":
            return _jpeg_size(data)
        if data[:4] in (b"II*\x00", b"MM\x00*"):
            return _tiff_size(data)
        if data[:2] == b"BM":
            if int.from_bytes(data[14:18], "little") == 12:  # OS/2 header: 16-bit sides
                return struct.unpack("<HH", data[18:22])
            width, height = struct.unpack("<ii", data[18:26])
            return abs(width), abs(height)  # a negative height means top-down rows
    except struct.error:  # a header cut short: let the decoder say what is wrong
        return None
    return None


def _jpeg_size(data):
    """Width and height from a JPEG's start-of-frame segment (walking the segments from SOI)."""
    i = 2
    while i + 9 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD9:  # markers without a length
            i += 2
            continue
        # SOF0..SOF15 carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) are not frames.
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            return width, height
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def _tiff_size(data):
    """Width and height from the first image file directory of a TIFF (tags 256 and 257)."""
    order = "<" if data[:2] == b"II" else ">"
    (offset,) = struct.unpack(order + "I", data[4:8])
    (count,) = struct.unpack(order + "H", data[offset:offset + 2])
    size = {}
    for k in range(count):
        entry = data[offset + 2 + 12 * k:offset + 14 + 12 * k]
        tag, kind = struct.unpack(order + "HH", entry[:4])
        if tag in (256, 257):
            size[tag] = struct.unpack(order + "H", entry[8:10])[0] if kind == 3 else \
                struct.unpack(order + "I", entry[8:12])[0]
    return (size[256], size[257]) if len(size) == 2 else None


def _check_size(path, width, height):
    if min(width, height) < MIN_SIDE:
        raise ImageError(path, f"too small ({width}x{height} pixels; at least {MIN_SIDE}x{MIN_SIDE} needed)")
    if width * height > MAX_PIXELS:
        raise ImageError(path, f"too large ({width}x{height} pixels; the limit is {MAX_PIXELS:,} pixels)")


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
        n_bytes = path.stat().st_size
        data = path.read_bytes() if n_bytes <= MAX_BYTES else None
    except OSError as exc:
        raise ImageError(path, f"cannot be read ({exc.strerror or exc})") from None
    if data is None:
        raise ImageError(path, f"too large ({n_bytes:,} bytes; the limit is {MAX_BYTES:,} bytes)")
    if not data:
        raise ImageError(path, "empty file (0 bytes)")
    reason = _truncation(data)
    if reason:
        raise ImageError(path, reason)
    size = declared_size(data)
    if size is not None:
        _check_size(path, *size)
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:  # OpenCV asserts instead of returning None on some files
        if "CV_IO_MAX_IMAGE_PIXELS" in str(exc):
            raise ImageError(path, f"too large (over the limit of {MAX_PIXELS:,} pixels)") from None
        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ImageError(path, f"cannot be decoded as an image (OpenCV: {detail})") from None
    if image is None or image.size == 0:
        raise ImageError(
            path, f"cannot be decoded as an image (corrupt, not an image, or over {MAX_PIXELS:,} pixels)"
        )
    return to_rgb8(image, path)


def to_rgb8(image, path="<array>"):
    """Convert a decoded OpenCV array (gray, BGR, BGRA; 8/16-bit or float) to RGB ``uint8``."""
    cv2 = _cv2()
    h, w = image.shape[:2]
    _check_size(path, w, h)
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
