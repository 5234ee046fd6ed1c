"""Training losses (torch): soft Dice, DiceCE and pixel BCE over the annotated channels only,
and a width term on each structure's horizontal extent (what the CTR measures)."""

from __future__ import annotations

import torch

from pipeline.train.config import TrainError

LOSSES = ("dicece", "dice", "ce")


def seg_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
             kind: str = "dicece", width: float = 0.0) -> torch.Tensor:
    """Soft Dice (``dice``), soft Dice + BCE (``dicece``) or BCE alone (``ce``) per image and
    channel, averaged over the channels whose structure is annotated (``valid`` ``(B, C)``
    bool); ``logits``, ``target`` ``(B, C, H, W)``. With ``width`` > 0, plus that times
    :func:`width_loss`. BCE alone has no volume bias where the border is uncertain: its
    probabilities cross 0.5 where the border is as likely in as out, which soft Dice's need
    not (Bertels et al. 2019)."""
    if kind not in LOSSES:
        raise TrainError(f"unknown loss {kind!r}: use one of {', '.join(LOSSES)}")
    dims = (2, 3)
    w = valid.float()
    loss = logits.new_zeros(())
    if kind in ("dice", "dicece"):
        prob = torch.sigmoid(logits)
        inter = (prob * target).sum(dims)
        dice = 1 - (2 * inter + 1) / (prob.sum(dims) + target.sum(dims) + 1)
        loss = loss + (dice * w).sum() / w.sum().clamp(min=1)
    if kind in ("dicece", "ce"):
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
        loss = loss + (bce.mean(dims) * w).sum() / w.sum().clamp(min=1)
    if width:
        loss = loss + width * width_loss(logits, target, valid)
    return loss


def width_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """BCE of each column's occupancy: whether a structure reaches the column (the most
    confident pixel of the column) against whether its mask does, per image and annotated
    channel. The widths behind the CTR are decided by the few columns at a structure's
    left and right ends, which Dice and pixel BCE barely weigh (a heart drawn 5% too narrow
    loses about 2% Dice); here every column counts alike, so a border drawn short or a
    stray blob beside the heart costs as much as the columns it gets wrong."""
    reach = logits.amax(dim=2)  # (B, C, W): the most confident pixel of each column
    truth = target.amax(dim=2)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(reach, truth, reduction="none").mean(2)
    w = valid.float()
    return (bce * w).sum() / w.sum().clamp(min=1)
