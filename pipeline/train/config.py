"""Training configuration: presets (``models/presets.toml``) and command-line overrides."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from typing import Any

from pipeline import CxrlabelError, one_of
from pipeline.masks import STRUCTURES, TRAINED
from pipeline.model import ModelError, ModelSpec
from pipeline.resources import resource


class TrainError(CxrlabelError):
    pass


# where training masks come from: a person's annotation; a model's masks a reviewer corrected
# (the corrections, with the model's other structures as the reviewer left them); a model's
# masks a reviewer accepted as they were. Validation always uses manual masks only.
MASK_SOURCES = ("manual", "reviewed", "accepted")


def presets() -> dict[str, dict]:
    """Every preset of ``models/presets.toml`` by name."""
    with open(resource("models", "presets.toml"), "rb") as f:
        return tomllib.load(f)


@dataclass(frozen=True)
class TrainConfig:
    """A training run: the model to build (:meth:`spec`) and how to train it."""

    preset: str
    network: str
    args: dict
    # what the model is, as inference reads it: ModelSpec's defaults (written there, once)
    size: int = ModelSpec.size
    mode: str = ModelSpec.mode
    roi: int | None = ModelSpec.roi
    epochs: int = 60
    batch: int = 8
    lr: float = 3e-3
    loss: str = "dicece"
    width_loss: float = 0.0  # weight of the column-occupancy term (train.losses.width_loss); 0 = off
    ema: float = 0.0  # weight-average decay per optimiser step; 0 = off
    norm: str = ModelSpec.norm  # model input: see imaging.model_input
    seed: int = 0
    val_frac: float = 0.2
    folds: int = 1  # >1: K-fold cross-validation
    fold: int = 0
    augment: bool = True
    shifts: bool = False  # equipment-like shifts in augmentation (see train.data.augmentation)
    widen: float = 0.0  # probability of widening the heart in augmentation (train.enlarge); 0 = off
    widen_range: tuple[float, float] = (1.05, 1.35)  # heart width factors drawn uniformly (< 1 narrows)
    widen_ctr: tuple[float, float] | None = None  # instead: the CTR to widen (or narrow) to, drawn uniformly
    masks: tuple[str, ...] = ("manual",)  # which masks train: manual, reviewed, accepted (see MASK_SOURCES)
    sources: tuple[str, ...] = ()  # only the annotated films of these images.source values; () = every source
    review_model: str = "default"  # whose reviewed masks `reviewed`/`accepted` take
    threads: int | None = None
    # the outputs: the labelled structures and, where a source draws it, the cardiomediastinum
    # (each image supervises only what its source defines; see train.data and train.losses)
    structures: tuple[str, ...] = TRAINED
    # adaptation (`train --from`, pipeline.train.adapt): the parent checkpoint's sha256 the run
    # starts from, and how strongly each step pulls the weights back toward the parent's
    # (decoupled, as AdamW's decay pulls toward zero); None and 0 for a model trained from scratch
    parent: str | None = None
    pull: float = 0.0

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> TrainConfig:
        """A preset with the ``overrides`` that are not None (command-line options)."""
        table = presets()
        try:
            p = one_of(name, table, "preset")
        except ValueError as e:
            raise TrainError(str(e)) from None
        # a setting neither the preset nor the command line gives takes TrainConfig's default
        values = {k: v for k, v in p.items() if k not in ("network", "args")}
        values.update({k: v for k, v in overrides.items() if v is not None})
        values["masks"] = tuple(values.get("masks", default("masks")))
        values["sources"] = tuple(values.get("sources", default("sources")))
        values["widen_range"] = tuple(values.get("widen_range", default("widen_range")))
        lo, hi = values["widen_range"]
        if not 0.5 <= lo <= hi <= 2.0:
            raise TrainError(f"--widen-range {lo},{hi}: two factors between 0.5 and 2, the smaller first")
        if values.get("widen_ctr") is not None:
            values["widen_ctr"] = tuple(values["widen_ctr"])
            lo, hi = values["widen_ctr"]
            if not 0.25 <= lo <= hi <= 0.85:
                raise TrainError(f"--widen-ctr {lo},{hi}: two CTRs between 0.25 and 0.85, the smaller first")
        unknown = [m for m in values["masks"] if m not in MASK_SOURCES]
        if unknown or "manual" not in values["masks"]:
            raise TrainError(f"--masks {','.join(values['masks'])}: a comma-separated list of "
                             f"{', '.join(MASK_SOURCES)} that includes manual (validation uses it)")
        values["structures"] = tuple(values.get("structures", default("structures")))
        odd = [s for s in values["structures"] if s not in TRAINED]
        if odd or not any(s in STRUCTURES for s in values["structures"]) or \
                len(set(values["structures"])) < len(values["structures"]):
            raise TrainError(f"--structures {','.join(values['structures'])}: a comma-separated list of "
                             f"{', '.join(TRAINED)}, each once, with at least one of {', '.join(STRUCTURES)}")
        cfg = cls(preset=name, network=p["network"], args=dict(p.get("args", {})), **values)
        try:
            cfg.spec()
        except ModelError as e:
            raise TrainError(f"preset {name}: {e}") from None
        return cfg

    def spec(self) -> ModelSpec:
        """What inference needs of this run: stored in its checkpoints. Its `heart` is the
        heart alone (the annotated sources' `heart`; a cardiomediastinum has its own name)."""
        return ModelSpec.from_dict({**self.as_dict(), "heart_definition": "heart"})

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """The configuration :meth:`as_dict` wrote (a checkpoint's ``training``, read back from
        JSON-like storage): its lists are tuples again, and settings an older checkpoint lacks
        take their defaults; keys this version does not know are left out."""
        known = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known}
        return cls(**values)


def default(name: str) -> Any:
    """:class:`TrainConfig`'s default for setting ``name``: written once, there (the command
    line's help and the presets read it)."""
    return {f.name: f.default for f in dataclasses.fields(TrainConfig)}[name]
