"""Benchmarks: ``karyo bench`` measures karyo's fast paths against the naive ones, side by side.

Names are imported lazily (PEP 562, through ``lazy_loader``): importing the package is cheap,
and TensorFlow is imported only by the modules that need it, when they are first used.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submodules=['suite'],
    submod_attrs={
        'suite': [
            'stand_in_karyograms', 'bench_synth_render', 'matmul_gflops', 'count_macs', 'bench_backbone_throughput',
            'bench_mc_dropout', 'bench_head_training', 'bench_pretraining', 'bench_unfreeze_last_block',
            'bench_detector', 'bench_tuner_trial', 'bench_predict_memory', 'machine_info',
            'bench_reproduce_overhead', 'evaluate_goals', 'run_bench', 'format_bench',
        ],
    },
)
