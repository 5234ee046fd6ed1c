"""Running a model: the device, :class:`LoadedModel`, each film's input (its fix-ups and
normalisation), :func:`infer` on a batch, and the batch size a GPU holds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch

from pipeline import quality as Q
from pipeline.imaging import fixed_up, model_input
from pipeline.model.spec import ModelError, ModelSpec


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` (CUDA when visible, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ModelError(f"--device {device!r}: use auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"--device {device}: no CUDA GPU visible; use --device auto or cpu")
    return torch.device(device)


def predict(model: torch.nn.Module, x: torch.Tensor, roi: int | None = None) -> torch.Tensor:
    """``(B, 1, S, S)`` normalised input -> ``(B, C, S, S)`` sigmoid probabilities; a
    sliding window of ``roi`` when smaller than ``S``."""
    model.eval()
    with torch.inference_mode():
        if roi and roi < x.shape[-1]:
            from monai.inferers import SlidingWindowInferer
            inferer = SlidingWindowInferer((roi, roi), sw_batch_size=8, overlap=0.25, mode="gaussian")
            logits = cast(torch.Tensor, inferer(x, lambda t: logits_of(model(t))))
        else:
            logits = logits_of(model(x))
        return torch.sigmoid(logits)


def logits_of(out: torch.Tensor | tuple) -> torch.Tensor:
    """The segmentation logits of a network's output (SegResNetVAE adds its VAE loss)."""
    return out[0] if isinstance(out, tuple) else out


@dataclass
class LoadedModel:
    """A model ready to label: its name for the database, file, hash, network and spec."""

    name: str
    path: Path
    sha256: str
    module: torch.nn.Module
    spec: ModelSpec
    device: torch.device
    # trained on chests framed whole only: labelling draws a film cut short again from further
    # out (pipeline.label.reframe). A model trained with `--shifts` saw such films (a field of
    # view cut short by up to 1.4x) and draws them better itself (bench/RESULTS.md).
    framed_whole: bool = True
    scores: Q.Scores | None = None  # its quality scores and where each came from (`cxrlabel quality show`)

    @property
    def quality(self) -> Q.QualityModel | None:
        """The fitted quality score (estimated Dice), when there is one."""
        return self.scores.plain if self.scores else None

    @property
    def quality_tta(self) -> Q.QualityModel | None:
        """The one that also reads test-time augmentation (``label --tta``), when there is one."""
        return self.scores.tta if self.scores else None


def model_inputs(images: Sequence[np.ndarray], spec: ModelSpec,
                 rims: Sequence[tuple[int, int, int, int] | None] | None = None) -> np.ndarray:
    """Cached ``(S, S) uint8`` images -> ``(B, 1, S, S)`` float32 model input: each through
    the film fix-ups the model's spec names (``spec.fixups``, :func:`imaging.fixed_up`: turned
    the right way round, a collimator's rim filled, strong noise smoothed) and its own
    normalisation (``spec.norm``): CPU work a labelling loop does off the model's path.
    ``rims``: each image's :func:`imaging.collimation_rim`, from a caller that has turned the
    images upright and read their rims already (the labelling loop's
    :func:`pipeline.label.load_batch`), so neither is done twice."""
    if rims is None:
        return np.stack([model_input(fixed_up(img, spec.fixups), spec.norm) for img in images])
    return np.stack([model_input(fixed_up(img, spec.fixups, rim, turned=True), spec.norm)
                     for img, rim in zip(images, rims, strict=True)])


def infer(lm: LoadedModel, images: Sequence[np.ndarray], quantise: bool = False,
          inputs: np.ndarray | None = None) -> np.ndarray:
    """Cached ``(S, S) uint8`` images -> ``(B, C, S, S)`` probabilities (CPU numpy): float32,
    or with ``quantise`` uint8 ``round(255 p)``, computed on the device before the copy.

    Each image gets the model's own input normalisation (or pass ``inputs``, from
    :func:`model_inputs`, made elsewhere); CUDA runs in mixed precision.
    """
    x = torch.from_numpy(inputs if inputs is not None else model_inputs(images, lm.spec))
    if lm.device.type == "cuda":
        x = x.pin_memory()  # lets the copy overlap with the previous batch's kernels
    x = x.to(lm.device, non_blocking=True)
    if lm.device.type == "cpu":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", enabled=lm.device.type == "cuda"):
        probs = predict(lm.module, x, lm.spec.roi)
    # row-major (B, C, S, S) whatever layout the model ran in (channels-last on a CPU):
    # post-processing reads each channel's plane, several times slower when strided
    if quantise:
        return (probs.float() * 255).round_().to(torch.uint8).contiguous().cpu().numpy()
    return probs.float().contiguous().cpu().numpy()


def auto_batch_size(lm: LoadedModel) -> int:
    """CPU: 16 (batching buys little there). CUDA: the largest power of two, up to 256,
    whose forward pass fits in half of the free memory."""
    if lm.device.type != "cuda":
        return 16
    free, _ = torch.cuda.mem_get_info(lm.device)
    batch = 256
    while batch > 1:
        try:
            torch.cuda.reset_peak_memory_stats(lm.device)
            with torch.inference_mode(), torch.autocast("cuda"):
                lm.module(torch.zeros(batch, 1, lm.spec.size, lm.spec.size, device=lm.device))
            if torch.cuda.max_memory_allocated(lm.device) < free * 0.5:
                return batch
        except torch.cuda.OutOfMemoryError:
            pass
        torch.cuda.empty_cache()
        batch //= 2
    return 1
