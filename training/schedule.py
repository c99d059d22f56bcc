"""Learning-rate schedule: inverse square-root decay with a linear ramp-up (Eq. 67, docs/design.md §5)."""

from __future__ import annotations

import math


def learning_rate_schedule(
    cur_nimg: float,  # images seen so far
    batch_size: int,  # total batch size in images
    ref_lr: float = 100e-4,  # learning rate before decay
    ref_batches: float = 70e3,  # t_ref: decay starts after this many batches; 0 = no decay
    rampup_img: float = 10_000_000,  # linear ramp-up over this many images (10e6, powers of ten); 0 = none
) -> float:
    """lr(t) = ref_lr / sqrt(max(t / (t_ref * batch), 1)) * min(t / rampup, 1)."""
    if batch_size <= 0:
        raise ValueError(f"learning_rate_schedule: batch_size must be positive, got {batch_size!r}")
    if cur_nimg < 0:
        raise ValueError(f"learning_rate_schedule: cur_nimg must be non-negative, got {cur_nimg!r}")
    lr = ref_lr
    if ref_batches > 0:
        lr /= math.sqrt(max(cur_nimg / (ref_batches * batch_size), 1))
    if rampup_img > 0:
        lr *= min(cur_nimg / rampup_img, 1)
    return lr
