"""Checkpoints as plain data (format ``cxrlabel-2``; ``cxrlabel-1`` still read): read, written,
exported for inference, upgraded; a file's sha256."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from sqlalchemy.engine import Engine

from pipeline import db as D
from pipeline import quality as Q
from pipeline.model.spec import ModelError, ModelSpec, build_network

FORMAT = "cxrlabel-2"

READABLE_FORMATS = ("cxrlabel-1", FORMAT)


@dataclass
class Checkpoint:
    spec: ModelSpec
    state_dict: dict[str, torch.Tensor]
    info: dict = field(default_factory=dict)  # validation Dice, epoch, data hash...
    training: dict = field(default_factory=dict)  # the training configuration, for the record
    format: str = FORMAT


def read_checkpoint(path: str | Path) -> Checkpoint:
    """A checkpoint file as data (never unpickles code); ``cxrlabel-1`` files converted."""
    _check_torch_file(path)
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


def _check_torch_file(path: str | Path) -> None:
    """Refuse, with one line naming it, what cannot be a checkpoint before torch reads it: a
    folder (``label --model runs``), a FIFO or device, a file that is no torch file (neither
    torch's zip nor its older pickle: ``/etc/passwd`` gave "list index out of range")."""
    from pipeline.regular import open_regular
    p = Path(path)
    if p.is_dir():
        raise ModelError(f"{path} is a folder: name a checkpoint file in it (e.g. {p / 'best.pt'}) or a registered "
                         "model (`cxrlabel models list`)")
    if not p.exists():
        return  # torch.load's FileNotFoundError says it below
    with open_regular(p, ModelError, only="a checkpoint is a file") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise ModelError(f"{path}: not a cxrlabel checkpoint (not a torch file); name a checkpoint (.pt) or a "
                         "registered model (`cxrlabel models list`)")


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
    if not isinstance(ck.state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in ck.state_dict.values()):
        raise ModelError(f"{path}: its weights are not a table of tensors: re-export it from its training run")
    with torch.device("meta"):  # shapes only: no weights drawn at random to be replaced (0.3 s at 256 px)
        net = build_network(ck.spec)
    expected = net.state_dict()
    for key, value in ck.state_dict.items():
        if key in expected and expected[key].is_floating_point() and (
                not value.is_floating_point() or not bool(torch.isfinite(value).all())):
            raise ModelError(f"{path}: weight {key} is {'not finite' if value.is_floating_point() else value.dtype}: "
                             "a damaged or hand-made checkpoint; train or re-export it")
    # the network's own copies (the checkpoint's tensors stay the parent's when it is trained on)
    weights = {k: v.to(torch.float32, copy=True) if v.is_floating_point() else v.clone()
               for k, v in ck.state_dict.items()}
    try:
        net.load_state_dict(weights, assign=True)
        if any(t.is_meta for t in (*net.parameters(), *net.buffers())):  # a buffer no checkpoint holds
            net = build_network(ck.spec)
            net.load_state_dict(weights)
    except RuntimeError as e:
        raise ModelError(f"{path}: weights do not fit its {ck.spec.network} spec "
                         f"({str(e).splitlines()[0]})") from e
    return net.to(device).eval(), ck


def export_checkpoint(src: str | Path, dst: str | Path, half: bool = True) -> str:
    """A checkpoint for shipping (fp16 weights by default, current format); the new sha256.
    Its fitted quality scores (``<src>.quality*.json``), if any, go along."""
    from pipeline.regular import check_output_file
    ck = read_checkpoint(src)
    check_output_file(dst, read_checkpoint, ModelError, "checkpoint")  # a new file, or one of ours to replace
    for tta in (False, True):  # and its scores beside it, where the source has them
        if Q.sidecar(src, tta).exists():
            check_output_file(Q.sidecar(dst, tta), lambda p: Q.QualityModel.from_json(json.loads(p.read_text())),
                              ModelError, "score file")
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
