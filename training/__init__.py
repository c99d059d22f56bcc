"""Training: the loss, the learning-rate schedule and (later) the loop, datasets and EMA."""

from .loss import EDM2Loss, reduce_batch_loss
from .schedule import learning_rate_schedule

__all__ = ["EDM2Loss", "learning_rate_schedule", "reduce_batch_loss"]
