"""Segmentation with uncertainty-aware losses (UU-Mamba, issue 19): a synthetic cardiac MRI generator with
ACDC's classes, a pure-PyTorch Mamba block with a parallel selective scan, a U-Net baseline and U-Mamba-Enc,
and the uncertainty-weighted Dice + CE + focal loss with its reference defects fixed."""

from seg.losses import LOSS_TERMS, DeepSupervisionLoss, UncertaintyLoss, deep_supervision_weights, dice_loss, focal_loss
from seg.mamba import Mamba, MambaLayer, selective_scan, selective_scan_ref
from seg.models import SEG_MODELS, UMambaEnc, UNet, build_seg_model
from seg.synthetic import CLASSES, DOMAINS, make_slice, make_slices, make_split

__all__ = [
    "CLASSES",
    "DOMAINS",
    "LOSS_TERMS",
    "SEG_MODELS",
    "DeepSupervisionLoss",
    "Mamba",
    "MambaLayer",
    "UMambaEnc",
    "UNet",
    "UncertaintyLoss",
    "build_seg_model",
    "deep_supervision_weights",
    "dice_loss",
    "focal_loss",
    "make_slice",
    "make_slices",
    "make_split",
    "selective_scan",
    "selective_scan_ref",
]
