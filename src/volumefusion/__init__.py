"""volumefusion: Volume Fusion self-supervised pretraining of PCT-Net for 3D CT segmentation."""

__version__ = "0.1.0"


class VolumeFusionError(Exception):
    """An error caused by the user's input or configuration; the CLI prints it as one line, no traceback."""
