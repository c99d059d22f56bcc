"""Networks: magnitude-preserving primitives, the EDM2 U-Net and the EDM preconditioner."""

from .batched_weights import effective_weights
from .mp import MPConv, MPFourier, cosine_attention, mp_cat, mp_silu, mp_sum, normalize, pixel_norm, resample
from .precond import PRECISIONS, Precond
from .skip_scaling import SKIP_SCALING_MODES, SEGate, SkipScaling, TokenGate
from .unet import Block, UNet
from .uvit import UViT

__all__ = [
    "SKIP_SCALING_MODES", "SEGate", "SkipScaling", "TokenGate", "UViT",
    "Block", "MPConv", "MPFourier", "PRECISIONS", "Precond", "UNet", "cosine_attention",
    "effective_weights", "mp_cat", "mp_silu", "mp_sum", "normalize", "pixel_norm", "resample",
]
