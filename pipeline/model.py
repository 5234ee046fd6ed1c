"""Models for inference: the spec, the network, checkpoints, prediction, devices, the registry.

Everything that runs a trained model imports this module, and only this one: labelling,
evaluation, benches and distributed workers never import the training code (the trainer
imports this, never the reverse).

* :class:`ModelSpec` is what inference needs to rebuild and feed a network: the registered
  network and its arguments, the cache side and geometry mode, the training crop (sliding
  window when smaller than the image), the input normalisation and the output structures.
* A checkpoint (format ``cxrlabel-2``) is plain data, read with ``torch.load(weights_only=True)``
  so that loading one never runs code::

      {"format": "cxrlabel-2", "spec": {...}, "state_dict": {name: tensor},
       "training": {the training configuration}, "info": {"dice": ..., "epoch": ..., ...}}

  Format ``cxrlabel-1`` (one ``config`` dict holding both) still loads; ``cxrlabel models
  upgrade`` rewrites such a file.
* A model is named ``default`` (the shipped one), by its row in the ``models`` table, or by a
  checkpoint path (:func:`resolve_model`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from monai.utils import look_up_option
from sqlalchemy import select
from sqlalchemy.engine import Engine

from pipeline import CxrlabelError
from pipeline import db as D
from pipeline import quality as Q
from pipeline.imaging import FIXUPS, MODES, NORMS, fixed_up, model_input
from pipeline.masks import CARDIOMEDIASTINUM, STRUCTURES
from pipeline.networks import NETWORKS, create_network
from pipeline.resources import resource

log = logging.getLogger(__name__)

FORMAT = "cxrlabel-2"
READABLE_FORMATS = ("cxrlabel-1", FORMAT)


class ModelError(CxrlabelError):
    pass


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
            look_up_option(self.network, NETWORKS)
            look_up_option(self.norm, NORMS)
            look_up_option(self.mode, MODES)
        except ValueError as e:
            raise ModelError(f"model spec: {e}") from None
        object.__setattr__(self, "structures", tuple(self.structures))
        object.__setattr__(self, "fixups", tuple(self.fixups))
        if [f for f in FIXUPS if f in self.fixups] != list(self.fixups):
            raise ModelError(f"model spec: fixups {list(self.fixups)}: some of {', '.join(FIXUPS)}, in that order")

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


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` (CUDA when visible, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ModelError(f"--device {device!r}: use auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"--device {device}: no CUDA GPU visible; use --device auto or cpu")
    return torch.device(device)


# ---------------------------------------------------------------- checkpoints


@dataclass
class Checkpoint:
    spec: ModelSpec
    state_dict: dict[str, torch.Tensor]
    info: dict = field(default_factory=dict)  # validation Dice, epoch, data hash...
    training: dict = field(default_factory=dict)  # the training configuration, for the record
    format: str = FORMAT


def read_checkpoint(path: str | Path) -> Checkpoint:
    """A checkpoint file as data (never unpickles code); ``cxrlabel-1`` files converted."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"checkpoint {path} not found") from None
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{path}: not a readable cxrlabel checkpoint ({first}); "
                         "train one with `cxrlabel train`") from e
    fmt = raw.get("format") if isinstance(raw, dict) else None
    if fmt not in READABLE_FORMATS:
        raise ModelError(f"{path}: not a cxrlabel checkpoint (train one with `cxrlabel train`)")
    try:
        if fmt == "cxrlabel-1":
            config = dict(raw["config"])
            config.setdefault("norm", "zscore")  # before norm was a setting, input was z-scored
            return Checkpoint(ModelSpec.from_dict(config), raw["state_dict"], raw.get("info", {}),
                              config, fmt)
        return Checkpoint(ModelSpec.from_dict(raw["spec"]), raw["state_dict"], raw.get("info", {}),
                          raw.get("training", {}), fmt)
    except (KeyError, TypeError) as e:
        raise ModelError(f"{path}: checkpoint lacks {e}: re-export it from its training run") from e


def write_checkpoint(path: str | Path, ck: Checkpoint) -> str:
    """Write ``ck`` atomically in the current format; returns the file's sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, "spec": ck.spec.as_dict(), "state_dict": ck.state_dict,
                "training": ck.training, "info": ck.info}, tmp)
    tmp.replace(path)
    return file_sha256(path)


def save_checkpoint(path: str | Path, model: torch.nn.Module, spec: ModelSpec, info: dict,
                    training: dict | None = None, half: bool = False) -> str:
    """A trained ``model``'s weights (fp16 with ``half``) with its spec; returns the sha256."""
    weights = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu()
               for k, v in model.state_dict().items()}
    return write_checkpoint(path, Checkpoint(spec, weights, info, training or {}))


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Checkpoint]:
    """The network of a checkpoint in eval mode with float32 weights, and the checkpoint."""
    ck = read_checkpoint(path)
    net = build_network(ck.spec)
    try:
        net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ck.state_dict.items()})
    except RuntimeError as e:
        raise ModelError(f"{path}: weights do not fit its {ck.spec.network} spec "
                         f"({str(e).splitlines()[0]})") from e
    return net.to(device).eval(), ck


def export_checkpoint(src: str | Path, dst: str | Path, half: bool = True) -> str:
    """A checkpoint for shipping (fp16 weights by default, current format); the new sha256.
    Its fitted quality scores (``<src>.quality*.json``), if any, go along."""
    ck = read_checkpoint(src)
    ck.state_dict = {k: (v.half() if half else v.float()) if v.is_floating_point() else v
                     for k, v in ck.state_dict.items()}
    sha = write_checkpoint(dst, ck)
    for tta in (False, True):
        if Q.sidecar(src, tta).exists():
            shutil.copyfile(Q.sidecar(src, tta), Q.sidecar(dst, tta))
    return sha


def upgrade_checkpoint(src: str | Path, dst: str | Path | None = None,
                       engine: Engine | None = None) -> tuple[str, str]:
    """Rewrite a checkpoint in the current format, weights untouched (in place without
    ``dst``); returns ``(format it had, new sha256)``. With ``engine``, registered models
    that named this very file (same path and hash) are re-hashed."""
    before = file_sha256(src)
    ck = read_checkpoint(src)
    sha = write_checkpoint(dst or src, ck)
    if engine is not None and dst is None:
        m = D.models
        with engine.begin() as conn:
            conn.execute(m.update().where(m.c.path == str(Path(src).resolve()), m.c.sha256 == before)
                         .values(sha256=sha))
    return ck.format, sha


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- prediction


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


# ---------------------------------------------------------------- naming and the registry


def default_model_path() -> Path:
    return resource("models", "default", "model.pt")


def locate(engine: Engine | None, ref: str = "default") -> tuple[Path, str, str | None]:
    """Where ``ref`` (``default``, a registered name or a checkpoint path) lies: its file, its
    name for the database, and the sha256 a registered model's file must still have."""
    registered = None
    if ref == "default":
        path, name = default_model_path(), "default"
    elif Path(ref).suffix == ".pt" or Path(ref).exists():
        path = Path(ref)
        name = path.parent.name if path.stem in ("best", "model") else path.stem
    else:
        (path, registered), name = registered_path(engine, ref), ref
    if not path.exists():
        raise ModelError(f"checkpoint {path} not found" + (
            " (the shipped default lives in models/default/; reinstall or run `make train`)"
            if ref == "default" else ""))
    return path, name, registered


def model_spec(engine: Engine | None, ref: str = "default") -> ModelSpec:
    """The inference spec of ``ref`` (what it reads: size, geometry mode...), without building it."""
    return read_checkpoint(locate(engine, ref)[0]).spec


def resolve_model(engine: Engine | None, ref: str = "default", device: str = "auto") -> LoadedModel:
    """``default`` (the shipped model), a name in the ``models`` table, or a checkpoint path."""
    path, name, registered = locate(engine, ref)
    sha = file_sha256(path)
    if registered is not None and sha != registered:
        raise ModelError(f"model {ref!r}: {path} has sha256 {sha}, but was registered with {registered}: "
                         "the file changed after it was registered; train it again, or name the file "
                         "by its path if you trust it")
    dev = pick_device(device)
    module, ck = load_model(path, dev)
    if dev.type == "cpu":
        module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stubs lack it
    spec = ck.spec
    if spec.labelled != spec.structures:  # auxiliary outputs (a cardiomediastinum) are not labelled
        module = LabelledOutputs(module, [spec.structures.index(s) for s in spec.labelled]).eval()
        spec = dataclasses.replace(spec, structures=spec.labelled)
    scores = Q.scores_for(engine, path, sha, spec.structures, ck.training)
    return LoadedModel(name, path, sha, module, spec, dev, framed_whole=not Q.recipe_of(ck.training)["shifts"],
                       scores=scores)


def registered_path(engine: Engine | None, name: str) -> tuple[Path, str]:
    """The checkpoint file of a registered model and the sha256 it was registered with."""
    row = None
    if engine is not None:
        with engine.connect() as conn:
            row = conn.execute(select(D.models.c.path, D.models.c.sha256).where(D.models.c.name == name)).first()
    if row is None:
        raise ModelError(f"model {name!r} is neither 'default', a registered model nor a "
                         "checkpoint file: see `cxrlabel models list`")
    return Path(row.path), row.sha256


def register_model(engine: Engine, name: str, checkpoint: str | Path, preset: str, config: dict,
                   dice: dict[str, float], data_hash: str, metrics: dict | None = None) -> None:
    """Row in ``models`` (replacing one of the same name) for a trained checkpoint."""
    row = {"name": name, "preset": preset, "config": json.dumps(config),
           "data_hash": data_hash, "path": str(Path(checkpoint).resolve()),
           "sha256": file_sha256(checkpoint),
           "dice_heart": _finite(dice.get("heart")), "dice_left_lung": _finite(dice.get("left_lung")),
           "dice_right_lung": _finite(dice.get("right_lung")),
           "metrics": json.dumps(metrics or {}), "created_at": D.utcnow()}
    with engine.begin() as conn:
        D.upsert(conn, D.models, [row], ["name"])


def list_models(engine: Engine) -> list[dict]:
    """The shipped ``default`` model, then the registered models by name, with their
    validation Dice (none for a model trained on every image) and the images each trained on
    per mask source (``manual 80, reviewed 6, accepted 14``; ``train --masks``)."""
    m = D.models
    out = [_shipped_row()]
    with engine.connect() as conn:
        for r in conn.execute(select(m.c.name, m.c.preset, m.c.dice_heart, m.c.dice_left_lung,
                                     m.c.dice_right_lung, m.c.metrics, m.c.sha256, m.c.path, m.c.created_at)
                              .order_by(m.c.name)):
            row = dict(r._mapping)
            try:
                images = json.loads(row.pop("metrics") or "{}").get("training_images") or {}
            except (ValueError, AttributeError):
                images = {}
            out.append({**row, "trained_on": ", ".join(f"{k} {v}" for k, v in images.items())})
    return out


def _shipped_row() -> dict:
    """``list_models``' row of the shipped default model (what `label` uses unless told)."""
    path = default_model_path()
    row = {"name": "default", "preset": None, "dice_heart": None, "dice_left_lung": None, "dice_right_lung": None,
           "sha256": None, "path": str(path), "created_at": None, "trained_on": "(missing: reinstall)"}
    if not path.exists():
        return row
    ck = read_checkpoint(path)
    dice = ck.info.get("dice") or {}
    return {**row, "preset": ck.training.get("preset"), "dice_heart": _finite(dice.get("heart")),
            "dice_left_lung": _finite(dice.get("left_lung")), "dice_right_lung": _finite(dice.get("right_lung")),
            "sha256": file_sha256(path), "created_at": ck.info.get("trained"),
            "trained_on": ", ".join(f"{k} {v}" for k, v in (ck.info.get("images") or {}).items()) + " (shipped)"}


def _finite(v: float | None) -> float | None:
    return None if v is None or not np.isfinite(v) else float(v)


def model_scores(engine: Engine, name: str | None = None) -> list[dict]:
    """Per model (``name``, or the shipped default and every registered one): which quality
    score it labels with, where that came from, what it was fitted on and its held-out
    figures (``cxrlabel quality show``)."""
    with engine.connect() as conn:
        names = [name] if name else ["default", *conn.execute(select(D.models.c.name).order_by(D.models.c.name))
                                     .scalars()]
    out = []
    for n in names:
        try:  # the checkpoint's spec and training are enough: the network is never built
            path, _, _ = locate(engine, n)
            ck = read_checkpoint(path)
        except ModelError as e:
            if name:
                raise
            out.append({"model": n, "score": None, "from": f"cannot load: {e}"})
            continue
        scores = Q.scores_for(engine, path, file_sha256(path), ck.spec.labelled, ck.training)
        for kind, score, origin in (("plain", scores.plain, scores.plain_from),
                                    ("tta", scores.tta, scores.tta_from)):
            if score is None and kind == "tta":
                continue
            info = score.info if score is not None else {}
            held = info.get("held_out", {})
            out.append({"model": n, "score": kind if score is not None else "heuristic", "from": origin,
                        "fitted_on": info.get("fitted_on") or info.get("cv_run"), "fitted": info.get("fitted"),
                        "spearman": held.get("spearman"), "mae": held.get("mae"),
                        "auroc_worst_ctr": held.get("auroc_worst_tenth_ctr")})
    return out
