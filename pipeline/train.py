"""Stage 3: train a registered network on cached images and manual masks.

Data: every image with manual masks (``masks.kind='manual'``), cached at the preset's size
(collected on the fly), masks mapped into cache geometry. Output channels are independent
sigmoids for ``STRUCTURES``; an image missing a structure's mask is left out of that
channel's loss and Dice. With ``ema`` > 0 the model that is validated and saved is an
exponential moving average of the trained weights. Checkpoints: ``RUN_DIR/last.pt`` every
epoch (resume point) and ``RUN_DIR/best.pt`` (best mean validation Dice), registered in the
``models`` table.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import random
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sqlalchemy import select
from sqlalchemy.engine import Engine
from tqdm import tqdm

from pipeline import CxrlabelError
from pipeline import db as D
from pipeline.collect import Settings, collect, load_cached
from pipeline.imaging import NORMS, model_input
from pipeline.masks import STRUCTURES, load_masks
from pipeline.networks import create_network, look_up

log = logging.getLogger(__name__)

PRESETS_FILE = Path(__file__).resolve().parent.parent / "models" / "presets.toml"
TRAIN_DEFAULTS: dict[str, Any] = {"size": 256, "mode": "pad", "roi": None, "epochs": 60,
                                  "batch": 8, "lr": 3e-3, "loss": "dicece", "ema": 0.0,
                                  "norm": "zscore"}


class TrainError(CxrlabelError):
    pass


def presets() -> dict[str, dict]:
    with open(PRESETS_FILE, "rb") as f:
        return tomllib.load(f)


@dataclass
class TrainConfig:
    preset: str
    network: str
    args: dict
    size: int = 256
    mode: str = "pad"
    roi: int | None = None
    epochs: int = 60
    batch: int = 8
    lr: float = 3e-3
    loss: str = "dicece"
    ema: float = 0.0  # weight-average decay per optimiser step; 0 = off
    norm: str = "zscore"  # model input: see imaging.model_input
    seed: int = 0
    val_frac: float = 0.2
    folds: int = 1  # >1: K-fold cross-validation
    fold: int = 0
    augment: bool = True
    threads: int | None = None
    structures: tuple[str, ...] = STRUCTURES

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> TrainConfig:
        table = presets()
        try:
            p = table[look_up(name, table, "preset")]
        except ValueError as e:
            raise TrainError(f"{e} (presets live in {PRESETS_FILE})") from e
        values = {**TRAIN_DEFAULTS, **{k: v for k, v in p.items() if k not in ("network", "args")}}
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values["norm"] not in NORMS:
            raise TrainError(f"preset {name}: unknown norm {values['norm']!r}: use one of {', '.join(NORMS)}")
        return cls(preset=name, network=p["network"], args=dict(p.get("args", {})), **values)

    def settings(self) -> Settings:
        return Settings(self.size, self.mode)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


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


def build_model(cfg: TrainConfig) -> torch.nn.Module:
    args = dict(cfg.args)
    if cfg.network == "segresnetvae":
        args.setdefault("input_image_size", (cfg.roi or cfg.size,) * 2)
    net = create_network(cfg.network, out_channels=len(cfg.structures), **args)
    depth = len(args.get("channels", args.get("filters", (0,) * 5))) - 1
    return PadToMultiple(net, max(32, 2 ** depth))


# ---------------------------------------------------------------- data


@dataclass
class Dataset:
    uids: list[str]
    images: np.ndarray  # (N, S, S) uint8, cache convention
    masks: np.ndarray  # (N, C, S, S) float32 in [0, 1], cache geometry
    valid: np.ndarray  # (N, C) bool: structure annotated
    geoms: list = field(default_factory=list)
    hash: str = ""


def annotated_uids(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return sorted(conn.execute(select(D.masks.c.uid).where(D.masks.c.kind == "manual")
                                   .distinct()).scalars())


def load_dataset(engine: Engine, cfg: TrainConfig, cache_dir: str | None = None,
                 progress: bool = True) -> Dataset:
    uids = annotated_uids(engine)
    if not uids:
        raise TrainError("no manual masks in the database: run `cxrlabel masks import "
                         "generalblockchain ../shared/data/generalblockchain` first")
    with engine.connect() as conn:
        paths = dict(conn.execute(select(D.images.c.uid, D.images.c.path)
                                  .where(D.images.c.uid.in_(uids))).all())
    settings = cfg.settings()
    collect(engine, [(u, paths.get(u)) for u in uids], settings, cache_dir, progress=progress)
    with engine.connect() as conn:
        cached = load_cached(conn, settings, uids)
        truth = load_masks(conn, uids)
    uids = [u for u in uids if u in cached]
    n, c, s = len(uids), len(cfg.structures), cfg.size
    images = np.zeros((n, s, s), np.uint8)
    masks = np.zeros((n, c, s, s), np.float32)
    valid = np.zeros((n, c), bool)
    digest = hashlib.sha256()
    for i, uid in enumerate(uids):
        img, geom = cached[uid]
        images[i] = img
        for j, structure in enumerate(cfg.structures):
            m = truth.get(uid, {}).get(structure)
            if m is not None:
                masks[i, j] = geom.to_cache(m.astype(np.float32))
                valid[i, j] = True
                digest.update(f"{uid}/{structure}/{int(m.sum())}".encode())
        digest.update(img.tobytes())
    return Dataset(uids, images, masks, valid, [cached[u][1] for u in uids], digest.hexdigest())


def split(n: int, cfg: TrainConfig) -> tuple[list[int], list[int]]:
    """Train/validation indices: a seeded permutation cut into folds or one held-out share."""
    order = list(range(n))
    random.Random(cfg.seed).shuffle(order)
    if cfg.folds > 1:
        val = sorted(order[cfg.fold::cfg.folds])
    elif cfg.val_frac > 0:
        val = sorted(order[: max(1, round(n * cfg.val_frac))])
    else:
        val = []
    held = set(val)
    return [i for i in range(n) if i not in held], val


def augmentation(cfg: TrainConfig):
    """Chest-X-ray-safe augmentation (MONAI): small affine, contrast, gamma, blur, noise,
    resolution and exposure; never a left-right flip (the heart's side matters)."""
    from monai import transforms as T
    keys = ["image", "mask"]
    steps = [
        T.RandAffined(keys, prob=0.8, rotate_range=0.17, scale_range=0.15, shear_range=0.05,
                      translate_range=(0.06 * cfg.size,) * 2, mode=("bilinear", "bilinear"),
                      padding_mode="zeros"),
        T.RandSimulateLowResolutiond(["image"], prob=0.25, zoom_range=(0.4, 0.9),
                                     downsample_mode="area", upsample_mode="bilinear"),
        T.RandAdjustContrastd(["image"], prob=0.5, gamma=(0.6, 1.6)),
        T.RandScaleIntensityd(["image"], factors=0.25, prob=0.5),
        T.RandShiftIntensityd(["image"], offsets=0.1, prob=0.5),
        T.RandGaussianSmoothd(["image"], prob=0.2, sigma_x=(0.3, 1.5), sigma_y=(0.3, 1.5)),
        T.RandGaussianNoised(["image"], prob=0.3, std=0.03),
    ]
    if cfg.roi and cfg.roi < cfg.size:
        steps.append(T.RandSpatialCropd(keys, roi_size=(cfg.roi, cfg.roi), random_size=False))
    compose = T.Compose(steps)
    compose.set_random_state(seed=cfg.seed)
    return compose


def _batch(ds: Dataset, idx: list[int], aug, norm: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for i in idx:
        img = ds.images[i][None].astype(np.float32) / 255.0
        mask = ds.masks[i]
        if aug is not None:
            out = aug({"image": img, "mask": mask})
            img, mask = np.asarray(out["image"]), np.asarray(out["mask"])
        xs.append(model_input(np.clip(img[0] * 255.0, 0, 255), norm))
        ys.append(mask)
    return (torch.from_numpy(np.stack(xs)).float(), torch.from_numpy(np.stack(ys)).float(),
            torch.from_numpy(ds.valid[idx]))


def seg_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
             kind: str = "dicece") -> torch.Tensor:
    """Soft Dice (+ BCE for ``dicece``) per image and channel, over annotated channels only."""
    prob = torch.sigmoid(logits)
    dims = (2, 3)
    inter = (prob * target).sum(dims)
    dice = 1 - (2 * inter + 1) / (prob.sum(dims) + target.sum(dims) + 1)
    w = valid.float()
    loss = (dice * w).sum() / w.sum().clamp(min=1)
    if kind == "dicece":
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
        loss = loss + (bce.mean(dims) * w).sum() / w.sum().clamp(min=1)
    elif kind != "dice":
        raise TrainError(f"unknown loss {kind!r}: use 'dice' or 'dicece'")
    return loss


def hard_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean arrays; 1.0 when both are empty."""
    inter = np.logical_and(pred, truth).sum()
    total = pred.sum() + truth.sum()
    return 1.0 if total == 0 else float(2 * inter / total)


def predict(model: torch.nn.Module, x: torch.Tensor, roi: int | None = None) -> torch.Tensor:
    """Sigmoid probabilities ``(B, C, S, S)``; sliding window when ``roi`` < S."""
    model.eval()
    with torch.inference_mode():
        if roi and roi < x.shape[-1]:
            from monai.inferers import SlidingWindowInferer
            inferer = SlidingWindowInferer((roi, roi), sw_batch_size=8, overlap=0.25, mode="gaussian")
            logits = inferer(x, lambda t: _logits(model(t)))
        else:
            logits = _logits(model(x))
        return torch.sigmoid(logits)


def _logits(out):
    return out[0] if isinstance(out, tuple) else out


def validate(model: torch.nn.Module, ds: Dataset, idx: list[int], cfg: TrainConfig) -> dict[str, float]:
    """Mean Dice per structure at cache resolution over annotated validation images."""
    scores: dict[str, list[float]] = {s: [] for s in cfg.structures}
    for start in range(0, len(idx), 16):
        chunk = idx[start:start + 16]
        x, y, valid = _batch(ds, chunk, None, cfg.norm)
        prob = predict(model, x, cfg.roi).numpy()
        for k in range(len(chunk)):
            for j, s in enumerate(cfg.structures):
                if valid[k, j]:
                    scores[s].append(hard_dice(prob[k, j] > 0.5, y[k, j].numpy() > 0.5))
    return {s: float(np.mean(v)) if v else float("nan") for s, v in scores.items()}


# ---------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    run_dir: Path
    best_epoch: int
    dice: dict[str, float]
    history: list[dict]
    seconds: float


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


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(engine: Engine, cfg: TrainConfig, run_dir: Path, cache_dir: str | None = None,
          device: str = "auto", resume: bool = True, progress: bool = True,
          dataset: Dataset | None = None, until_epoch: int | None = None) -> TrainResult:
    """Train one model (one fold when ``cfg.folds > 1``); resumes from ``run_dir/last.pt``.

    ``until_epoch`` stops early after that epoch (a time-boxed job); a later call resumes.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    torch.use_deterministic_algorithms(dev.type == "cpu", warn_only=True)
    ds = dataset or load_dataset(engine, cfg, cache_dir, progress)
    tr, va = split(len(ds.uids), cfg)
    _seed_all(cfg.seed)
    model = build_model(cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    steps_per_epoch = max(1, len(tr) // cfg.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, epochs=cfg.epochs,
                                                steps_per_epoch=steps_per_epoch, pct_start=0.1)
    aug = augmentation(cfg) if cfg.augment else None
    avg = WeightAverage(model, cfg.ema) if cfg.ema else None
    scored = avg.module if avg else model  # what is validated and saved
    rng = random.Random(cfg.seed + 1)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {"epoch": 0, "history": [], "best": -1.0, "best_epoch": 0, "seconds": 0.0}
    last = run_dir / "last.pt"
    if resume and last.exists():
        ck = torch.load(last, map_location=dev, weights_only=False)
        if ck["config"] != cfg.as_dict():
            raise TrainError(f"{last} was trained with another configuration: use a new run "
                             "folder or --no-resume to start over")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if avg:
            avg.module.load_state_dict(ck["ema"]["model"])
            avg.steps = ck["ema"]["steps"]
        state = ck["state"]
        rng.setstate(ck["rng"]["python"])
        torch.set_rng_state(ck["rng"]["torch"])
        aug = ck["rng"]["aug"]  # the pipeline itself: MONAI keeps nested random states
        log.info("resuming %s at epoch %d", run_dir, state["epoch"])
    bar = tqdm(range(state["epoch"], cfg.epochs), desc=f"train {cfg.preset}", unit="epoch",
               disable=not progress, initial=state["epoch"], total=cfg.epochs)
    for epoch in bar:
        if until_epoch is not None and epoch >= until_epoch:
            break
        t0 = time.perf_counter()
        model.train()
        order = tr[:]
        rng.shuffle(order)
        losses = []
        for b in range(steps_per_epoch):
            x, y, valid = _batch(ds, order[b * cfg.batch:(b + 1) * cfg.batch], aug, cfg.norm)
            x, y, valid = x.to(dev), y.to(dev), valid.to(dev)
            out = model(x)
            loss = seg_loss(_logits(out), y, valid, cfg.loss)
            if isinstance(out, tuple):  # SegResNetVAE: add its VAE loss term
                loss = loss + 0.1 * out[1]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if avg:
                avg.update(model)
            losses.append(loss.item())
        dice = validate(scored, ds, va, cfg) if va else {}
        # without held-out images the final epoch is the model (the schedule has annealed)
        mean = float(np.nanmean(list(dice.values()))) if dice else float(epoch)
        state["seconds"] += time.perf_counter() - t0
        state["history"].append({"epoch": epoch + 1, "loss": float(np.mean(losses)), **dice})
        state["epoch"] = epoch + 1
        if mean > state["best"]:
            state["best"], state["best_epoch"] = mean, epoch + 1
            save_checkpoint(run_dir / "best.pt", scored, cfg, {"dice": dice, "epoch": epoch + 1,
                                                             "data_hash": ds.hash})
        bar.set_postfix(loss=f"{np.mean(losses):.3f}", **{k[:5]: f"{v:.3f}" for k, v in dice.items()})
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "state": state, "config": cfg.as_dict(),
                    "ema": avg and {"model": avg.module.state_dict(), "steps": avg.steps},
                    "rng": {"python": rng.getstate(), "torch": torch.get_rng_state(),
                            "aug": aug}}, last)
    best = state["history"][state["best_epoch"] - 1] if state["history"] else {}
    plot_curve(state["history"], run_dir / "learning_curve.png", cfg)
    return TrainResult(run_dir, state["best_epoch"],
                       {s: best.get(s, float("nan")) for s in cfg.structures},
                       state["history"], state["seconds"])


def summarise_folds(results: list[TrainResult]) -> dict[str, dict[str, float]]:
    """Mean and sample sd of the best-epoch Dice per structure over folds."""
    out = {}
    for s in results[0].dice:
        v = np.array([r.dice[s] for r in results], dtype=float)
        scored = v[~np.isnan(v)]  # NaN: a run without held-out images
        out[s] = {"mean": float(scored.mean()) if len(scored) else float("nan"),
                  "sd": float(scored.std(ddof=1)) if len(scored) > 1 else 0.0,
                  "folds": [float(x) for x in v]}
    return out


def save_checkpoint(path: Path, model: torch.nn.Module, cfg: TrainConfig, info: dict,
                    half: bool = False) -> str:
    """Write a self-describing checkpoint; returns its sha256."""
    weights = {k: (v.half() if half and v.is_floating_point() else v).cpu()
               for k, v in model.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    torch.save({"format": "cxrlabel-1", "config": cfg.as_dict(), "state_dict": weights,
                "info": info}, tmp)
    tmp.replace(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, TrainConfig, dict]:
    """Model (eval mode, float32), its config and info from :func:`save_checkpoint` output."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as e:
        raise TrainError(f"{path}: not a readable checkpoint ({e})") from e
    if not isinstance(ck, dict) or ck.get("format") != "cxrlabel-1":
        raise TrainError(f"{path}: not a cxrlabel checkpoint (train one with `cxrlabel train`)")
    cfg_dict = dict(ck["config"])
    cfg_dict["structures"] = tuple(cfg_dict["structures"])
    cfg = TrainConfig(**cfg_dict)
    model = build_model(cfg)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v
                           for k, v in ck["state_dict"].items()})
    return model.to(device).eval(), cfg, ck.get("info", {})


def export_checkpoint(src: Path, dst: Path, half: bool = True) -> str:
    """Copy a checkpoint for shipping (fp16 weights by default); returns the new sha256."""
    model, cfg, info = load_checkpoint(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(dst, model, cfg, info, half=half)


def plot_curve(history: list[dict], path: Path, cfg: TrainConfig) -> None:
    """Loss and per-structure validation Dice per epoch (the paper's Fig. 6 layout)."""
    if not history:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(epochs, [h["loss"] for h in history])
    a.set(title="training loss", xlabel="epoch")
    scored = [s for s in cfg.structures if s in history[0] and history[0][s] == history[0][s]]
    for s in scored:
        b.plot(epochs, [h[s] for h in history], label=s)
    b.set(title="validation Dice" if scored else "validation Dice: no held-out images",
          xlabel="epoch", ylim=(0, 1))
    if scored:
        b.legend(loc="lower right")
    fig.suptitle(f"{cfg.preset} ({cfg.network}, {cfg.size}px)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def register_model(engine: Engine, name: str, checkpoint: Path, cfg: TrainConfig,
                   dice: dict[str, float], data_hash: str, metrics: dict | None = None) -> None:
    """Row in ``models`` (replacing one of the same name)."""
    sha = hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()
    row = {"name": name, "preset": cfg.preset, "config": json.dumps(cfg.as_dict()),
           "data_hash": data_hash, "path": str(Path(checkpoint).resolve()), "sha256": sha,
           "dice_heart": _finite(dice.get("heart")), "dice_left_lung": _finite(dice.get("left_lung")),
           "dice_right_lung": _finite(dice.get("right_lung")),
           "metrics": json.dumps(metrics or {}), "created_at": D.utcnow()}
    with engine.begin() as conn:
        D.upsert(conn, D.models, [row], ["name"])


def _finite(v: float | None) -> float | None:
    return None if v is None or not np.isfinite(v) else float(v)
