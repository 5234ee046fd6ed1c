"""A PACS's chest films into the catalogue over DICOMweb: ``catalogue load dicomweb URL``.

QIDO-RS finds the instances page by page (bounded memory whatever the archive's size), filtered
as a researcher needs (modality, study dates, body part). QIDO answers few fields by default
(Orthanc: the identifiers, dates, sex, rows and columns), so each new series' metadata is read
once (WADO-RS ``.../series/S/metadata``: every instance's header but the pixels, one request a
series) and catalogued by the same code as a file's header (:func:`header_record`): view,
age, pixel spacing, photometric interpretation... ``--fields qido`` skips it: a request a page
instead of a page plus one a series, without those fields (no view, so no PA/AP split; no
spacing, so no millimetres).

The uid of a PACS instance is its SOP Instance UID; its path is ``dicomweb+URL`` of the
instance (never a credential). An instance the catalogue already holds (the same SOP
Instance UID, catalogued from a folder or an earlier load) stays as it is: loading again adds
only what is new.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

from sqlalchemy import or_, select
from sqlalchemy.engine import Engine

from pipeline import db as D
from pipeline.catalogue.records import Item, LoadSummary, Problem, parse_date, parse_sex, store
from pipeline.pacs.client import SCHEME, DicomWeb, PacsError, dicom_json_value

# tags asked of QIDO beyond its defaults (a server may answer fewer: the metadata fills them)
INCLUDE = ("00080050", "00080060", "00080020", "00100020", "00100040", "00101010", "00180015",
           "00185101", "00280010", "00280011", "00080018", "0020000D", "0020000E", "00081030")


@dataclass
class PacsQuery:
    modalities: tuple[str, ...] = ("CR", "DX")
    study_date: str | None = None  # YYYYMMDD, YYYYMMDD-YYYYMMDD, -YYYYMMDD or YYYYMMDD-
    body_part: str | None = None
    page: int = 500
    metadata: bool = True  # read each new series' full headers (WADO-RS metadata)

    def params(self, modality: str) -> dict:
        p = {"Modality": modality, "includefield": ",".join(INCLUDE)}
        if self.study_date:
            p["StudyDate"] = self.study_date
        if self.body_part:
            p["BodyPartExamined"] = self.body_part
        return p


def check_date_range(text: str | None) -> str | None:
    """A QIDO StudyDate range, or a :class:`PacsError` with the forms it takes."""
    if not text:
        return None
    lo, dash, hi = text.partition("-")
    if all(len(x) in (0, 8) and x.isdigit() or x == "" for x in (lo, hi)) and (lo or hi) and (dash or lo):
        if parse_date(lo or "19000101") and parse_date(hi or "29991231"):
            return text
    raise PacsError(f"--study-date {text!r}: use YYYYMMDD, YYYYMMDD-YYYYMMDD, -YYYYMMDD or YYYYMMDD-")


def instance_path(base: str, study: str, series: str, sop: str) -> str:
    return f"{SCHEME}{base}/studies/{study}/series/{series}/instances/{sop}"


def load_dicomweb(engine: Engine, url: str, query: PacsQuery | None = None, source: str = "pacs",
                  texts: dict[str, str] | None = None, text_key: str = "accession", allow_http: bool | None = None,
                  progress: bool = True) -> LoadSummary:
    """Catalogue the instances of the DICOMweb server at ``url`` that match ``query``.
    ``texts``: report text by ``text_key`` (an images field: accession, study_uid, sop_uid,
    patient_id) from a RIS export."""
    query = query or PacsQuery()
    query = dataclasses.replace(query, study_date=check_date_range(query.study_date))
    client = DicomWeb(url, allow_http)
    summary_holder: dict[str, int] = {"already": 0}

    def items() -> Iterator[Item]:
        for modality in query.modalities:
            for page in client.search("instances", query.params(modality), query.page):
                yield from _page_items(engine, client, page, query, source, texts, text_key, summary_holder)

    try:
        summary = store(engine, items(), client.base, progress=progress)
    finally:
        client.close()
    summary.kept = summary_holder["already"]
    return summary


def _page_items(engine: Engine, client: DicomWeb, page: list[dict], query: PacsQuery, source: str,
                texts: dict[str, str] | None, text_key: str, counts: dict[str, int]) -> Iterator[Item]:
    """The catalogue rows of one QIDO page's new instances (known ones counted and left)."""
    known = _known(engine, [s for s in (dicom_json_value(r, "00080018") for r in page) if s])
    by_series: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in page:
        sop, study, series = (dicom_json_value(r, t) for t in ("00080018", "0020000D", "0020000E"))
        if not (sop and study and series):
            yield Problem(None, sop or "?", "a QIDO answer without its study, series or SOP Instance UID")
            continue
        if sop in known:
            counts["already"] += 1
            continue
        by_series[(study, series)].append(r)
    for (study, series), rows in by_series.items():
        headers = _headers(client, study, series, rows) if query.metadata else {}
        for r in rows:
            sop = dicom_json_value(r, "00080018") or ""
            path = instance_path(client.base, study, series, sop)
            item: Item
            if isinstance(headers, Problem):
                item = Problem(None, sop, headers.reason)
            elif sop in headers:
                from pipeline.catalogue.dicom import header_record
                try:
                    item = header_record(headers[sop], sop, path, source)
                except Exception as e:  # a damaged element in the server's header: that instance only
                    item = Problem(None, sop, f"{sop}: {e}")
            else:
                item = _qido_record(r, sop, path, source)
            if texts is not None and isinstance(item, dict):
                item["text"] = texts.get(str(item.get(text_key) or ""))
            yield item


def _headers(client: DicomWeb, study: str, series: str, rows: list[dict]):
    """``{sop: pydicom Dataset}`` of a series' metadata, or a :class:`Problem` for all its
    instances when the server cannot give it (an authentication failure or a server that
    stays down stops the load instead: its next run goes on)."""
    import pydicom

    from pipeline.pacs.client import PacsUnreachable
    try:
        meta = client.series_metadata(study, series)
    except PacsUnreachable:  # the server is gone or refuses us: stop, with what was loaded kept
        raise
    except PacsError as e:
        return Problem(None, series, f"series {series}: no metadata ({e})")
    out = {}
    for m in meta if isinstance(meta, list) else []:
        try:
            with warnings.catch_warnings():  # a value pydicom finds odd (an age of '62') is read as a file's is
                warnings.simplefilter("ignore")
                ds = pydicom.Dataset.from_json(m, bulk_data_uri_handler=lambda *_: b"")
        except Exception:  # one instance's header the parser refuses: catalogued from QIDO instead
            continue
        sop = str(ds.get("SOPInstanceUID", ""))
        if sop:
            out[sop] = ds
    return out


def _qido_record(r: dict, sop: str, path: str, source: str) -> dict:
    """A catalogue row from QIDO's fields alone (``--fields qido``, or an instance the
    metadata left out)."""
    from pipeline.catalogue.records import parse_age

    def value(tag: str) -> str | None:
        return dicom_json_value(r, tag)

    rows, cols = value("00280010"), value("00280011")
    return {"uid": sop, "source": source, "path": path, "sop_uid": sop,
            "patient_id": value("00100020"), "study_uid": value("0020000D"),
            "study_date": parse_date(value("00080020") or ""), "modality": value("00080060"),
            "body_part": value("00180015"), "view": value("00185101"),
            "sex": parse_sex(value("00100040") or ""), "age": parse_age(value("00101010") or ""),
            "height": int(rows) if rows and rows.isdigit() else None,
            "width": int(cols) if cols and cols.isdigit() else None,
            "study_description": value("00081030"), "accession": value("00080050"),
            "spacing_source": "none: catalogued from QIDO fields (--fields qido)"}


def load_dimse(engine: Engine, address: str, called: str, calling: str, query: PacsQuery | None = None,
               source: str = "pacs", texts: dict[str, str] | None = None, text_key: str = "accession",
               progress: bool = True, move_port: int | None = None) -> LoadSummary:
    """Catalogue a PACS over C-FIND (study, series, image): the fields its answers carry (a
    server fills those it indexes; spacing and view often not), read by :func:`header_record`;
    instances already catalogued are kept as they were. ``move_port``: their pixels come by
    C-MOVE to our storage SCP on that port (the PACS's entry for our AE title), not by C-GET."""
    import pydicom

    from pipeline.catalogue.dicom import header_record
    from pipeline.pacs.dimse import Peer, find_instances
    query = query or PacsQuery()
    peer = Peer.parse(address, called, calling, move_port)
    study_date = check_date_range(query.study_date)
    counts = {"already": 0}

    def items() -> Iterator[Item]:
        for series in find_instances(peer, query.modalities, study_date, query.body_part):
            sops = [f["SOPInstanceUID"] for f, _ in series]
            known = _known(engine, sops)
            for fields, path in series:
                sop = str(fields["SOPInstanceUID"])
                if sop in known:
                    counts["already"] += 1
                    continue
                ds = pydicom.Dataset()
                with warnings.catch_warnings():  # a value pydicom finds odd (an age of '62') is read as a file's is
                    warnings.simplefilter("ignore")
                    for keyword, value in fields.items():
                        setattr(ds, keyword, value)
                try:
                    item: Item = header_record(ds, sop, path, source)
                except Exception as e:  # a value the server sent that a header cannot hold: this instance only
                    item = Problem(None, sop, f"{sop}: {e}")
                if texts is not None and isinstance(item, dict):
                    item["text"] = texts.get(str(item.get(text_key) or ""))
                yield item

    summary = store(engine, items(), str(peer), progress=progress)
    summary.kept = counts["already"]
    return summary


def _known(engine: Engine, sops: list[str]) -> set[str]:
    """Those of ``sops`` the catalogue holds (as a uid, or as an image's SOP Instance UID)."""
    known: set[str] = set()
    with engine.connect() as conn:
        for chunk in D.chunks(sops, D.IN_CHUNK):
            known |= {v for row in conn.execute(select(D.images.c.uid, D.images.c.sop_uid).where(
                or_(D.images.c.uid.in_(chunk), D.images.c.sop_uid.in_(chunk)))) for v in row}
    return known
