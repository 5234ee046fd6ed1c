"""A moving average of a model's weights (what ``ema`` > 0 validates and saves)."""

from __future__ import annotations

import copy

import torch

from pipeline.train.config import TrainError


class WeightAverage:
    """Exponential moving average of a model's weights, updated after each optimiser step.

    The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` steps, so the first
    epochs' random weights fade quickly. Integer buffers are copied, not averaged.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise TrainError(f"ema decay {decay} must lie between 0 and 1 (e.g. 0.99), or be 0 for off")
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.steps = decay, 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for mean, now in zip(self.module.state_dict().values(), model.state_dict().values(),
                             strict=True):
            if mean.is_floating_point():
                mean.lerp_(now, 1 - d)
            else:
                mean.copy_(now)

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.steps = state["steps"]
