"""Masks: lossless encoding in the database, and importers of annotated sets.

A mask is ``(H, W) bool`` in the *original* image geometry. Imported (manual) masks are
stored as 1-bit PNGs (``encoding='png'``); predicted ones as CheXmask's run-length text
(``encoding='rle'``: "start length ..." pairs, 1-based starts into the row-major flattened
image, the ``height`` and ``width`` columns giving its shape), which labelling computes
straight from the model's output without building the full-size array. Manual masks have
``kind='manual'`` and ``model=''``; predicted ones ``kind='predicted'``, the model name and
the label run.

* :mod:`~pipeline.masks.structures`: the structures and their definitions, per source;
* :mod:`~pipeline.masks.encoding`: PNG and run-length encodings, :class:`EncodedMask`, the
  rows that hold masks and :func:`load_masks`;
* :mod:`~pipeline.masks.importers`: the GeneralBlockchain set and folders of PNG masks, each
  source's definitions recorded.
"""

from pipeline.masks.encoding import (  # noqa: F401
    _PNG_SIGNATURE,
    MASK_KEYS,
    ZLIB_LEVEL,
    EncodedMask,
    _png_chunk,
    decode,
    encode,
    load_masks,
    mask_row,
    rle_of,
    rles,
)
from pipeline.masks.importers import (  # noqa: F401
    GENERALBLOCKCHAIN_CLASSES,
    IMAGE_SUFFIXES,
    ImportSummary,
    MaskImportError,
    _foreground,
    _generalblockchain_metadata,
    _generalblockchain_rows,
    _image_size,
    _int_or_none,
    _paste,
    _same_stem,
    _store,
    import_generalblockchain,
    import_png_dirs,
    parse_mask_dirs,
)
from pipeline.masks.structures import (  # noqa: F401
    CARDIOMEDIASTINUM,
    DEFINITIONS,
    HEARTS,
    LUNG_CONVENTIONS,
    LUNGS,
    STRUCTURES,
    TRAINED,
    heart_definition,
    overlap_ignored,
    record_source,
    source_definitions,
)
