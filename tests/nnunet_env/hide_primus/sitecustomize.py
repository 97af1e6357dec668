"""Hides nnU-Net's Primus trainer module (it imports timm, and timm a torchvision that cannot load here);
see ../README.md. Python imports this file at start-up when its folder is on PYTHONPATH."""

import sys

PRIMUS = "nnunetv2.training.nnUNetTrainer.primus.primus_trainers"


class HidePrimus:
    """A meta-path finder that answers for one module only: not there."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == PRIMUS:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, HidePrimus)
