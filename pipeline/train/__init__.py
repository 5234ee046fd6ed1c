"""Stage 3: train a registered network on cached images and manual masks.

``config`` (presets, :class:`TrainConfig`), ``data`` (annotated images, augmentation),
``folds`` (stored splits), ``losses``, ``average`` (weight averaging), ``loop`` (one run,
resumable), ``cv`` (:func:`cross_validate`), ``plots``. The trained model is written in the
inference format of :mod:`pipeline.model`, which this package imports and never the reverse.
"""

from pipeline.train.config import TrainConfig, TrainError, presets
from pipeline.train.cv import CrossValidation, cross_validate, summarise_folds
from pipeline.train.loop import TrainResult, train

__all__ = ["CrossValidation", "TrainConfig", "TrainError", "TrainResult", "cross_validate", "presets",
           "summarise_folds", "train"]
