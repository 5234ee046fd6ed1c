"""Training losses (torch): soft Dice, DiceCE and pixel BCE over the annotated channels only,
and a width term on each structure's horizontal extent (what the CTR measures).

Partial labels: a channel counts only for the images whose source defines it (``valid``), and
within a lung channel a pixel its source also drew as heart or cardiomediastinum counts for
nothing (:func:`overlap_weights`): GeneralBlockchain draws the left lung on behind the heart,
SCR does not, and averaging the two would teach half a lung there."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.masks import HEARTS, LUNGS
from pipeline.train.config import TrainError

LOSSES = ("dicece", "dice", "ce")


def overlap_weights(target: torch.Tensor, valid: torch.Tensor, structures: Sequence[str]) -> torch.Tensor | None:
    """``(B, C, H, W)`` pixel weights: 0 where a lung's target overlaps the same image's heart
    or cardiomediastinum target (as far as they are annotated), 1 elsewhere; None when the
    channels hold no lung and heart to overlap."""
    lungs = [j for j, s in enumerate(structures) if s in LUNGS]
    hearts = [j for j, s in enumerate(structures) if s in HEARTS]
    if not lungs or not hearts:
        return None
    cover = (target[:, hearts] * valid[:, hearts, None, None].to(target.dtype)).amax(dim=1)
    w = torch.ones_like(target)
    for j in lungs:
        w[:, j] = 1 - target[:, j] * cover
    return w


def seg_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
             kind: str = "dicece", width: float = 0.0, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Soft Dice (``dice``), soft Dice + BCE (``dicece``) or BCE alone (``ce``) per image and
    channel, averaged over the channels whose structure is annotated (``valid`` ``(B, C)``
    bool); ``logits``, ``target`` ``(B, C, H, W)``. With ``width`` > 0, plus that times
    :func:`width_loss`. BCE alone has no volume bias where the border is uncertain: its
    probabilities cross 0.5 where the border is as likely in as out, which soft Dice's need
    not (Bertels et al. 2019). ``weights`` ``(B, C, H, W)``: how much each pixel counts
    (:func:`overlap_weights`); every pixel alike without."""
    if kind not in LOSSES:
        raise TrainError(f"unknown loss {kind!r}: use one of {', '.join(LOSSES)}")
    dims = (2, 3)
    w = valid.float()
    loss = logits.new_zeros(())
    if kind in ("dice", "dicece"):
        prob = torch.sigmoid(logits)
        pw, tw = (prob, target) if weights is None else (prob * weights, target * weights)
        inter = (pw * target).sum(dims)
        dice = 1 - (2 * inter + 1) / (pw.sum(dims) + tw.sum(dims) + 1)
        loss = loss + (dice * w).sum() / w.sum().clamp(min=1)
    if kind in ("dicece", "ce"):
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
        per = bce.mean(dims) if weights is None else (bce * weights).sum(dims) / weights.sum(dims).clamp(min=1)
        loss = loss + (per * w).sum() / w.sum().clamp(min=1)
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
