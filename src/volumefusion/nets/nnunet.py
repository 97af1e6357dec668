"""Networks across the nnU-Net boundary: nnU-Net's architectures built from a plans file for Volume
Fusion pretraining (``model.name: nnunet``), and PCT-Net in the form nnU-Net constructs from a plans file.

Here, beside the other networks, because :func:`~volumefusion.nets.build_model` builds them; nnU-Net
(the extra ``volumefusion[nnunet]``) is imported only inside :func:`build_plans_network`. nnU-Net finds
PCT-Net by the dotted path ``volumefusion.integrations.nnunet.PCTNetForNNUNet`` (a re-export).

nnU-Net builds a network as ``cls(input_channels=, num_classes=, deep_supervision=, **arch_kwargs)``
from the plans' ``architecture``, switches deep supervision through ``network.decoder.deep_supervision``,
computes one deep-supervision target scale per entry of ``arch_kwargs["strides"]`` but the last, and
leaves out of ``-pretrained_weights`` only the tensors whose keys contain ``.seg_layers.``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from volumefusion import VolumeFusionError
from volumefusion.config import ModelConfig
from volumefusion.nets.blocks import PreActConv, scale_factors
from volumefusion.nets.pctnet import PCTNet
from volumefusion.nnunet_plans import plans_configuration

NNUNET_EXTRA_HINT = "install the extra: pip install 'volumefusion[nnunet]'"


def pctnet_strides(resolution_mode: int) -> list[list[int]]:
    """nnU-Net ``strides`` (z, y, x per stage) matching PCT-Net's resolutions: full, 1/2, 1/4, 1/8, 1/16.

    nnU-Net derives its deep-supervision scales from their running products without the last one,
    which gives exactly PCT-Net's four outputs (full, 1/2, 1/4, 1/8; in-plane only where
    ``resolution_mode`` says so).
    """
    stem = [list(scale_factors(level < resolution_mode)) for level in range(2)]
    return [[1, 1, 1], *stem, [2, 2, 2], [2, 2, 2]]


class SegOutput(PreActConv):
    """An output :class:`PreActConv` whose class-dependent convolution is registered as ``seg_layers``
    (nnU-Net's name, which its weight loading skips); norm and activation keep their names."""

    def __init__(self, source: PreActConv):
        nn.Module.__init__(self)
        self.norm, self.act, self.drop = source.norm, source.act, source.drop
        self.seg_layers = source.conv

    @property
    def conv(self) -> nn.Module:
        return self.seg_layers


class PCTNetForNNUNet(PCTNet):
    """PCT-Net as nnU-Net builds it from a plans file (``network_class_name``
    ``volumefusion.integrations.nnunet.PCTNetForNNUNet``).

    Arguments: nnU-Net's ``input_channels``, ``num_classes``, ``deep_supervision``; ``strides`` (the
    plans' pooling, checked against :func:`pctnet_strides`, which nnU-Net reads for its
    deep-supervision scales); everything else is :class:`~volumefusion.nets.PCTNet`'s.

    Its state-dict keys are PCT-Net's with ``.conv.`` of the four output convolutions renamed
    ``.seg_layers.`` (``renamed_prefixes``: (PCT-Net's, ours) pairs); ``decoder`` is the network itself, so
    ``network.decoder.deep_supervision`` switches the outputs [full, 1/2, 1/4, 1/8] as nnU-Net expects.
    """

    def __init__(self, input_channels: int, num_classes: int, deep_supervision: bool = True,
                 strides: Sequence[Sequence[int]] | None = None, **pctnet_kwargs):
        super().__init__(in_channels=input_channels, num_classes=num_classes, deep_supervision=deep_supervision,
                         **pctnet_kwargs)
        expected = pctnet_strides(self.resolution_mode)
        if strides is not None and [list(s) for s in strides] != expected:
            raise ValueError(f"strides {[list(s) for s in strides]} do not match PCT-Net's down-sampling with "
                             f"resolution_mode {self.resolution_mode}: {expected} (nnU-Net's deep-supervision "
                             "scales come from them)")
        for owner, name in ((self.head, "out_conv0"), (self.head, "out_conv1"), (self.pyramid, "out_conv2"),
                            (self.pyramid, "out_conv3")):
            setattr(owner, name, SegOutput(getattr(owner, name)))
        self.renamed_prefixes: tuple[tuple[str, str], ...] = tuple(
            (p, p.removesuffix(".conv.") + ".seg_layers.") for p in self.head_prefixes)
        self.head_prefixes = tuple(theirs for _, theirs in self.renamed_prefixes)

    @property
    def decoder(self) -> PCTNetForNNUNet:
        """nnU-Net sets ``network.decoder.deep_supervision``; here that is the network's own switch."""
        return self


def plans_network_kwargs(arch: dict) -> tuple[str, dict, list[str]]:
    """(class name, keyword arguments, names to import) of a plans configuration's ``architecture``."""
    try:
        return arch["network_class_name"], dict(arch["arch_kwargs"]), list(arch.get("_kw_requires_import", []))
    except (KeyError, TypeError) as exc:
        raise VolumeFusionError(f"the plans' architecture lacks {exc}; plan the dataset with nnU-Net v2") from None


def build_plans_network(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The network that configuration ``cfg.configuration`` of the plans file ``cfg.plans`` describes,
    built by nnU-Net's own ``get_network_from_plans`` (its initialisation included) with
    ``cfg.in_channels`` inputs, ``num_classes`` outputs and ``cfg.deep_supervision``.

    The network gets the attributes volumefusion's networks have: ``size_divisor`` (product of the
    plans' strides per axis), ``head_prefixes`` (its segmentation layers) and ``encoder_prefixes``.
    """
    try:
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    except ImportError:
        raise VolumeFusionError(f"model.name nnunet needs nnU-Net v2; {NNUNET_EXTRA_HINT}") from None
    configuration = plans_configuration(cfg.plans, cfg.configuration)
    class_name, kwargs, imports = plans_network_kwargs(configuration["architecture"])
    network = get_network_from_plans(class_name, kwargs, imports, cfg.in_channels, num_classes,
                                     allow_init=True, deep_supervision=cfg.deep_supervision)
    if not isinstance(network, PCTNet):
        strides = [[s] * 3 if isinstance(s, int) else s for s in kwargs.get("strides") or []]
        network.size_divisor = tuple(math.prod(s[axis] for s in strides) for axis in range(3))
        network.head_prefixes = ("decoder.seg_layers.",)
        network.encoder_prefixes = ("encoder.",)
    return network
