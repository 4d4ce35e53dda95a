"""Error types: every failure a user can cause is one of these, with one clear message."""


class KaryoError(Exception):
    """Base class for errors that the command line reports as one line, without a traceback."""


class ImageError(KaryoError):
    """An image file that cannot be used; the message names the file and the reason."""

    def __init__(self, path, reason):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ManifestError(KaryoError):
    """A manifest that cannot be read or has an unusable row; the message names file and row."""


class SplitError(KaryoError):
    """A split that cannot be made (for example a class with too few groups)."""
