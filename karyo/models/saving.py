"""Loading saved karyo models with Keras' safe mode."""

import re
import zipfile
from pathlib import Path

import keras

from karyo.errors import KaryoError
from karyo.models import layers  # noqa: F401  (registers karyo's layers with Keras)


def load_model(path, compile=False):
    """Load a saved karyo model (``model.keras``) with Keras' safe mode on.

    Raises:
        KaryoError: the file is missing or is not a loadable Keras model.
    """
    path = Path(path)
    if not path.is_file():
        raise KaryoError(f"{path}: model file not found")
    if path.suffix == ".keras" and not zipfile.is_zipfile(path):
        # Keras would say "File not found", which sends the user looking in the wrong place.
        raise KaryoError(f"{path}: not a Keras model file (a .keras file is a zip archive; this one is "
                         "damaged or something else)")
    try:
        return keras.saving.load_model(path, safe_mode=True, compile=compile)
    except Exception as exc:  # Keras raises ValueError / OSError / zipfile errors here
        text = str(exc).strip()
        unknown = re.search(r"Could not locate class '([^']+)'", text)
        if unknown:
            # Keras' own message runs to a dozen lines; what the user needs is what to import.
            raise KaryoError(f"{path}: the model uses the layer '{unknown.group(1)}', which no imported "
                             f"package registers with Keras: import the package that defines it "
                             f"(karyo's own layers are registered by 'import karyo')") from None
        first = text.splitlines()[0] if text else type(exc).__name__
        raise KaryoError(f"{path}: cannot load the model ({first})") from None
