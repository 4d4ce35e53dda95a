"""Models: backbones, their starting weights, the thesis' network and head, unfreezing, the feature cache.

``keras.applications`` backbones (:mod:`.backbones`) start from ImageNet, a file or nothing
(:mod:`.weights`); :mod:`.network` puts the thesis' head with its MC Dropout layers (:mod:`.layers`)
on top and splits the network at block boundaries; :mod:`.unfreeze` makes the last blocks
trainable; :mod:`.features` caches what the frozen part computes; :mod:`.saving` loads a saved model.

Names are imported lazily (PEP 562, through ``lazy_loader``): importing the package is cheap,
and TensorFlow is imported only by the modules that need it, when they are first used.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submodules=[
        'backbones',
        'detector',
        'explain',
        'features',
        'layers',
        'network',
        'saving',
        'selective',
        'unfreeze',
        'weights',
    ],
    submod_attrs={
        'backbones': [
            'Block', 'Backbone', 'list_backbones', 'get_backbone', 'check_image_size', 'BlockSpan', 'layer_graph',
            'cut_points', 'block_spans',
        ],
        'detector': [
            'compact', 'profile_distance', 'fit_references', 'karyogram_features', 'encoder_slot_features',
            'Detector', 'build_slot_head', 'fit_detector', 'combine_slots', 'calibrate_decision', 'predict_passes',
            'save_detector', 'load_detector', 'predict_karyograms', 'write_slot_probabilities',
        ],
        'explain': ['slot_evidence', 'homolog_ratios', 'slot_reasons'],
        'features': [
            'image_digest', 'model_fingerprint', 'cache_key', 'read_entry', 'entry_bytes', 'cached_features',
            'default_cache_dir',
        ],
        'layers': ['MCDropout', 'Preprocess'],
        'network': [
            'build_head', 'build_model', 'model_backbone_name', 'backbone_blocks', 'part', 'n_blocks_arg',
            'split_model', 'build_backbone',
        ],
        'saving': ['load_model'],
        'selective': [
            'rate_ratio', 'biotune_configuration', 'first_trained_block', 'train_blocks', 'scaled_optimizer',
            'fixed_recipe',
        ],
        'unfreeze': ['sublayers', 'unfreeze_blocks', 'trainable_layer_names'],
        'weights': [
            'keras_cache_dir', 'imagenet_weights_path', 'fetch_imagenet_weights', 'resolve_weights',
            'weights_identity', 'load_backbone_weights',
        ],
    },
)
