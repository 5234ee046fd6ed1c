"""What inference needs to rebuild and feed a network (:class:`ModelSpec`), and the network it builds."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline import CxrlabelError, one_of
from pipeline.imaging import FIXUPS, MODES, NORMS
from pipeline.masks import CARDIOMEDIASTINUM, STRUCTURES
from pipeline.networks import NETWORKS, create_network


class ModelError(CxrlabelError):
    pass


MIN_SIZE, MAX_SIZE = 32, 2048  # pixels a side of a model's input (the shipped one reads 256)

MAX_WIDTH = 2048  # channels of a layer (the widest preset, the paper's unet7, reaches 2048; the shipped one 256)

HEART_DEFINITIONS = ("heart", CARDIOMEDIASTINUM)


@dataclass(frozen=True)
class ModelSpec:
    """How to rebuild a trained network and feed it.

    Input: the cached ``(size, size) uint8`` image (``mode`` geometry) normalised by ``norm``
    to ``(1, size, size) float32``; output: ``(len(structures), size, size)`` logits.
    """

    network: str
    args: dict = field(default_factory=dict)
    size: int = 256
    mode: str = "pad"
    roi: int | None = None  # training crop side; sliding-window inference when < size
    norm: str = "zscore"
    structures: tuple[str, ...] = STRUCTURES
    # what the `heart` output is: the heart alone, or (checkpoints from before 2026-12-05,
    # trained on GeneralBlockchain alone) its cardiomediastinum
    heart_definition: str = CARDIOMEDIASTINUM
    # the film fix-ups labelling applies before the model (imaging.FIXUPS, in that order);
    # a checkpoint from before they were recorded expects them all, as labelling then did
    fixups: tuple[str, ...] = FIXUPS

    @property
    def labelled(self) -> tuple[str, ...]:
        """The outputs labelling stores (:data:`pipeline.masks.STRUCTURES`); the others (a
        cardiomediastinum learned beside the heart) only helped training."""
        return tuple(s for s in self.structures if s in STRUCTURES)

    def __post_init__(self) -> None:
        try:
            one_of(self.network, NETWORKS, "network")
            one_of(self.norm, NORMS, "norm")
            one_of(self.mode, MODES, "mode")
        except ValueError as e:
            raise ModelError(f"model spec: {e}") from None
        object.__setattr__(self, "structures", tuple(self.structures))
        object.__setattr__(self, "fixups", tuple(self.fixups))
        if [f for f in FIXUPS if f in self.fixups] != list(self.fixups):
            raise ModelError(f"model spec: fixups {list(self.fixups)}: some of {', '.join(FIXUPS)}, in that order")
        self._check_bounds()

    def _check_bounds(self) -> None:
        """Sizes and layer widths a chest-film network can have, checked before anything is
        allocated (a spec asking for 4096-channel layers took 5 GB before failing; a size of 0
        or 200,000 reached OpenCV)."""
        for name, value, lo, hi in (("size", self.size, MIN_SIZE, MAX_SIZE), ("roi", self.roi, MIN_SIZE, MAX_SIZE)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi):
                raise ModelError(f"model spec: {name} {value!r}: a whole number of pixels from {lo} to {hi}")
        if not isinstance(self.args, dict):
            raise ModelError(f"model spec: args must be a table of the network's settings, not {self.args!r}")
        for key in ("channels", "filters", "features"):
            widths = self.args.get(key)
            if widths is None:
                continue
            if not isinstance(widths, list | tuple) or not all(
                    isinstance(w, int) and not isinstance(w, bool) and 1 <= w <= MAX_WIDTH for w in widths):
                raise ModelError(f"model spec: {key} {widths!r}: layer widths are whole numbers from 1 to {MAX_WIDTH}")
        if not self.structures or not all(isinstance(s, str) for s in self.structures):
            raise ModelError(f"model spec: structures {list(self.structures)!r}: the names of its outputs")
        if self.heart_definition not in HEART_DEFINITIONS:
            raise ModelError(f"model spec: heart_definition {self.heart_definition!r}: one of "
                             f"{', '.join(HEART_DEFINITIONS)}")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        """The spec from a dict that may carry other keys (a training configuration)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class PadToMultiple(torch.nn.Module):
    """Pads the input to a multiple of ``k`` (reflect) and crops the output back."""

    def __init__(self, net: torch.nn.Module, k: int) -> None:
        super().__init__()
        self.net, self.k = net, k

    def forward(self, x: torch.Tensor):
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.k, (-w) % self.k
        if ph or pw:
            x = torch.nn.functional.pad(x, (0, pw, 0, ph), mode="reflect")
        out = self.net(x)
        if isinstance(out, tuple):
            return (out[0][..., :h, :w],) + tuple(out[1:])
        return out[..., :h, :w]


class LabelledOutputs(torch.nn.Module):
    """A trained network's outputs that labelling stores (``keep``: channel indices), the
    auxiliary ones dropped."""

    def __init__(self, net: torch.nn.Module, keep: Sequence[int]) -> None:
        super().__init__()
        self.net, self.keep = net, list(keep)

    def forward(self, x: torch.Tensor):
        out = self.net(x)
        if isinstance(out, tuple):
            return (out[0][:, self.keep],) + tuple(out[1:])
        return out[:, self.keep]


def build_network(spec: ModelSpec) -> torch.nn.Module:
    """The untrained network of ``spec``, taking any input side (padded to its stride)."""
    args = dict(spec.args)
    if spec.network == "segresnetvae":
        args.setdefault("input_image_size", (spec.roi or spec.size,) * 2)
    net = create_network(spec.network, out_channels=len(spec.structures), **args)
    depth = len(args.get("channels", args.get("filters")) or (0,) * 5) - 1
    return PadToMultiple(net, max(32, 2 ** depth))
