"""Task losses: the focal loss for binary, multi-label and multi-class classification."""

from ._focal import FocalLoss, focal_loss

__all__ = ["FocalLoss", "focal_loss"]
