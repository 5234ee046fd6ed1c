"""Training data: the annotated images at the model's cache size, their masks, augmentation."""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sqlalchemy import select
from sqlalchemy.engine import Engine

from pipeline import db as D
from pipeline.collect import Entry, Settings, decoder_pool, fetch
from pipeline.imaging import Geometry, model_input
from pipeline.masks import CARDIOMEDIASTINUM, heart_definition, load_masks
from pipeline.train.config import TrainConfig, TrainError

log = logging.getLogger(__name__)


@dataclass
class Dataset:
    uids: list[str]
    images: np.ndarray  # (N, S, S) uint8, cache convention
    masks: np.ndarray  # (N, C, S, S) float32 in [0, 1], cache geometry
    valid: np.ndarray  # (N, C) bool: structure annotated
    hash: str = ""
    sources: list[str] | None = None  # per image: manual, reviewed or accepted (None: all manual)
    geoms: list[Geometry] | None = None  # per image: its cache entry's geometry (where the film lies)
    patients: dict[str, str] | None = None  # uid: patient key (source and patient id), for folds
    structures: tuple[str, ...] = ()  # what ``masks`` and ``valid`` hold, in order

    @property
    def source_of(self) -> list[str]:
        """Each image's mask source, in order."""
        return self.sources or ["manual"] * len(self.uids)

    @property
    def manual(self) -> list[str]:
        """The images with manual masks: the only ones validation uses."""
        return [u for u, src in zip(self.uids, self.source_of, strict=True) if src == "manual"]

    def counts(self) -> dict[str, int]:
        """Images per mask source."""
        return dict(Counter(self.source_of))

    def indices(self, uids: list[str]) -> list[int]:
        """Positions of ``uids`` that are in the dataset (others are left out)."""
        where = {u: i for i, u in enumerate(self.uids)}
        return sorted(where[u] for u in uids if u in where)


def _of_sources(uid: Any, sources: tuple[str, ...]) -> Any:
    """The condition that ``uid`` (a column) is an image of one of ``sources`` (images.source)."""
    return uid.in_(select(D.images.c.uid).where(D.images.c.source.in_(sources)))


def annotated_uids(engine: Engine, sources: tuple[str, ...] = ()) -> list[str]:
    """Every image with at least one manual mask (of ``sources`` only, if any), sorted."""
    q = select(D.masks.c.uid).where(D.masks.c.kind == "manual").distinct()
    if sources:
        q = q.where(_of_sources(D.masks.c.uid, sources))
    with engine.connect() as conn:
        return sorted(conn.execute(q).scalars())


def patient_groups(conn, uids: list[str]) -> dict[str, str]:
    """``{uid: patient key}`` for the images whose patient the catalogue knows (``source:id``:
    two datasets' patient numbers never meet); folds keep a key's films together."""
    q = select(D.images.c.uid, D.images.c.source, D.images.c.patient_id)
    return {r.uid: f"{r.source}:{r.patient_id}" for r in D.rows_in(conn, q, D.images.c.uid, uids) if r.patient_id}


def reviewed_masks(engine: Engine, sources: tuple[str, ...], model: str, exclude: set[str],
                   structures: tuple[str, ...], image_sources: tuple[str, ...] = (),
                   ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, str]]:
    """The masks people reviewed, for training: ``({uid: {structure: mask}}, {uid: source})``.
    ``reviewed``: images with a structure a reviewer corrected; ``accepted``: images accepted
    as drawn, none corrected. Structures a reviewer rejected are left out; images in
    ``exclude`` (those with manual masks) too; with ``image_sources``, images of other
    sources (images.source) too."""
    from pipeline.review import final_masks, states
    wanted = {"reviewed": "corrected", "accepted": "accepted"}
    with engine.connect() as conn:
        # a model whose `heart` is the cardiomediastinum (before 2026-12-05): its reviewed heart is one
        rename = {"heart": CARDIOMEDIASTINUM} if heart_definition(conn, model) != "heart" else {}
        q = select(D.reviews.c.uid).where(D.reviews.c.model == model)
        if image_sources:
            q = q.where(_of_sources(D.reviews.c.uid, image_sources))
        uids = sorted(set(conn.execute(q).scalars()) - exclude)
        decided = states(conn, model, uids)
        masks, source = {}, {}
        for uid in uids:
            state = decided.get(uid, {})
            latest = max((d for d in state.values()), key=("rejected", "accepted", "corrected").index, default=None)
            kind = next((k for k, d in wanted.items() if k in sources and d == latest), None)
            if kind is None:
                continue
            final, _ = final_masks(conn, uid, model)
            keep = {rename.get(s, s): m for s, m in final.items()
                    if rename.get(s, s) in structures and state.get(s) != "rejected"}
            if keep:
                masks[uid], source[uid] = keep, kind
    return masks, source


def load_dataset(engine: Engine, cfg: TrainConfig, cache_dir: str | None = None,
                 every_structure: bool = True) -> Dataset:
    """The annotated images, cached at ``cfg``'s size (collected where missing), with their
    manual masks mapped into cache geometry, and with ``cfg.masks`` beyond ``manual`` the
    images people reviewed (:func:`reviewed_masks`). Images that cannot be decoded are left
    out (and recorded in ``failures``). ``every_structure``: refuse data in which no image
    defines one of ``cfg.structures`` (an adaptation lets its parent teach those instead)."""
    uids = annotated_uids(engine, cfg.sources)
    if not uids and cfg.sources:
        raise TrainError(f"no manual masks of source {', '.join(cfg.sources)}: see `cxrlabel status` for the "
                         "sources the database holds")
    if not uids:
        raise TrainError("no manual masks in the database: run `cxrlabel masks import "
                         "generalblockchain ../shared/data/generalblockchain` first")
    extra, extra_source = ({}, {}) if cfg.masks == ("manual",) else reviewed_masks(
        engine, cfg.masks, cfg.review_model, set(uids), cfg.structures, cfg.sources)
    everyone = uids + sorted(extra)
    with engine.connect() as conn:
        paths = {row.uid: row.path for row in D.rows_in(
            conn, select(D.images.c.uid, D.images.c.path), D.images.c.uid, everyone)}
        patients = patient_groups(conn, everyone)
        truth = load_masks(conn, uids)
    truth.update(extra)
    with decoder_pool(None, len(everyone)) as pool:
        got = fetch(engine, [(u, paths.get(u)) for u in everyone], Settings(cfg.size, cfg.mode),
                    cache_dir, pool, failure_stage="collect")
    entries = [e for e in got if isinstance(e, Entry)]
    if len(entries) < len(got):
        log.warning("%d training images could not be decoded: see the failures table",
                    len(got) - len(entries))
    n, c, s = len(entries), len(cfg.structures), cfg.size
    images = np.zeros((n, s, s), np.uint8)
    masks = np.zeros((n, c, s, s), np.float32)
    valid = np.zeros((n, c), bool)
    digest = hashlib.sha256()
    for i, e in enumerate(entries):
        images[i] = e.image
        for j, structure in enumerate(cfg.structures):
            m = truth.get(e.uid, {}).get(structure)
            if m is not None:
                masks[i, j] = e.geom.to_cache(m.astype(np.float32))
                valid[i, j] = True
                digest.update(f"{e.uid}/{structure}/{int(m.sum())}".encode())
        digest.update(e.image.tobytes())
    missing = [s for j, s in enumerate(cfg.structures) if not valid[:, j].any()]
    if missing and every_structure:
        raise TrainError(f"no annotated image defines {', '.join(missing)}: import a source that draws it "
                         "(`cxrlabel masks import png-dirs ... --mask heart=FOLDER`; GeneralBlockchain draws "
                         "the cardiomediastinum, not the heart alone), or leave it out (`--structures "
                         f"{','.join(s for s in cfg.structures if s not in missing)}`)")
    sources = [extra_source.get(e.uid, "manual") for e in entries] if extra else None
    return Dataset([e.uid for e in entries], images, masks, valid, digest.hexdigest(), sources,
                   [e.geom for e in entries], patients, tuple(cfg.structures))


# name: probability. An inverted film is left out: labelling turns one back before the model
# (imaging.upright), so training on it only spends the network's capacity.
EQUIPMENT_SHIFTS = {"collimation": 0.2, "jpeg": 0.2, "contrast": 0.2, "crop": 0.2}


def augmentation(cfg: TrainConfig):
    """Chest-X-ray-safe augmentation (MONAI): small affine, contrast, gamma, blur, noise,
    resolution and exposure; never a left-right flip (the heart's side matters). With
    ``cfg.shifts``, also the equipment-like shifts of :mod:`pipeline.shifts` that those do
    not cover (:data:`EQUIPMENT_SHIFTS`: a collimator's rim, JPEG, another window, a field of
    view cut short), each seen as labelling would show it to the model. With ``cfg.widen``,
    that share of the images first gets an enlarged heart
    (:func:`pipeline.train.enlarge.widen_heart`, by a factor from ``cfg.widen_range``)."""
    from monai import transforms as T
    keys = ["image", "mask"]
    steps = [_heart_widening(cfg.structures, cfg.widen, cfg.widen_range, cfg.widen_ctr)] if cfg.widen else []
    steps += [
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
    if cfg.shifts:
        steps += [_equipment_shift(name, prob) for name, prob in EQUIPMENT_SHIFTS.items()]
    if cfg.roi and cfg.roi < cfg.size:
        steps.append(T.RandSpatialCropd(keys, roi_size=(cfg.roi, cfg.roi), random_size=False))
    return T.Compose(steps)


def _equipment_shift(name: str, prob: float):
    """One :mod:`pipeline.shifts` shift as a MONAI random transform on ``image`` (1, S, S in
    [0, 1]) and ``mask`` (a crop moves the anatomy), at a random strength, drawing from the
    transform's own random state. A collimator's rim is then filled as labelling fills it
    (:func:`pipeline.imaging.unrimmed`), so the network learns to draw the anatomy on behind
    the mirrored band that labelling will show it, against the masks of the whole film."""
    from monai.transforms import RandomizableTransform

    from pipeline.imaging import unrimmed
    from pipeline.shifts import apply

    class EquipmentShift(RandomizableTransform):
        def __call__(self, data: dict) -> dict:
            self.randomize(None)
            if not self._do_transform:
                return data
            strength = self.R.uniform(0.3, 1.0)
            rng = np.random.default_rng(self.R.randint(2 ** 31))
            img = np.clip(np.rint(np.asarray(data["image"])[0] * 255), 0, 255).astype(np.uint8)
            shifted, masks = apply(name, img, np.asarray(data["mask"]), strength, rng)
            if name == "collimation":
                shifted, _ = unrimmed(shifted)
            return {**data, "image": shifted[None].astype(np.float32) / 255.0,
                    "mask": np.asarray(masks, np.float32)}

    return EquipmentShift(prob=prob)


WIDEN_LIMITS = (0.7, 1.5)  # heart width factors --widen-ctr may ask for


def _heart_widening(structures: tuple[str, ...], prob: float, factors: tuple[float, float],
                    ctrs: tuple[float, float] | None = None):
    """:func:`pipeline.train.enlarge.widen_heart` as a MONAI random transform on ``image``
    (1, S, S) and ``mask`` (C, S, S), by a factor drawn uniformly from ``factors``; or, with
    ``ctrs``, by the factor that takes the masks' CTR to one drawn uniformly from ``ctrs``
    (within :data:`WIDEN_LIMITS`), so the widened share sees every heart size alike."""
    from monai.transforms import RandomizableTransform

    from pipeline.measure import measure
    from pipeline.train.enlarge import widen_heart

    class HeartWidening(RandomizableTransform):
        def __call__(self, data: dict) -> dict:
            self.randomize(None)
            if not self._do_transform:
                return data
            masks = np.asarray(data["mask"])
            if ctrs:  # the factor that takes the masks' CTR (as labelling measures it) to the drawn one
                target = self.R.uniform(*ctrs)
                now = measure({s: m > 0.5 for s, m in zip(structures, masks, strict=True)})["ctr"]
                if now is None:
                    return data
                factor = float(np.clip(target / now, *WIDEN_LIMITS))
            else:
                factor = self.R.uniform(*factors)
            image, mask = widen_heart(np.asarray(data["image"])[0], masks, structures, factor)
            return {**data, "image": image[None], "mask": mask}

    return HeartWidening(prob=prob)


def make_batch(ds: Dataset, idx: Sequence[int], aug, norm: str, seeds: list[int] | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x (B,1,S,S) float32 normalised, y (B,C,S,S) float32, valid (B,C) bool)``, augmented
    when ``aug`` is given: each image with its own seed from ``seeds``, so a batch is the
    same whichever process makes it."""
    xs, ys = [], []
    for k, i in enumerate(idx):
        img = ds.images[i][None].astype(np.float32) / 255.0
        mask = ds.masks[i]
        if aug is not None:
            if seeds is not None:
                aug.set_random_state(seed=seeds[k])
            out = aug({"image": img, "mask": mask})
            img, mask = np.asarray(out["image"]), np.asarray(out["mask"])
        xs.append(model_input(np.clip(img[0] * 255.0, 0, 255), norm))
        ys.append(mask)
    return (torch.from_numpy(np.stack(xs)).float(), torch.from_numpy(np.stack(ys)).float(),
            torch.from_numpy(ds.valid[idx]))


def sample_seeds(seed: int, epoch: int, start: int, n: int) -> list[int]:
    """The augmentation seeds of the ``n`` images at positions ``start``... of ``epoch``: a pure
    function of where an image falls in training, so resuming or spreading batches over
    worker processes changes nothing."""
    return [int(np.random.SeedSequence([seed, epoch, start + k]).generate_state(1)[0]) for k in range(n)]


class RunBatches(torch.utils.data.Dataset):
    """The augmented batches of epochs ``first``, ``first + 1``... in order (``orders``: each
    epoch's shuffled training indices; ``steps`` batches an epoch), for one
    :class:`torch.utils.data.DataLoader` over the whole run (``batch_size=None``: each item is
    a whole batch). Its workers start once and make the next epoch's batches while the model
    validates and saves this one's. Each worker builds its own augmentation."""

    def __init__(self, ds: Dataset, cfg: TrainConfig, first: int, orders: list[list[int]], steps: int):
        self.ds, self.cfg, self.first, self.orders, self.steps = ds, cfg, first, orders, steps
        self._aug = None

    def __len__(self) -> int:
        return len(self.orders) * self.steps

    def __getitem__(self, k: int):
        cfg = self.cfg
        if self._aug is None and cfg.augment:
            self._aug = augmentation(cfg)
        e, b = divmod(k, self.steps)
        idx = self.orders[e][b * cfg.batch:(b + 1) * cfg.batch]
        return make_batch(self.ds, idx, self._aug, cfg.norm,
                          sample_seeds(cfg.seed, self.first + e, b * cfg.batch, len(idx)))
