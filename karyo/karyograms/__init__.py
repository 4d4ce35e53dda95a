"""Karyograms: karyotypes, the standard layout, synthetic rendering and assembly from crops.

What a karyogram is made of: the ISCN karyotypes karyo knows (:mod:`.karyotype`), the layout of
the 24 slots (:mod:`.layout`), synthetic G- and Q-banded karyograms (:mod:`.synth`) and real
karyograms assembled from a cell's chromosome crops (:mod:`.assemble`).

Names are imported lazily (PEP 562, through ``lazy_loader``): importing the package is cheap,
and TensorFlow is imported only by the modules that need it, when they are first used.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submodules=[
        'abnormal_cells',
        'assemble',
        'chromosome_synth',
        'degrade',
        'karyotype',
        'layout',
        'pair_augment',
        'slots',
        'synth',
    ],
    submod_attrs={
        'abnormal_cells': ['slot_labels', 'make_abnormal', 'abnormal_karyogram', 'cell_slot_labels', 'split_cells'],
        'assemble': [
            'slot_of', 'read_cells', 'cell_crops', 'folder_crops', 'is_cell_folder', 'find_cell_folders',
            'load_crop', 'is_dark_field', 'trim', 'upright', 'rotate_whole', 'prepare_cell', 'prepare_folder',
            'main_object', 'normalise_contrast', 'prepare_crops', 'assemble_cell', 'assemble_folder',
            'safe_file_name', 'assemble_cells', 'pad_square', 'chromosome_manifest',
        ],
        'chromosome_synth': ['default_crop_size', 'synthetic_chromosomes'],
        'degrade': ['degrade_crop', 'degrade_cell'],
        'karyotype': [
            'Band', 'Segment', 'Chromosome', 'Karyotype', 'whole', 'make_karyotype', 'get', 'list_karyotypes',
            'for_abnormality', 'counts', 'cytobands', 'point', 'segment_bands', 'chromosome_bands',
            'chromosome_length', 'centromere_position',
        ],
        'layout': [
            'Layout', 'get_layout', 'Arrangement', 'gap', 'slot_boxes', 'number_boxes', 'draw_numbers', 'fit_scale',
            'arrange_karyogram', 'background_level',
        ],
        'pair_augment': ['augment_pairs'],
        'slots': [
            'ChromosomeReading', 'SlotReading', 'as_gray', 'darkness', 'main_axis_profile', 'read_slots',
            'slot_counts', 'expected_counts', 'count_deviations',
        ],
        'synth': [
            'sample_cell', 'sample_chromosome', 'extent', 'render_chromosome', 'render_karyogram', 'plan_dataset',
            'synthesize',
        ],
    },
)
