"""Networks: magnitude-preserving primitives, the EDM2 U-Net and the EDM preconditioner."""

from .mp import MPConv, MPFourier, cosine_attention, mp_cat, mp_silu, mp_sum, normalize, pixel_norm, resample
from .precond import PRECISIONS, Precond
from .unet import Block, UNet

__all__ = [
    "Block", "MPConv", "MPFourier", "PRECISIONS", "Precond", "UNet", "cosine_attention",
    "mp_cat", "mp_silu", "mp_sum", "normalize", "pixel_norm", "resample",
]
