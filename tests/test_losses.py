"""Dice + CE with deep supervision, and the hard per-class Dice used for validation."""

import math

import torch

from volumefusion.train.losses import DeepSupervisionLoss, dice_per_class, soft_targets


def _labels(seed=0, shape=(2, 8, 16, 16), k=5):
    return torch.randint(0, k, shape, generator=torch.Generator().manual_seed(seed))


def test_soft_targets_are_one_hot_at_full_size_and_shares_when_pooled():
    y = _labels()
    full = soft_targets(y, 5, (8, 16, 16))
    assert torch.equal(full.argmax(1), y) and torch.all(full.sum(1) == 1)
    coarse = soft_targets(y, 5, (4, 8, 8))
    assert torch.allclose(coarse.sum(1), torch.ones(2, 4, 8, 8))
    # a coarse voxel's share of class c equals the fraction of its 2x2x2 block labelled c
    block = y[0, :2, :2, :2]
    assert math.isclose(coarse[0, 3, 0, 0, 0].item(), (block == 3).float().mean().item(), abs_tol=1e-6)


def test_confident_correct_prediction_has_near_zero_loss_and_wrong_one_high():
    y = _labels()
    logits = 50 * torch.nn.functional.one_hot(y, 5).permute(0, 4, 1, 2, 3).float()
    loss_fn = DeepSupervisionLoss(5, deep_supervision=False)
    assert loss_fn(logits, y).item() < 1e-3
    assert loss_fn(logits.roll(1, dims=1), y).item() > 1.0


def test_deep_supervision_weights_halve_and_normalise():
    y = _labels()
    good = 50 * torch.nn.functional.one_hot(y, 5).permute(0, 4, 1, 2, 3).float()
    bad = torch.zeros(2, 5, 4, 8, 8)  # uniform prediction at 1/2 resolution
    loss_fn = DeepSupervisionLoss(5)
    single = DeepSupervisionLoss(5, deep_supervision=False)(bad, y)
    # weights 1 and 1/2 normalised: the coarse output contributes 1/3 of its own loss
    assert torch.isclose(loss_fn([good, bad], y), single / 3, atol=1e-3)


def test_dice_per_class_hard_and_nan_for_absent_classes():
    y = torch.tensor([[0, 0, 1, 1]])
    pred = torch.tensor([[0, 1, 1, 1]])
    d = dice_per_class(pred, y, 3)
    assert torch.isclose(d[0], torch.tensor(2 / 3)) and torch.isclose(d[1], torch.tensor(0.8))
    assert torch.isnan(d[2])
