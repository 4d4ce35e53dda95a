"""Experiments: the registry, training, tuning, runs, reproduction, transfer, report and figures.

Every experiment is declared once in :mod:`.registry` and run by name: :mod:`.training` trains
it into a run folder, :mod:`.tuning` searches its hyperparameters with keras-tuner, :mod:`.runs`
evaluates and predicts, :mod:`.reproduce` runs the thesis' Table 5.1 and :mod:`.report` writes it.

Names are imported lazily (PEP 562, through ``lazy_loader``): importing the package is cheap,
and TensorFlow is imported only by the modules that need it, when they are first used.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submodules=[
        'cases',
        'chromosomes',
        'detection',
        'figures',
        'fit',
        'hypermodel',
        'pretrain',
        'registry',
        'report',
        'reproduce',
        'runs',
        'training',
        'transfer',
        'tuner',
        'tuning',
    ],
    submod_attrs={
        'cases': ['cell_findings', 'case_calls', 'case_metrics', 'evaluate_by_group'],
        'chromosomes': ['train_chromosome_classifier'],
        'detection': [
            'is_detector_run', 'abnormal_variants', 'degraded_variants', 'train_detector', 'evaluate_detector_run',
            'predict_detector_paths', 'write_explanations',
        ],
        'figures': [
            'plot_training_curves', 'plot_confusion_matrix', 'plot_roc_curves', 'plot_reliability_diagram',
            'plot_risk_coverage', 'plot_confidence_histogram', 'plot_tuning_scatter', 'plot_explanation',
            'plot_gallery', 'plot_block_rates',
        ],
        'fit': [
            'distribution_strategy', 'strategy_scope', 'strategy_summary', 'FitConfig', 'two_phase_fit',
            'seed_generators', 'read_backup_state', 'epoch_seeding', 'phase_callbacks', 'compile_model', 'fit_part',
            'read_history', 'write_history',
        ],
        'hypermodel': [
            'gene_name', 'trial_configuration', 'batch_size_choices', 'unfreeze_choices', 'unfreeze_value',
            'compile_trial', 'fit_trial', 'KaryogramHyperModel',
        ],
        'pretrain': [
            'build_classifier', 'he_initialise', 'cell_scale', 'present', 'real_chromosomes', 'pretrain',
            'score_chromosomes', 'pretrain_settings', 'settings_key', 'pretrained_dir', 'chromosome_weights',
            'starting_weights', 'pretraining_quality',
        ],
        'registry': ['Experiment', 'list_experiments', 'get_experiment'],
        'report': ['collect_runs', 'write_report', 'interval_of', 'collect_seed_runs', 'mean_sd', 'gallery_rows'],
        'reproduce': ['Preset', 'get_preset', 'run_dir', 'seed_dir', 'reproduce'],
        'runs': ['model_paths', 'load_models', 'read_config', 'pooled_passes', 'evaluate_run', 'predict_paths'],
        'training': [
            'is_complete', 'manifest_layout', 'prepare_data', 'environment', 'read_json', 'train_model',
            'print_warning', 'train_experiment',
        ],
        'transfer': [
            'target_holdout_groups', 'two_step', 'check_inputs', 'write_comparison', 'comparison_markdown',
            'cross_stain',
        ],
        'tuner': [
            'search_role', 'check_search_extras', 'trial_record_path', 'trial_order', 'one_line', 'ResumableOracle',
            'SearchOracle', 'EvolutionOracle', 'SearchTuner', 'SearchFailed',
        ],
        'tuning': [
            'default_oracle', 'trial_blocks', 'trial_phenotype', 'describe_blocks', 'read_trials', 'thesis_recipes',
            'tune',
        ],
    },
)
