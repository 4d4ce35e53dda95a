"""The thesis in numbers: every default karyo takes from it, and its Table 5.1.

Source: "Machine Learning for Automation of Chromosome based Genetic Diagnostics" (KTH, 2020),
``../shared/seeds/001_*.txt``. Each number names the section it comes from; modules take their
defaults from here, so a number the thesis fixes is written once.

Examples:
    >>> from karyo import thesis
    >>> thesis.IMAGE_SIZE, thesis.MC_PASSES, thesis.REFERRAL_THRESHOLD
    (416, 100, 0.8)
    >>> thesis.TABLE_5_1["vgg16_augmented"].auc
    0.99
"""

from dataclasses import dataclass

#: 3.1.2: the karyograms were resized to 416x416.
IMAGE_SIZE = 416
#: 3.1.2: the alpha-dataset, "105 regular cases and 41 abnormal cases".
ALPHA_NORMAL, ALPHA_ABNORMAL = 105, 41
#: 3.1.2: augmented and balanced to 376 normal + 316 abnormal karyograms (692 images).
BALANCED_NORMAL, BALANCED_ABNORMAL = 376, 316
#: 3.1.2: brightness changed by up to +-25 %.
BRIGHTNESS = 0.25
#: 3.1.2: noise on up to 5 % of the pixels.
NOISE = 0.05
#: 4.1: "Their ratio is 64%, 16%, and 20%" (train / validation / test).
SPLIT_FRACTIONS = (0.64, 0.16, 0.20)
#: 3.2: the Bayesian search chose Adam's learning rate 1e-3 and batch size 16.
LEARNING_RATE, BATCH_SIZE = 1e-3, 16
#: 3.4: 100 Monte Carlo Dropout passes per image.
MC_PASSES = 100
#: 3.4: a confidence score (share of the passes' votes) below 80 % refers the case to review.
REFERRAL_THRESHOLD = 0.8


@dataclass(frozen=True)
class ThesisResult:
    """A row of thesis Table 5.1, and the test-set confusion counts chapter 4 gives for it.

    The counts do not always agree with the table: section 4.2.1 lists 116 test images where
    the split had 139, and section 4.3.3's counts (57 TP, 4 FP, 76 TN, 2 FN) give accuracy 0.957,
    not the 0.98 of Table 5.1. Both are kept; reports show the table and flag the disagreement.
    """

    accuracy: float
    precision: float
    recall: float
    auc: float
    tp: int
    fp: int
    tn: int
    fn: int
    section: str

    def recomputed(self):
        """Accuracy, precision and recall recomputed from the confusion counts."""
        n = self.tp + self.fp + self.tn + self.fn
        return {
            "accuracy": (self.tp + self.tn) / n,
            "precision": self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0,
            "recall": self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0,
            "n": n,
        }


#: Table 5.1 (test set), keyed by karyo's experiment names, in the thesis' order.
TABLE_5_1 = {
    "vgg16_original": ThesisResult(0.83, 0.83, 0.56, 0.79, 5, 1, 20, 4, "4.1.1"),
    "inceptionv3_original": ThesisResult(0.77, 0.58, 0.78, 0.86, 7, 5, 16, 2, "4.1.2"),
    "vgg16_augmented": ThesisResult(0.97, 0.98, 0.95, 0.99, 56, 1, 56, 3, "4.2.1"),
    "inceptionv3_augmented": ThesisResult(0.94, 0.98, 0.86, 0.99, 51, 1, 79, 8, "4.2.2"),
    "vgg16_unfreeze1": ThesisResult(0.97, 0.98, 0.96, 0.99, 57, 1, 79, 2, "4.3.2"),
    "vgg16_unfreeze2": ThesisResult(0.98, 0.93, 0.96, 0.99, 57, 4, 76, 2, "4.3.3"),
    "inceptionv3_unfreeze_all": ThesisResult(0.95, 1.00, 0.89, 0.99, 53, 0, 80, 6, "4.3.4"),
}
