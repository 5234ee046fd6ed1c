"""The quality score: how far to trust each labelled image, and whether it is a film the
model can read at all.

* :mod:`pipeline.quality.features`: what post-processing measures of one image's masks and
  probabilities (agreement, uncertainty, outline, shape against an atlas of annotated masks,
  test-time augmentation's agreement, the anatomy);
* :mod:`pipeline.quality.score`: the fitted score (:class:`QualityModel`, an estimated Dice
  per structure), where a model's score is kept (the database, or the file beside its
  checkpoint), the checks that it fits the model, and the heuristic fallback;
* :mod:`pipeline.quality.films`: the annotated films a score is fitted on (a
  cross-validation's held-out folds, or the database's films the model did not train on),
  labelled as labelling labels them, as they are and under equipment-like shifts;
* :mod:`pipeline.quality.fit`: fitting a score on those films, with its held-out figures
  (``cxrlabel quality fit``; the two read training data, so labelling never imports them);
* :mod:`pipeline.quality.inputs`: the input check (is this a frontal chest radiograph?) and
  the marks for films outside what the CTR norms describe (an AP view, a child).
"""

from pipeline.quality.features import (
    CONTEXT,
    FEATURES,
    IMAGE_FEATURES,
    SHAPE,
    STRUCTURE_FEATURES,
    TTA_SHIFT,
    Atlas,
    atlas_frame,
    design,
    heart_border,
    image_features,
    lungs_swapped,
    rim_share,
    structure_features,
    tta_agreement,
    tta_copies,
    union_box,
)
from pipeline.quality.score import (
    FORMAT,
    SCORE_RECIPE,
    QualityModel,
    Scores,
    checked,
    from_sidecar,
    heuristic,
    plausibility,
    recipe_differences,
    recipe_of,
    score_image,
    scores_for,
    sidecar,
    store,
    stored,
)

__all__ = ["CONTEXT", "FEATURES", "FORMAT", "IMAGE_FEATURES", "SCORE_RECIPE", "SHAPE", "STRUCTURE_FEATURES",
           "TTA_SHIFT", "Atlas", "QualityModel", "Scores", "atlas_frame", "checked", "design", "from_sidecar",
           "heart_border", "heuristic", "image_features", "lungs_swapped", "plausibility", "recipe_differences",
           "recipe_of", "rim_share", "score_image", "scores_for", "sidecar", "store", "stored", "structure_features",
           "tta_agreement", "tta_copies", "union_box"]
