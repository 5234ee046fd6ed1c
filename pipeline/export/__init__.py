"""``cxrlabel export``: masks out of the database in formats others read.

* ``rle``: one CSV in the layout of CheXmask's published files (``Image ID``, ``Left Lung``,
  ``Right Lung``, ``Heart`` as run-length text, ``Height``, ``Width``; row-major, 1-based
  starts, "start length" pairs), plus our ``CTR``, ``Quality``, ``Model`` and ``Masks``
  columns, so code written for CheXmask reads ours;
* ``png``: one 1-bit PNG per structure per image in original geometry, and ``index.csv``;
* ``seg``: one DICOM Segmentation object per DICOM-sourced image (highdicom), a segment per
  structure, referencing the source image's SOP Instance, study and series, and naming the
  algorithm (model and sha256) or, for reviewed masks, the reviewer;
* ``sr``: one DICOM measurement report (TID 1500) per DICOM-sourced image: the CTR, and the
  heart's and thorax's widths as lines on the source image (:mod:`~pipeline.export.sr`).

``seg`` and ``sr`` can also be stored in a PACS over STOW-RS (``--to URL``), through the PACS
client, once each (``pacs_exports``).

Masks are the model's (``--model``), or as people left them (``--reviewed``: corrected where
corrected, the model's where accepted; images nobody reviewed are left out). A mask whose
latest review rejected it is never exported unless asked (``include_rejected``).

Every export streams (flat memory for any count) and is resumable: what already exists and
matches is kept, what differs or is missing is written (a CSV is merged in uid order into a
new file that replaces the old one only when complete).

An export writes only where it recognises its own output (:func:`check_destination`): a new
path, an RLE CSV with our header, or a folder it made (marked by :data:`MARKER`). A device,
FIFO or unrelated file or folder is refused before anything is written. Files are written to a
``.partial`` beside their place and renamed; an interrupt (Ctrl-C, SIGTERM) or a write error
removes it, and a write error names the path. Files are owner-only (0600) and folders 0700:
they carry patient data (README, "Sharing exports").

* :mod:`~pipeline.export.destination`: where an export may write, and writing there safely;
* :mod:`~pipeline.export.stream`: the masks an export streams (:class:`Item`, :func:`items`);
* :mod:`~pipeline.export.rle`, :mod:`~pipeline.export.png`, :mod:`~pipeline.export.seg`,
  :mod:`~pipeline.export.sr`: the writers (and the PACS store);
* :mod:`~pipeline.export.formats`: :data:`FORMATS` and :func:`export`, the entry point.
"""

from pipeline.export.destination import (  # noqa: F401
    CHEXMASK_COLUMNS,
    MARKER,
    PNG_INDEX_HEADER,
    RLE_HEADER,
    RLE_HEADER_OLDER,
    WRITE_ERRNOS,
    ExportError,
    _atomic_write,
    _earlier_export,
    _is_our_csv,
    _partial,
    _prepare_folder,
    _terminate_as_interrupt,
    _written,
    check_destination,
)
from pipeline.export.formats import (  # noqa: F401
    FORMATS,
    export,
)
from pipeline.export.png import (  # noqa: F401
    export_png,
)
from pipeline.export.rle import (  # noqa: F401
    _old_rows,
    _rle_row,
    export_rle,
)
from pipeline.export.seg import (  # noqa: F401
    SNOMED,
    TYPE2,
    _segmentation,
    _version,
    export_seg,
)
from pipeline.export.stream import (  # noqa: F401
    CHUNK,
    ExportSummary,
    Item,
    _skip,
    items,
    safe_name,
)
