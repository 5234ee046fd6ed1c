"""Which model a name means: ``default`` (the shipped one), a registered name (the ``models``
table), or a checkpoint path (:func:`resolve_model`); registering and listing models, and the
quality scores each carries."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import torch
from sqlalchemy import select
from sqlalchemy.engine import Engine

from pipeline import db as D
from pipeline import quality as Q
from pipeline.model.checkpoints import _check_torch_file, file_sha256, load_model, read_checkpoint
from pipeline.model.inference import LoadedModel, pick_device
from pipeline.model.spec import LabelledOutputs, ModelError, ModelSpec
from pipeline.resources import resource


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
    _check_torch_file(path)  # a folder, a FIFO or no torch file: one line, before it is hashed or read
    return path, name, registered


def model_spec(engine: Engine | None, ref: str = "default") -> ModelSpec:
    """The inference spec of ``ref`` (what it reads: size, geometry mode...), without building it."""
    return read_checkpoint(locate(engine, ref)[0]).spec


def verified(engine: Engine | None, ref: str = "default") -> tuple[Path, str, str]:
    """:func:`locate`'s file and name for ``ref``, and the file's sha256: refused when a
    registered model's file is no longer the one it was registered with."""
    path, name, registered = locate(engine, ref)
    sha = file_sha256(path)
    if registered is not None and sha != registered:
        raise ModelError(f"model {ref!r}: {path} has sha256 {sha}, but was registered with {registered}: "
                         "the file changed after it was registered; train it again, or name the file "
                         "by its path if you trust it")
    return path, name, sha


def resolve_model(engine: Engine | None, ref: str = "default", device: str = "auto") -> LoadedModel:
    """``default`` (the shipped model), a name in the ``models`` table, or a checkpoint path."""
    path, name, sha = verified(engine, ref)
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


_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,79}")


def check_model_name(name: str) -> str:
    """``name`` when it is a plain model name (letters, digits, ``_ . -``, up to 80, no path
    separator, no ``@`` (kept versions are ``NAME@SHA12``), not ending ``.pt``, which `label
    --model` would read as a checkpoint file); a :class:`ModelError` saying why otherwise."""
    if not _PLAIN_NAME.fullmatch(name or "") or name.endswith(".pt") or name in (".", ".."):
        raise ModelError(f"model name {name!r}: use a plain name of letters, digits, '_', '.' and '-' (up to 80, "
                         "not ending .pt), e.g. clinic_a_v2; it names the model in the database and its folder "
                         "under runs/")
    return name


def register_model(engine: Engine, name: str, checkpoint: str | Path, preset: str, config: dict,
                   dice: dict[str, float], data_hash: str, metrics: dict | None = None) -> None:
    """Row in ``models`` (replacing one of the same name) for a trained checkpoint."""
    check_model_name(name)
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
           "sha256": None, "path": str(path), "created_at": None,
           "trained_on": "(missing: reinstall)"}
    if not path.exists():
        return row
    ck = read_checkpoint(path)
    dice = {k: v for k, v in (ck.info.get("dice") or {}).items() if _finite(v) is not None}
    cv = resource("models", "default", "cross_validation.json")
    if not dice and cv.exists():  # trained on every film: its held-out Dice is the recipe's, cross-validated
        dice = json.loads(cv.read_text())["dice"]
    return {**row, "preset": ck.training.get("preset"), "dice_heart": _finite(dice.get("heart")),
            "dice_left_lung": _finite(dice.get("left_lung")), "dice_right_lung": _finite(dice.get("right_lung")),
            "sha256": file_sha256(path), "created_at": ck.info.get("trained"),
            "trained_on": ", ".join(f"{k} {v}" for k, v in (ck.info.get("images") or {}).items()) + " (shipped"
            + ("; Dice: its recipe's 5-fold CV)" if not ck.info.get("dice") or cv.exists() and
               dice == json.loads(cv.read_text())["dice"] else ")")}


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
                        "auroc_worst_dice": held.get("auroc_worst_tenth_dice"),
                        "auroc_worst_ctr": held.get("auroc_worst_tenth_ctr")})
    return out
