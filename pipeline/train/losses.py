"""Training losses (torch): soft Dice and DiceCE over the annotated channels only."""

from __future__ import annotations

import torch

from pipeline.train.config import TrainError

LOSSES = ("dicece", "dice")


def seg_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
             kind: str = "dicece") -> torch.Tensor:
    """Soft Dice (+ BCE for ``dicece``) per image and channel, averaged over the channels
    whose structure is annotated (``valid`` ``(B, C)`` bool); ``logits``, ``target`` ``(B, C, H, W)``."""
    if kind not in LOSSES:
        raise TrainError(f"unknown loss {kind!r}: use one of {', '.join(LOSSES)}")
    prob = torch.sigmoid(logits)
    dims = (2, 3)
    inter = (prob * target).sum(dims)
    dice = 1 - (2 * inter + 1) / (prob.sum(dims) + target.sum(dims) + 1)
    w = valid.float()
    loss = (dice * w).sum() / w.sum().clamp(min=1)
    if kind == "dicece":
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
        loss = loss + (bce.mean(dims) * w).sum() / w.sum().clamp(min=1)
    return loss
