"""Decoding and preprocessing of one image: pure functions, no database, no global state.

* :mod:`~pipeline.imaging.files`: what a file must be before it is decoded (a regular file,
  limits on size and shape, a codestream that agrees with its header) and the decode deadline;
* :mod:`~pipeline.imaging.geometry`: :class:`Geometry`, how a cache image maps to its original;
* :mod:`~pipeline.imaging.decoders`: DICOM and raster files to ``(H, W) float32`` in ``[0, 1]``,
  and to the cache's ``(S, S) uint8`` (:func:`preprocess`);
* :mod:`~pipeline.imaging.fixups`: what makes an odd film one the model knows (turned upright,
  a collimator's rim filled, strong noise smoothed: :func:`fixed_up`) and the model's input
  normalisation (:func:`model_input`).

Intensity convention (one for every input, checked at the boundary):

* ``decode_*`` return ``(H, W) float32`` in ``[0, 1]`` in the *display* sense: air and lungs
  dark (near 0), bone bright (near 1). DICOM goes through modality LUT/rescale, then the VOI
  LUT or window, then MONOCHROME1 inversion, in that order (PS3.4 grayscale pipeline).
* The cache holds ``(S, S) uint8`` = ``round(255 * x)`` of that image after geometry.
* Model input is the cached image as ``(1, S, S) float32`` z-scored per image
  (:func:`model_input`), which removes exposure and window differences between sites;
  optionally after local contrast equalisation (CLAHE), the model's ``norm`` setting.

Geometry: ``cache = (original + offset) * scale`` per axis in continuous pixel coordinates
(pixel ``i`` covers ``[i, i+1)``). :class:`Geometry` maps arrays both ways.
"""

from pipeline.imaging.decoders import (  # noqa: F401
    _block_mean,
    _decode_dataset,
    _flatten_alpha,
    _grey_from_rgb,
    _halvings,
    _j2k_at_level,
    _reduced_frame,
    _reduced_j2k,
    _to_unit,
    _window_output_range,
    decode,
    decode_dicom,
    decode_raster,
    preprocess,
    to_uint8,
)
from pipeline.imaging.files import (  # noqa: F401
    _JPEG_SOF,
    _JPEG_STANDALONE,
    _KINDS,
    DECODE_TIMEOUT,
    DICOM_SUFFIXES,
    MAX_ASPECT,
    MAX_PIXELS,
    MIN_SIDE,
    MIN_SPREAD,
    NOT_XRAY_MODALITIES,
    DecodeError,
    DecodeTimeout,
    NotAnXray,
    NotARegularFile,
    check_codestream,
    check_content,
    check_dimensions,
    codestream_size,
    deadline,
    is_dicom,
    kind_of,
    open_regular,
)
from pipeline.imaging.fixups import (  # noqa: F401
    _LAPLACE_PAIR,
    FIXUPS,
    INVERTED_BELOW,
    NOISY_ABOVE,
    NORMS,
    RIM_BRIGHTER_THAN,
    collimation_rim,
    denoised,
    fixed_up,
    model_input,
    noise_sigma,
    polarity,
    unrimmed,
    upright,
)
from pipeline.imaging.geometry import (  # noqa: F401
    MODES,
    Geometry,
    _from_smaller_source,
    _warp,
)
