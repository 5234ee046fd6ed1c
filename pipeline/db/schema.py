"""The tables, as SQLAlchemy Core metadata: the source of truth of the schema (``sql/schema.sql``
is its SQLite rendering), and its version."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

SCHEMA_VERSION = 10


metadata = MetaData()


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


schema_version = Table(
    "schema_version",
    metadata,
    Column("version", Integer, primary_key=True),
    Column("applied_at", DateTime, nullable=False),
    Column("views_sha256", String(64)),  # sql/views.sql as last applied
)


images = Table(
    "images",
    metadata,
    Column("uid", String(200), primary_key=True),
    Column("source", String(40), nullable=False),  # nih, openi, dicom, csv, generalblockchain
    Column("patient_id", String(100)),
    Column("age", Integer),  # whole years
    Column("sex", String(1)),  # M, F, O
    Column("view", String(20)),  # PA, AP, LL...
    Column("study_date", String(10)),  # ISO yyyy-mm-dd
    Column("text", Text),  # free-text diagnosis / report: what group rules read
    Column("labels", Text),  # structured labels, '|'-separated (NIH Finding Labels)
    Column("reference", Text),  # yardstick labels the rules never read (OpenI MeSH major)
    Column("report_ctr", Float),  # a CTR the report text states (КТИ 0,58), set by `groups assign`
    Column("path", Text),  # source image file
    Column("width", Integer),
    Column("height", Integer),
    Column("spacing_x", Float),  # mm per pixel, column direction
    Column("spacing_y", Float),  # mm per pixel, row direction
    # where the spacing came from (PixelSpacing, ImagerPixelSpacing / magnification 1.1, NIH's
    # OriginalImagePixelSpacing of the original's width and height, a CSV column), or why none
    Column("spacing_source", String(80)),
    Column("modality", String(10)),
    Column("body_part", String(40)),
    Column("photometric", String(20)),
    Column("study_uid", String(100)),
    Column("sop_uid", String(100)),
    Column("study_description", Text),
    Column("accession", String(64)),  # AccessionNumber: how a RIS export's reports join a PACS's films
    Column("license", String(40)),  # per-image licence where the source states one
    Column("loaded_at", DateTime, nullable=False),
)


load_errors = Table(
    "load_errors",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("source_file", Text, nullable=False),
    Column("line", Integer),  # 0: the problem has no line (a DICOM file, a whole source)
    Column("uid", String(200)),  # '': no uid
    Column("reason", Text, nullable=False),
    Column("created_at", DateTime, nullable=False),  # first seen
    Column("last_seen_at", DateTime),
    Index("uq_load_errors_item", "source_file", "line", "uid", unique=True),
)


groups = Table(
    "groups",
    metadata,
    Column("uid", String(200), ForeignKey("images.uid", ondelete="CASCADE"), primary_key=True),
    Column("group_name", String(40), nullable=False),
    Column("rule", Text),  # which rule decided, for audits
    Column("assigned_at", DateTime, nullable=False),
    Index("ix_groups_group_name", "group_name"),
)


samples = Table(
    "samples",
    metadata,
    Column("name", String(100), primary_key=True),
    Column("uid", String(200), ForeignKey("images.uid", ondelete="CASCADE"), primary_key=True),
    Column("group_name", String(40)),
    Column("created_at", DateTime, nullable=False),
)


cache = Table(
    "cache",
    metadata,
    Column("uid", String(200), ForeignKey("images.uid", ondelete="CASCADE"), primary_key=True),
    Column("settings_id", String(16), primary_key=True),
    Column("path", Text, nullable=False),
    Column("orig_height", Integer, nullable=False),
    Column("orig_width", Integer, nullable=False),
    Column("size", Integer, nullable=False),
    Column("mode", String(10), nullable=False),  # pad | stretch
    # cache = (original + offset) * scale, per axis, in continuous pixel coordinates
    Column("offset_x", Float, nullable=False),
    Column("offset_y", Float, nullable=False),
    Column("scale_x", Float, nullable=False),
    Column("scale_y", Float, nullable=False),
    Column("checksum", String(64), nullable=False),
    Column("bytes", Integer),  # the entry file's size: a cheap check that it is whole
    Column("created_at", DateTime, nullable=False),
)


failures = Table(
    "failures",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("stage", String(20), nullable=False),
    Column("uid", String(200)),
    Column("error_class", String(60), nullable=False),
    Column("message", Text, nullable=False),
    Column("created_at", DateTime, nullable=False),  # first seen
    Column("last_seen_at", DateTime),
    Index("ix_failures_stage_uid", "stage", "uid", unique=True),  # one row per problem
)


models = Table(
    "models",
    metadata,
    Column("name", String(100), primary_key=True),
    Column("preset", String(60), nullable=False),
    Column("config", Text, nullable=False),  # JSON
    Column("data_hash", String(64), nullable=False),
    Column("path", Text, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("dice_heart", Float),
    Column("dice_left_lung", Float),
    Column("dice_right_lung", Float),
    Column("metrics", Text),  # JSON: per-epoch history, folds...
    Column("created_at", DateTime, nullable=False),
)


label_runs = Table(
    "label_runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model", String(100), nullable=False),
    Column("model_sha256", String(64)),
    Column("selection", Text, nullable=False),
    Column("device", String(20)),
    Column("host", String(100)),
    Column("pid", Integer),  # with host: whether a 'running' run's process is still alive
    Column("started_at", DateTime, nullable=False),
    Column("ended_at", DateTime),
    Column("n_selected", Integer),
    Column("n_labelled", Integer),
    Column("n_skipped", Integer),
    Column("n_failed", Integer),
    Column("status", String(20), nullable=False),  # running | done | failed | interrupted
    # what the model's `heart` is: 'heart' (the heart alone) or 'cardiomediastinum' (models
    # trained on GeneralBlockchain alone, before 2026-12-05: heart plus upper mediastinum)
    Column("heart_definition", String(20)),
)


# what each annotated source's manual masks mean (masks import records it)
mask_sources = Table(
    "mask_sources",
    metadata,
    Column("source", String(100), primary_key=True),
    Column("definitions", Text, nullable=False),  # JSON: {structure: definition}
    Column("imported_at", DateTime, nullable=False),
)


masks = Table(
    "masks",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("uid", String(200), ForeignKey("images.uid", ondelete="CASCADE"), nullable=False),
    Column("structure", String(20), nullable=False),  # heart, left_lung, right_lung
    Column("kind", String(10), nullable=False),  # manual | predicted | reviewed (a person's correction)
    Column("model", String(100), nullable=False, default=""),  # '' for manual masks
    Column("run_id", Integer, ForeignKey("label_runs.id")),
    Column("encoding", String(10), nullable=False),  # png: 1-bit PNG; rle: CheXmask run-length text
    Column("height", Integer, nullable=False),
    Column("width", Integer, nullable=False),
    Column("area", Integer, nullable=False),
    Column("data", LargeBinary, nullable=False),
    Column("created_at", DateTime, nullable=False),
    UniqueConstraint("uid", "structure", "kind", "model", name="uq_masks_identity"),
)


measurements = Table(
    "measurements",
    metadata,
    Column("uid", String(200), ForeignKey("images.uid", ondelete="CASCADE"), primary_key=True),
    Column("model", String(100), primary_key=True),
    Column("run_id", Integer, ForeignKey("label_runs.id")),
    Column("heart_area_px", Integer),
    Column("heart_area_mm2", Float),
    Column("heart_width_px", Integer),
    Column("thoracic_width_px", Integer),
    Column("heart_width_mm", Float),
    Column("thoracic_width_mm", Float),
    Column("ctr", Float),
    Column("ctr_missing", String(40)),  # why ctr is NULL: the structures not found, e.g. 'left_lung'
    Column("heart_x0", Integer),
    Column("heart_y0", Integer),
    Column("heart_x1", Integer),
    Column("heart_y1", Integer),
    Column("lungs_x0", Integer),
    Column("lungs_y0", Integer),
    Column("lungs_x1", Integer),
    Column("lungs_y1", Integer),
    Column("quality", Float),  # estimated mean Dice (pipeline/quality.py); heuristic without a fit
    Column("quality_heart", Float),  # estimated Dice per structure, when the model has a fitted score
    Column("quality_left_lung", Float),
    Column("quality_right_lung", Float),
    # the review worklist's order, 0 first: quality and how plainly the film shows the heart's
    # width-setting borders, against the fitting films' (pipeline/quality/trust.py); NULL: by quality
    Column("trust", Float),
    Column("labelled_at", DateTime, nullable=False),
    # is this a frontal chest radiograph the model can read (pipeline/quality/inputs.py)? 'ok',
    # or why not ('not a chest film: ...', 'lateral view', 'flipped', ...); NULL: not checked
    Column("input_check", String(120)),
    # the millimetres' calibration: the spacing's source, scaled to the file's pixels where the
    # file is a resized copy of the catalogued original; or none and why
    Column("mm_calibration", String(160)),
    # from the masks a person reviewed (their corrections, the model's masks elsewhere)
    Column("reviewed_ctr", Float),
    Column("reviewed_heart_width_px", Integer),
    Column("reviewed_thoracic_width_px", Integer),
    Index("ix_measurements_model_quality", "model", "quality"),
    Index("ix_measurements_model_trust", "model", "trust"),
)


# A model's fitted quality score (`cxrlabel quality fit`), by the sha256 of the checkpoint it
# scores: labelling uses it before the file beside the checkpoint (pipeline/quality/score.py).
quality_scores = Table(
    "quality_scores",
    metadata,
    Column("model_sha256", String(64), primary_key=True),
    Column("tta", Boolean, primary_key=True),  # the score that also reads test-time augmentation
    Column("model", String(100), nullable=False),  # the name it was fitted under
    Column("score", Text, nullable=False),  # JSON: pipeline.quality.QualityModel.to_json
    Column("origin", Text),  # what it was fitted on, in words
    Column("fitted_at", DateTime, nullable=False),
)


# A CTR calibration of one model's weights at one site (`cxrlabel calibrate`): the CTR a site's
# readers would draw, as intercept + slope x the model's CTR, fitted on the site's annotated
# films the model never trained on. A site is a catalogue source (images.source): what a user
# names on loading a clinic's films, where an institution header is often blank or anonymised.
# label_results shows the calibrated CTR beside the model's, never instead of it.
ctr_calibrations = Table(
    "ctr_calibrations",
    metadata,
    Column("model_sha256", String(64), primary_key=True),
    Column("site", String(100), primary_key=True),
    Column("model", String(100), nullable=False),  # the name it was fitted under
    Column("kind", String(10), nullable=False),  # offset | linear
    Column("intercept", Float, nullable=False),
    Column("slope", Float, nullable=False),
    Column("intercept_low", Float),  # 95% bootstrap interval (offset: of the offset itself)
    Column("intercept_high", Float),
    Column("slope_low", Float),
    Column("slope_high", Float),
    Column("films", Integer, nullable=False),
    Column("details", Text),  # JSON: cross-validated MAE and bias before and after, films used
    Column("fitted_at", DateTime, nullable=False),
)


# What a PACS holds of our results (`cxrlabel export seg|sr --to URL`): one row per object
# stored, so an export of the same result stores nothing again and a changed one names the
# object it supersedes.
pacs_exports = Table(
    "pacs_exports",
    metadata,
    Column("destination", String(300), primary_key=True),  # the DICOMweb base URL (never a credential)
    Column("sop_uid", String(100), primary_key=True),
    Column("kind", String(10), nullable=False),  # seg | sr
    Column("uid", String(200), nullable=False),  # the source image
    Column("model", String(100), nullable=False),
    Column("sop_class_uid", String(100), nullable=False),
    Column("study_uid", String(100), nullable=False),
    Column("series_uid", String(100), nullable=False),
    Column("supersedes", String(100)),  # the SOP Instance UID of the object this one replaces
    Column("exported_at", DateTime, nullable=False),
    Index("ix_pacs_exports_uid", "uid", "model", "kind"),
)


# What people decided about a model's masks (`cxrlabel review`): one row per decision, never
# updated. `version` counts an image's decisions for that model; a save names the version it
# saw, so the second of two browsers saving from the same version is refused (unique key).
reviews = Table(
    "reviews",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("uid", String(200), ForeignKey("images.uid", ondelete="CASCADE"), nullable=False),
    Column("model", String(100), nullable=False),  # whose masks were reviewed
    Column("version", Integer, nullable=False),
    Column("structure", String(20), nullable=False, default=""),  # '' = the whole image
    Column("decision", String(10), nullable=False),  # accepted | rejected | corrected
    Column("reviewer", String(100), nullable=False),
    Column("at", DateTime, nullable=False),
    Column("note", Text),
    UniqueConstraint("uid", "model", "version", "structure", name="uq_reviews_version"),
)
