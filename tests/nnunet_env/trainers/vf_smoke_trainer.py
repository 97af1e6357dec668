"""A trainer for the test that runs ``nnUNetv2_train``: one epoch of two iterations and one validation
iteration, at learning rate 0, so the final checkpoint must hold exactly the pretrained weights the
command loaded (every parameter; BatchNorm running statistics move in any training step); no mirroring,
which makes nnU-Net's closing validation (a sliding-window prediction of the held-out case) one pass."""

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

CUDA = torch.device("cuda")  # nnU-Net's default device


class nnUNetTrainer_VFSmoke(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict, device: torch.device = CUDA):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1
        self.initial_lr = 0.0

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch_size, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, initial_patch_size, None
