"""Stage 1: load clinic metadata into the ``images`` table.

Every loader yields :class:`Record` items (a row for ``images``) or :class:`Problem` items
(a malformed row, with file and line); :func:`store` writes them in batches, one
transaction each, upserting by uid, so a re-run updates rather than duplicates. A source
that is not the declared format fails before anything is written.

* :mod:`~pipeline.catalogue.records`: records, problems, value parsing and :func:`store`;
* :mod:`~pipeline.catalogue.tables`: CSV reading, the NIH catalogue and a mapped clinic CSV;
* :mod:`~pipeline.catalogue.dicom`: DICOM headers in a process pool, pixel spacing;
* :mod:`~pipeline.catalogue.openi`: OpenI's report archive;
* :mod:`~pipeline.catalogue.loaders`: the loaders by format (:data:`LOADERS`, :func:`load`),
  re-rooting moved images, and catalogue listings.
"""

from pipeline.catalogue.dicom import (  # noqa: F401
    _dicom_header,
    _text_lookup,
    dicom_files,
    dicom_spacing,
    load_dicom,
)
from pipeline.catalogue.loaders import (  # noqa: F401
    CATALOGUE_VIEW,
    LOADERS,
    REROOT_PROBE,
    LoadOptions,
    RerootSummary,
    list_errors,
    list_rows,
    load,
    reroot,
)
from pipeline.catalogue.openi import (  # noqa: F401
    _openi_report,
    load_openi,
)
from pipeline.catalogue.records import (  # noqa: F401
    _AGE,
    _DATE_FORMATS,
    _SEX,
    IMAGE_FIELDS,
    MAX_AGE,
    NIH_COLUMNS,
    CatalogueError,
    Item,
    LoadSummary,
    Problem,
    Record,
    RowError,
    _flush,
    parse_age,
    parse_date,
    parse_float,
    parse_int,
    parse_sex,
    store,
)
from pipeline.catalogue.tables import (  # noqa: F401
    CSV_FIELDS,
    _decoded_lines,
    _file_index,
    _first_value,
    _open_bytes,
    _rows_to_items,
    _uid_problem,
    load_csv,
    load_nih,
    parse_mapping,
    read_csv,
)
