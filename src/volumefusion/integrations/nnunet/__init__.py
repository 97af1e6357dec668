"""nnU-Net v2 integration (extra ``volumefusion[nnunet]``: nnunetv2, dynamic-network-architectures).

- ``model.name: nnunet`` builds the network of an nnU-Net plans file for Volume Fusion pretraining
  (:func:`volumefusion.nets.nnunet.build_plans_network`; the networks live in ``nets/`` beside the
  others, which :func:`~volumefusion.nets.build_model` builds).
- :class:`PCTNetForNNUNet` (from :mod:`volumefusion.nets.nnunet`) is PCT-Net as nnU-Net constructs
  networks from a plans file; nnU-Net finds it by the dotted path written into exported plans,
  ``volumefusion.integrations.nnunet.PCTNetForNNUNet``.
- :func:`export_nnunet` turns a volumefusion checkpoint into weights for nnU-Net's
  ``-pretrained_weights`` and a plans variant that reproduces the pretraining
  (``volumefusion export nnunet``).

nnU-Net is imported only inside the functions that need it: PCTNetForNNUNet and the plans handling
work without it.
"""

from volumefusion.integrations.nnunet.export import ExportResult, export_nnunet
from volumefusion.nets.nnunet import PCTNetForNNUNet, build_plans_network, pctnet_strides

__all__ = ["ExportResult", "PCTNetForNNUNet", "build_plans_network", "export_nnunet", "pctnet_strides"]
