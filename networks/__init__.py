"""Networks: the reference EDM2 U-Net, the U-ViT, their magnitude-preserving primitives, the EDM preconditioner and
ScaleLong skip scaling. Nothing here is about speed: the speed layer (accel/) is applied from outside."""

from .mp import CosineAttention, Dropout, MPConv, MPFourier, mp_cat, mp_silu, mp_sum, normalize, pixel_norm, resample
from .precond import PRECISIONS, Precond
from .skip_scaling import SKIP_SCALING_MODES, SEGate, SkipScaling, SkipScalingSettings, TokenGate
from .unet import Block, UNet
from .uvit import UViT

__all__ = [
    "SKIP_SCALING_MODES", "SEGate", "SkipScaling", "SkipScalingSettings", "TokenGate", "UViT",
    "Block", "CosineAttention", "Dropout", "MPConv", "MPFourier", "PRECISIONS", "Precond", "UNet",
    "mp_cat", "mp_silu", "mp_sum", "normalize", "pixel_norm", "resample",
]
