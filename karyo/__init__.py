"""karyo: chromosome abnormality detection on karyograms.

Reproduces and extends the KTH thesis "Machine Learning for Automation of Chromosome based
Genetic Diagnostics" (2020): VGG16 / InceptionV3 transfer learning decides whether a karyogram
is normal or abnormal, and Monte Carlo Dropout says how confident that decision is, so that
only uncertain cases are referred to a cytogeneticist.

Importing ``karyo`` has no side effects and does not import TensorFlow; the heavy modules
(``karyo.models``, ``karyo.training`` ...) import it when they are used.
"""

__version__ = "0.1.0"
