"""karyo: chromosome abnormality detection on karyograms.

Reproduces and extends the KTH thesis "Machine Learning for Automation of Chromosome based
Genetic Diagnostics" (2020): VGG16 / InceptionV3 transfer learning decides whether a karyogram
is normal or abnormal, and Monte Carlo Dropout says how confident that decision is, so that
only uncertain cases are referred to a cytogeneticist.

The sub-packages follow the pipeline: :mod:`karyo.data` -> :mod:`karyo.karyograms` ->
:mod:`karyo.models` -> :mod:`karyo.experiments` -> :mod:`karyo.uncertainty`
(``docs/architecture.md`` draws it).

Importing ``karyo`` is cheap: it does not import TensorFlow (the command line starts in a
fraction of a second). It does one thing: once Keras is imported, by you or by karyo, karyo's
Keras layers (``karyo>MCDropout``, ``karyo>Preprocess``) are registered with it, so that after
``import karyo`` Keras' own ``keras.saving.load_model("RUN/model.keras")`` reads karyo's models.
``karyo.load_model`` does the same with safe mode on and one-line errors.
"""

import lazy_loader
import wrapt

__version__ = "0.2.0"


@wrapt.when_imported("keras")
def _register_layers(keras):
    import karyo.models.layers  # noqa: F401  (importing it registers the layers)


__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submodules=["bench", "data", "experiments", "karyograms", "models", "uncertainty"],
    submod_attrs={"models.saving": ["load_model"]},
)
