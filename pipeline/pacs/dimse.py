"""A PACS over the DICOM network services (pynetdicom), for archives that offer no DICOMweb:
C-FIND walks the archive study by study, series by series (the hierarchy every Query/Retrieve
SCP answers; nothing is held but one study's answers at a time), C-GET fetches one instance as
stored (our storage SCP role offers the compressed transfer syntaxes, so the reduced-size
decoders still apply). An archive that allows only C-MOVE sends the instance to a storage SCP
of ours, started for the one instance on the port the archive knows for our AE title
(``--move-port``) and stopped after it; the processes of a pool take that port in turn (a
lock file beside it).

An instance's path is ``dimse://HOST:PORT/STUDY/SERIES/SOP?called=AET&calling=AET`` (AE
titles are names, not secrets), with ``&move=PORT`` where it is retrieved by C-MOVE. An
association that cannot be made or is aborted is retried with back-off as an HTTP request is
(:mod:`pipeline.pacs.client`'s settings), then stops the run with one line; a C-GET or C-MOVE
that fails for one instance fails that instance.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

from pipeline.pacs.client import (
    BACKOFF,
    RETRIES,
    TIMEOUT,
    PacsAuthError,
    PacsError,
    PacsUnreachable,
    StoreResult,
    _env_number,
)

# pynetdicom logs every refused connection and odd message itself: what went wrong reaches the
# user as our one line (or a failures row), never as its log on the terminal
logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)

SCHEME = "dimse://"
# Study Root Query/Retrieve and the storage classes a chest film comes in (PS3.4 Annex B)
FIND = "1.2.840.10008.5.1.4.1.2.2.1"
GET = "1.2.840.10008.5.1.4.1.2.2.3"
MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STORAGE = ("1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
           "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
           "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
           "1.2.840.10008.5.1.4.1.1.7")  # Secondary Capture Image Storage
CALLING = "CXRLABEL"

# C-FIND keys asked at each level (what a catalogue row reads; a server fills what it indexes)
STUDY_KEYS = ("StudyInstanceUID", "StudyDate", "AccessionNumber", "PatientID", "PatientSex", "PatientAge",
              "StudyDescription")
SERIES_KEYS = ("SeriesInstanceUID", "Modality", "BodyPartExamined")
IMAGE_KEYS = ("SOPInstanceUID", "SOPClassUID", "Rows", "Columns", "PhotometricInterpretation", "ViewPosition",
              "PixelSpacing", "ImagerPixelSpacing")


@dataclass(frozen=True)
class Peer:
    host: str
    port: int
    called: str  # the PACS's AE title
    calling: str = CALLING  # ours
    move_port: int | None = None  # retrieve by C-MOVE to our storage SCP on this port (None: C-GET)

    @classmethod
    def parse(cls, address: str, called: str, calling: str = CALLING, move_port: int | None = None) -> Peer:
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise PacsError(f"{address!r}: give the PACS as HOST:PORT (its DICOM port, e.g. pacs.example.org:104)")
        for name, value in (("--called-aet", called), ("--aet", calling)):
            if not value or len(value) > 16 or not value.isascii() or "\\" in value:
                raise PacsError(f"{name} {value!r}: an AE title is 1 to 16 ASCII characters")
        if move_port is not None and not 0 < move_port < 65536:
            raise PacsError(f"--move-port {move_port}: a TCP port (1-65535), the one the PACS knows for our AE title")
        return cls(host, int(port), called, calling, move_port)

    def path(self, study: str, series: str, sop: str) -> str:
        move = f"&move={self.move_port}" if self.move_port else ""
        return (f"{SCHEME}{self.host}:{self.port}/{study}/{series}/{sop}"
                f"?called={quote(self.called)}&calling={quote(self.calling)}{move}")

    def __str__(self) -> str:
        return f"{self.called}@{self.host}:{self.port}"


def parse_path(path: str) -> tuple[Peer, str, str, str]:
    parts = urlsplit(path)
    q = parse_qs(parts.query)
    study, series, sop = parts.path.strip("/").split("/")
    move = q.get("move", [""])[0]
    peer = Peer(parts.hostname or "", parts.port or 104, q["called"][0], q.get("calling", [CALLING])[0],
                int(move) if move.isdigit() else None)
    return peer, study, series, sop


def _associate(peer: Peer, contexts, roles=(), handlers=()):
    """An association with ``peer``, retried with back-off; one line when it cannot be had."""
    from pynetdicom import AE
    retries = int(_env_number("CXRLABEL_PACS_RETRIES", RETRIES))
    backoff = _env_number("CXRLABEL_PACS_BACKOFF", BACKOFF)
    ae = AE(ae_title=peer.calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = _env_number("CXRLABEL_PACS_TIMEOUT", TIMEOUT)
    for attempt in range(retries + 1):
        assoc = ae.associate(peer.host, peer.port, contexts=contexts, ae_title=peer.called, ext_neg=list(roles),
                             evt_handlers=list(handlers))
        if assoc.is_established:
            return assoc
        if assoc.is_rejected:
            raise PacsAuthError(f"{peer}: the PACS rejected the association (is {peer.calling} a modality it "
                                f"knows, and {peer.called} its AE title?)")
        if attempt < retries:
            time.sleep(backoff * 2 ** attempt)
    raise PacsUnreachable(f"{peer}: no association after {retries + 1} tries: is the server up? A later run goes "
                          "on from where this one stopped")


def _find(assoc, level: str, keys: tuple[str, ...], match: dict, model) -> Iterator:
    from pydicom import Dataset
    q = Dataset()
    q.QueryRetrieveLevel = level
    for k in keys:
        setattr(q, k, match.get(k) or None)  # empty: a return key (universal matching)
    for status, identifier in assoc.send_c_find(q, model):
        code = getattr(status, "Status", None)
        if code is None:
            raise PacsError(f"C-FIND {level}: the association ended (timed out or aborted)")
        if code in (0xFF00, 0xFF01) and identifier is not None:
            yield identifier
        elif code not in (0x0000, 0xFF00, 0xFF01):
            raise PacsError(f"C-FIND {level}: the PACS answered status {code:#06x}")


def find_instances(peer: Peer, modalities: tuple[str, ...], study_date: str | None,
                   body_part: str | None) -> Iterator[list[tuple[dict, str]]]:
    """Per series that matches: ``[(header fields, path), ...]`` of its instances."""
    from pynetdicom import build_context
    assoc = _associate(peer, [build_context(FIND)])
    try:
        studies = list(_find(assoc, "STUDY", STUDY_KEYS, {"StudyDate": study_date or ""}, FIND))
        for st in studies:
            study_uid = str(st.get("StudyInstanceUID", ""))
            for modality in modalities:
                match = {"StudyInstanceUID": study_uid, "Modality": modality, "BodyPartExamined": body_part or ""}
                # each level's answers read to the end before the next query: one C-FIND at a time
                # on an association (a second one begun mid-answer interleaves their messages)
                for se in list(_find(assoc, "SERIES", SERIES_KEYS + ("StudyInstanceUID",), match, FIND)):
                    series_uid = str(se.get("SeriesInstanceUID", ""))
                    out = []
                    for im in list(_find(assoc, "IMAGE", IMAGE_KEYS + ("StudyInstanceUID", "SeriesInstanceUID"),
                                         {"StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid}, FIND)):
                        fields = {**_plain(st), **_plain(se), **_plain(im)}
                        sop = fields.get("SOPInstanceUID")
                        if sop:
                            out.append((fields, peer.path(study_uid, series_uid, sop)))
                    if out:
                        yield out
    finally:
        assoc.release()


def _plain(ds) -> dict:
    return {e.keyword: e.value for e in ds if e.keyword and e.value not in (None, "")}


def _syntaxes() -> list[str]:
    """The transfer syntaxes our storage SCP role accepts: the compressed ones first."""
    from pydicom.uid import (
        JPEG2000,
        DeflatedExplicitVRLittleEndian,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        JPEG2000Lossless,
        JPEGBaseline8Bit,
        JPEGExtended12Bit,
        JPEGLosslessSV1,
        RLELossless,
    )
    return [JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLosslessSV1, RLELossless,
            ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian]


def get_instance(path: str, dest: str | Path) -> Path:
    """C-GET (or, for a path with ``move=PORT``, C-MOVE) one instance, as stored, into
    ``dest``; :class:`PacsError` when it cannot."""
    from pydicom import Dataset
    peer, study, series, sop = parse_path(path)
    got: dict = {}

    def on_store(event):
        ds = event.dataset
        if str(ds.get("SOPInstanceUID", "")) != sop:  # only the instance asked for
            return 0xA700
        ds.file_meta = event.file_meta
        got["ds"] = ds
        return 0x0000

    q = Dataset()
    q.QueryRetrieveLevel = "IMAGE"
    q.StudyInstanceUID, q.SeriesInstanceUID, q.SOPInstanceUID = study, series, sop
    last = (_moved if peer.move_port else _got)(peer, q, on_store)
    if "ds" not in got:
        how = "C-MOVE" if peer.move_port else "C-GET"
        raise PacsError(f"{how} {sop}: the PACS sent no instance (status {last if last is None else hex(last)})")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    got["ds"].save_as(dest, enforce_file_format=True)
    return dest


def _got(peer: Peer, query, on_store) -> int | None:
    """C-GET ``query`` on an association that takes our storage SCP role; the last status."""
    from pynetdicom import build_context, build_role, evt

    # one presentation context per (storage class, transfer syntax): a PACS accepts one syntax per
    # context and picks its own favourite (uncompressed), then cannot send a JPEG 2000 film in it
    contexts = [build_context(GET)] + [build_context(c, ts) for c in STORAGE for ts in _syntaxes()]
    assoc = _associate(peer, contexts, [build_role(c, scp_role=True) for c in STORAGE],
                       [(evt.EVT_C_STORE, on_store)])
    return _statuses(assoc, assoc.send_c_get(query, GET))


def _moved(peer: Peer, query, on_store) -> int | None:
    """C-MOVE ``query`` to our own storage SCP, listening on ``peer.move_port`` only meanwhile
    (one process of this machine at a time: there is one port); the last status."""
    import fcntl
    import tempfile

    from pynetdicom import AE, build_context, evt
    assert peer.move_port is not None
    with open(Path(tempfile.gettempdir()) / f"cxrlabel-move-{peer.move_port}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ae = AE(ae_title=peer.calling)
        ae.network_timeout = ae.dimse_timeout = ae.acse_timeout = _env_number("CXRLABEL_PACS_TIMEOUT", TIMEOUT)
        for c in STORAGE:
            ae.add_supported_context(c, _syntaxes())
        try:
            server = ae.start_server(("", peer.move_port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
        except OSError as e:
            raise PacsUnreachable(f"{peer}: our storage SCP cannot listen on port {peer.move_port} for C-MOVE "
                                  f"({e.strerror}): is another program on it? (--move-port)") from None
        assert server is not None  # block=False: the server, running in its own threads
        try:
            assoc = _associate(peer, [build_context(MOVE)])
            return _statuses(assoc, assoc.send_c_move(query, peer.calling, MOVE))
        finally:
            server.shutdown()


def _statuses(assoc, answers) -> int | None:
    """Read a C-GET's or C-MOVE's answers to the end, then release the association; the last status."""
    try:
        last = None
        for status, _ in answers:
            last = getattr(status, "Status", None)
        return last
    finally:
        assoc.release()


# C-STORE statuses that store the instance: success, and the warnings of coercion, elements
# discarded and a data set that does not match its SOP class (PS3.4 B.2.3)
STORED = frozenset({0x0000, 0xB000, 0xB006, 0xB007})


class Store:
    """A PACS's storage SCP as a destination of results (``export seg|sr --to
    dimse://HOST:PORT?called=AET``): :meth:`store` answers as :meth:`DicomWeb.store` does,
    one association a call, each instance by C-STORE in its own transfer syntax."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        q = parse_qs(parts.query)
        if parts.scheme != "dimse" or not parts.hostname or not q.get("called") or parts.path.strip("/"):
            raise PacsError(f"{url!r}: give a PACS's storage SCP as dimse://HOST:PORT?called=AET "
                            "(its AE title; &calling=AET for ours, CXRLABEL by default)")
        self.peer = Peer.parse(f"{parts.hostname}:{parts.port or 104}", q["called"][0],
                               q.get("calling", [CALLING])[0])
        self.base = (f"{SCHEME}{self.peer.host}:{self.peer.port}?called={quote(self.peer.called)}"
                     f"&calling={quote(self.peer.calling)}")

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def store(self, instances: list[bytes], sop_uids: list[str]) -> list[StoreResult]:
        """C-STORE ``instances`` (DICOM Part 10 bytes); each one's outcome."""
        import io

        import pydicom
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
        from pynetdicom import build_context
        datasets = [pydicom.dcmread(io.BytesIO(b)) for b in instances]
        syntaxes: dict[str, list[str]] = {}
        for ds in datasets:
            own = syntaxes.setdefault(str(ds.SOPClassUID), [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
            if str(ds.file_meta.TransferSyntaxUID) not in own:
                own.insert(0, str(ds.file_meta.TransferSyntaxUID))
        assoc = _associate(self.peer, [build_context(c, ts) for c, ts in syntaxes.items()])
        results = []
        try:
            for ds, sop in zip(datasets, sop_uids, strict=True):
                code = getattr(assoc.send_c_store(ds), "Status", None)
                if code is None:
                    raise PacsUnreachable(f"{self.peer}: the association ended during a C-STORE (timed out or "
                                          "aborted): a later export stores what is left")
                results.append(StoreResult(sop, code in STORED, "" if code in STORED else
                                           f"refused (C-STORE status {code:#06x})"))
        finally:
            assoc.release()
        return results
