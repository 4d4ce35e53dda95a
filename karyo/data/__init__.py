"""Data: manifests, image IO, splits, augmentation, the leakage guard and the tf.data pipeline.

The first stage of the thesis' pipeline (3.1): what a dataset is (a manifest of images with
``label`` and ``group``), how an image is read, how it is split into train / validation / test,
how the training part is augmented (brightness, noise, blur; never geometry) and fed to Keras.

Names are imported lazily (PEP 562, through ``lazy_loader``): importing the package is cheap,
and TensorFlow is imported only by the modules that need it, when they are first used.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submodules=['augment', 'imageio', 'leakage', 'manifest', 'pipeline', 'splits'],
    submod_attrs={
        'augment': [
            'augment_image', 'check_parameters', 'balance_counts', 'default_targets', 'copy_rng', 'copy_path',
            'augment_rows', 'augment_manifest',
        ],
        'imageio': [
            'declared_size', 'decode_image', 'to_rgb8', 'resize', 'read_image', 'encode_png', 'write_image',
            'is_image_path',
        ],
        'leakage': [
            'hash_bits', 'perceptual_hash', 'hash_files', 'file_hashes', 'hamming_distances', 'near_duplicates',
            'check_leakage', 'leakage_summary', 'write_pairs',
        ],
        'manifest': [
            'Manifest', 'class_names', 'sha256_file', 'check_relative', 'read_manifest', 'write_manifest',
            'default_labels', 'verify_manifest', 'file_problem', 'check_manifest', 'check_run_data',
            'check_output_folder', 'import_folder',
        ],
        'pipeline': [
            'load_images', 'load_paths', 'stream_rows', 'stream_paths', 'label_indices', 'make_dataset',
            'steps_per_epoch',
        ],
        'splits': ['split_groups', 'split_rows', 'thesis_split', 'straddling_groups', 'split_by_case'],
    },
)
