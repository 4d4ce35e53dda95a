"""Uncertainty: MC Dropout prediction, confidence and referral, metrics and calibration.

The thesis' 3.4 and beyond: :mod:`.mc_dropout` runs the backbone once and the head T times;
:mod:`.confidence` turns the T passes into the vote share, mean probability, entropy, mutual
information and the referral decision; :mod:`.metrics` scores them (accuracy ... AUC, ECE, AURC).

Names are imported lazily (PEP 562, through ``lazy_loader``): importing the package is cheap,
and TensorFlow is imported only by the modules that need it, when they are first used.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submodules=['confidence', 'mc_dropout', 'metrics'],
    submod_attrs={
        'confidence': ['summarize_passes', 'predictions_table', 'write_predictions', 'read_predictions'],
        'mc_dropout': [
            'mc_dropout_layers', 'reset_mc_dropout_seeds', 'split_at_first_mc_dropout', 'mc_dropout_layers_of',
            'mc_predict', 'naive_mc_predict',
        ],
        'metrics': [
            'reliability_bins', 'expected_calibration_error', 'risk_coverage', 'area_under_risk_coverage',
            'compute_metrics', 'metrics_from_predictions', 'group_bootstrap', 'auc_statistic', 'recall_statistic',
            'metric_intervals', 'per_group_recall', 'wrong_predictions', 'markdown_table',
            'wrong_predictions_markdown', 'write_wrong_predictions', 'chromosome_metrics',
        ],
    },
)
