"""Pixels on demand: a PACS instance fetched (WADO-RS, as stored) beside its cache entry,
decoded by the same code as a file on disk, then removed (the cache entry is what is kept).

Runs in the decoder processes, so the number of requests in flight is the number of decoder
workers (``--workers``; every core by default): bounded, whatever the selection's size. Each
process keeps one HTTP session per server (its connections reused). A server that stays down
after the bounded retries stops the run (:class:`PacsUnreachable`: a rerun fetches only what
is not cached); one instance the server refuses is that instance's failure.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

from pipeline.pacs.client import SCHEME, DicomWeb, PacsError

_CLIENTS: dict[str, DicomWeb] = {}


# what a fetch reads from the environment: credentials, limits, the netrc file. Decoder processes
# start from a fork server whose environment is the one it began with, so a fetch carries the
# caller's values with it (in memory, to our own processes; never written anywhere)
SETTINGS = ("CXRLABEL_PACS_USER", "CXRLABEL_PACS_PASSWORD", "CXRLABEL_PACS_TOKEN", "CXRLABEL_PACS_TIMEOUT",
            "CXRLABEL_PACS_RETRIES", "CXRLABEL_PACS_BACKOFF", "CXRLABEL_PACS_ALLOW_HTTP", "NETRC", "HOME")


def environment() -> dict[str, str]:
    """This process's PACS settings, to hand to a decoder process (:func:`use_environment`)."""
    return {k: os.environ[k] for k in SETTINGS if k in os.environ}


def use_environment(settings: dict[str, str]) -> None:
    """Make ``settings`` this process's PACS settings (a decoder process, before a fetch);
    sessions made under other settings are dropped."""
    if all(os.environ.get(k) == settings.get(k) for k in SETTINGS):
        return
    for k in SETTINGS:
        if k in settings:
            os.environ[k] = settings[k]
        else:
            os.environ.pop(k, None)
    for client in _CLIENTS.values():
        client.close()
    _CLIENTS.clear()


def is_remote(path: str | None) -> bool:
    """Whether a catalogued path is a PACS instance (DICOMweb or DIMSE), not a file."""
    return bool(path) and str(path).startswith((SCHEME, "dimse://"))


def base_of(url: str) -> str:
    """The DICOMweb base of an instance URL (what precedes ``/studies/``)."""
    return url.split("/studies/", 1)[0]


def client_for(base: str) -> DicomWeb:
    if base not in _CLIENTS:
        _CLIENTS[base] = DicomWeb(base)
    return _CLIENTS[base]


def fetch_to(path: str, dest: str | Path) -> Path:
    """Write the instance ``path`` (``dicomweb+URL``) to ``dest`` (atomically); raise
    :class:`PacsUnreachable` when the server is gone or refuses us, :class:`PacsError` when it
    refuses this instance."""
    if path.startswith("dimse://"):
        from pipeline.pacs.dimse import get_instance
        return get_instance(path, dest)
    url = path[len(SCHEME):]
    data = client_for(base_of(url)).instance(url)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return dest


def remote_header(path: str):
    """A PACS instance's header (WADO-RS metadata, bulk data left out; over DIMSE, the
    instance fetched), or None."""
    import pydicom
    if path.startswith("dimse://"):
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            try:
                return pydicom.dcmread(fetch_to(path, Path(tmp) / "instance.dcm"), stop_before_pixels=True)
            except (PacsError, OSError, pydicom.errors.InvalidDicomError):
                return None
    url = path[len(SCHEME):]
    try:
        meta = client_for(base_of(url)).request("GET", f"{url}/metadata",
                                                headers={"Accept": "application/dicom+json"}).json()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.Dataset.from_json(meta[0], bulk_data_uri_handler=lambda *_: b"")
    except (PacsError, ValueError, IndexError, KeyError, TypeError):
        return None
