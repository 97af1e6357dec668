"""Loading pretrained weights moved up to :mod:`volumefusion.weights` (it reads checkpoints, and networks
sit below the checkpoint format); the old names import from here for one release, with a warning."""

from volumefusion.deprecated import moved

__getattr__ = moved(__name__, {
    **dict.fromkeys(("LoadReport", "adapt_input_conv", "state_dict_differences", "load_exactly", "load_pretrained",
                     "model_from_misfm", "model_from_checkpoint"), "volumefusion.weights"),
    **dict.fromkeys(("BUILTIN", "builtin_weights", "resolve_weights", "export_weights"), "volumefusion.checkpoint"),
    **dict.fromkeys(("MISFM_PREFIXES", "misfm_num_classes", "misfm_resolution_mode", "misfm_shifted_windows",
                     "model_config_from_misfm"), "volumefusion.nets.misfm"),
})
