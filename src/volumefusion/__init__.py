"""volumefusion: Volume Fusion self-supervised pretraining of PCT-Net for 3D CT segmentation.

The Python API (:mod:`volumefusion.api`) is importable from here: ``import volumefusion as vf;
vf.predict_array(...)``. It loads on first use, so the command line starts without PyTorch.
"""

__version__ = "0.1.0"


class VolumeFusionError(Exception):
    """An error caused by the user's input or configuration; the CLI prints it as one line, no traceback."""


def __getattr__(name: str):
    import importlib
    import importlib.util

    # A submodule is imported, never looked up in the API: `from volumefusion import nets` inside the
    # library must not import the API (and with it most of the library) half-way through its own import.
    if name.startswith("_") or importlib.util.find_spec(f"{__name__}.{name}") is not None:
        raise AttributeError(f"module 'volumefusion' has no attribute {name!r}")
    api = importlib.import_module("volumefusion.api")
    if name in api.__all__:
        return getattr(api, name)
    raise AttributeError(f"module 'volumefusion' has no attribute {name!r}")


def __dir__() -> list[str]:
    import importlib

    return sorted([*globals(), *importlib.import_module("volumefusion.api").__all__])
