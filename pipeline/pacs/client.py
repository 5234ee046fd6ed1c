"""A PACS over DICOMweb: QIDO-RS searches page by page, WADO-RS instances and metadata,
STOW-RS stores; bounded retries with back-off, time-outs, and credentials that never leave the
process.

Credentials come from the environment (``CXRLABEL_PACS_TOKEN``: a bearer token; or
``CXRLABEL_PACS_USER`` and ``CXRLABEL_PACS_PASSWORD``) or, when neither is set, from a netrc
file (``~/.netrc``, or the file ``NETRC`` names: requests reads it). A URL that carries a
user or password is refused (it would land in the database, in logs and in ``status``), and
so is plain HTTP to a host other than this machine unless the user says so (``--allow-http``,
``CXRLABEL_PACS_ALLOW_HTTP=1``). Nothing this module raises or logs holds a credential.

A 401 or 403 is one line, at once (retrying a wrong password only locks accounts); 429, 502,
503, 504, a time-out or a dropped connection are retried :data:`RETRIES` times with
exponential back-off (a ``Retry-After`` the server sends is honoured, up to
:data:`MAX_WAIT` seconds), then one line naming the server and what it answered.

A search or metadata answer is read as it arrives and refused past :data:`MAX_ANSWER_MB`
(``CXRLABEL_PACS_MAX_ANSWER_MB``): a server that ignores ``limit`` and sends its whole
archive in one answer stops the load with one line, before the answer fills the memory.
"""

from __future__ import annotations

import ipaddress
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from pipeline import CxrlabelError

RETRIES = 4  # tries after the first, for the answers worth retrying
BACKOFF = 0.5  # seconds before the first retry; doubled each time
MAX_WAIT = 30.0  # the longest a Retry-After is waited for
TIMEOUT = 60.0  # seconds to connect and between bytes of an answer
RETRY_STATUSES = frozenset({429, 502, 503, 504})
MAX_ANSWER_MB = 256.0  # the most of one search or metadata answer read (a page of 500 instances: ~2 MB)
DICOM_JSON = "application/dicom+json"
SCHEME = "dicomweb+"  # images.path of an instance that lives in a PACS: dicomweb+https://.../instances/SOP


class PacsError(CxrlabelError):
    pass


class PacsUnreachable(PacsError):
    """The server did not answer after the bounded retries, or refuses us: every other request
    would fail the same way, so a run stops (a rerun goes on from where it stopped)."""


class PacsAuthError(PacsUnreachable):
    """The server refused the credentials (or, over DIMSE, the association): never retried."""


def _is_local(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url: str, allow_http: bool | None = None) -> str:
    """``url`` as a DICOMweb base (no trailing slash), or a :class:`PacsError` saying why
    not: no user or password in it, http(s) only, plain HTTP only to this machine unless
    ``allow_http`` (default: ``CXRLABEL_PACS_ALLOW_HTTP=1``)."""
    if allow_http is None:
        allow_http = os.environ.get("CXRLABEL_PACS_ALLOW_HTTP") == "1"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PacsError(f"{_safe(url)}: not a DICOMweb URL: give its base, e.g. https://pacs.example.org/dicom-web")
    if parts.username or parts.password:
        raise PacsError(f"{_safe(url)}: a URL with a user or password in it would be stored with the images: give "
                        "the URL alone and the credentials in CXRLABEL_PACS_USER and CXRLABEL_PACS_PASSWORD (or "
                        "CXRLABEL_PACS_TOKEN, or a netrc entry)")
    if parts.scheme == "http" and not _is_local(parts.hostname) and not allow_http:
        raise PacsError(f"{_safe(url)}: plain HTTP to another machine sends patient data and passwords in the clear: "
                        "use https, or say --allow-http (CXRLABEL_PACS_ALLOW_HTTP=1) on a network you trust")
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def _safe(url: str) -> str:
    """``url`` without any user or password (for messages)."""
    parts = urlsplit(url)
    if parts.password or parts.username:
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
    return url


def _auth_headers() -> tuple[dict[str, str], tuple[str, str] | None]:
    token = os.environ.get("CXRLABEL_PACS_TOKEN")
    if token:
        return {"Authorization": f"Bearer {token}"}, None
    user = os.environ.get("CXRLABEL_PACS_USER")
    if user is not None:
        return {}, (user, os.environ.get("CXRLABEL_PACS_PASSWORD", ""))
    return {}, None  # requests then reads ~/.netrc (or NETRC) for the host


@dataclass
class StoreResult:
    """One instance's outcome of a STOW-RS store."""

    sop_uid: str
    stored: bool
    reason: str = ""


class DicomWeb:
    """One DICOMweb server (``base``: the URL its QIDO/WADO/STOW paths hang from)."""

    def __init__(self, base: str, allow_http: bool | None = None, timeout: float | None = None,
                 retries: int | None = None, backoff: float | None = None) -> None:
        import requests
        self.base = check_url(base, allow_http)
        # each setting: the argument, else the environment (CXRLABEL_PACS_TIMEOUT, _RETRIES, _BACKOFF:
        # what the decoder processes read too), else the module's default
        self.timeout = timeout if timeout is not None else _env_number("CXRLABEL_PACS_TIMEOUT", TIMEOUT)
        self.retries = retries if retries is not None else int(_env_number("CXRLABEL_PACS_RETRIES", RETRIES))
        self.backoff = backoff if backoff is not None else _env_number("CXRLABEL_PACS_BACKOFF", BACKOFF)
        self.max_answer = int(_env_number("CXRLABEL_PACS_MAX_ANSWER_MB", MAX_ANSWER_MB) * 2 ** 20)
        self.session = requests.Session()
        headers, auth = _auth_headers()
        self.session.headers.update(headers)
        if auth:
            self.session.auth = auth

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> DicomWeb:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ requests
    def request(self, method: str, url: str, **kw):
        """``url`` (a path under the base, or a full URL on the same server) with bounded
        retries; the response of a 2xx, else a one-line :class:`PacsError`."""
        import requests
        full = url if url.startswith(("http://", "https://")) else f"{self.base}/{url.lstrip('/')}"
        what = f"{method} {_safe(full).split('?')[0]}"
        last = ""
        for attempt in range(self.retries + 1):
            try:
                r = self.session.request(method, full, timeout=self.timeout, **kw)
            except (requests.ConnectionError, requests.Timeout) as e:
                last = "no answer (" + ("timed out" if isinstance(e, requests.Timeout) else "connection failed") + ")"
                wait = self.backoff * 2 ** attempt
            else:
                if r.status_code in (401, 403):
                    raise PacsAuthError(f"{self.base}: the server refused the credentials ({r.status_code}) for "
                                        f"{what}: set CXRLABEL_PACS_USER and CXRLABEL_PACS_PASSWORD (or "
                                        "CXRLABEL_PACS_TOKEN, or a netrc entry for the host)")
                if r.status_code < 400:
                    return r
                last = f"HTTP {r.status_code}"
                if r.status_code not in RETRY_STATUSES:
                    raise PacsError(f"{what}: {last}{_reason(r)}")
                wait = _retry_after(r) or self.backoff * 2 ** attempt
            if attempt < self.retries:
                time.sleep(min(wait, MAX_WAIT))
        raise PacsUnreachable(f"{what}: {last} after {self.retries + 1} tries: is the server up? A later run goes "
                              "on from where this one stopped")

    # ------------------------------------------------------------ QIDO-RS
    def search(self, level: str, params: dict, page: int = 500) -> Iterator[list[dict]]:
        """Pages of QIDO-RS ``level`` (``instances``, ``series``, ``studies``) matches of
        ``params``, ``page`` at a time (``limit``/``offset``). A server that ignores the
        offset (the second page begins as the first did) stops the search with a
        :class:`PacsError` instead of looping; one that returns more than asked is read
        as it comes."""
        offset, first_key = 0, None
        while True:
            r = self.request("GET", level, params={**params, "limit": page, "offset": offset},
                             headers={"Accept": DICOM_JSON}, stream=True)
            rows = self._json(r, f"{self.base}/{level}", f"the answer to a page of {page} matches")
            if not isinstance(rows, list):
                raise PacsError(f"{self.base}/{level}: the answer is not a list of DICOM JSON objects")
            if not rows:
                return
            key = _first_uid(rows)
            if offset and key is not None and key == first_key:
                raise PacsError(f"{self.base}/{level}: the server ignores the QIDO offset (page {offset // page + 1} "
                                "repeats the first): narrow the search so one answer holds it (--study-date "
                                "ranges), or raise --page-size above the matches")
            first_key = first_key if offset else key
            yield rows
            if len(rows) < page:
                return
            offset += len(rows)

    # ------------------------------------------------------------ WADO-RS
    def series_metadata(self, study: str, series: str) -> list[dict]:
        """Every instance's header of a series (all but bulk data), in DICOM JSON."""
        r = self.request("GET", f"studies/{study}/series/{series}/metadata", headers={"Accept": DICOM_JSON},
                         stream=True)
        rows = self._json(r, f"{self.base}/studies/{study}/series/{series}/metadata", "the series' metadata")
        if not isinstance(rows, list):
            raise PacsError(f"{self.base}: the metadata of series {series} is not a list of DICOM JSON objects")
        return rows

    def _json(self, r, where: str, what: str):
        """The DICOM JSON of a streamed answer, read as it arrives and refused past
        :attr:`max_answer` bytes ([] for an empty answer)."""
        import requests
        chunks, size = [], 0
        try:
            with r:
                for chunk in r.iter_content(2 ** 20):
                    size += len(chunk)
                    if size > self.max_answer:
                        raise PacsError(
                            f"{where}: {what} ran past {self.max_answer / 2 ** 20:g} MB: the server ignores the "
                            "QIDO limit, or a series is huge; narrow the search (--study-date ranges) or raise "
                            "CXRLABEL_PACS_MAX_ANSWER_MB")
                    chunks.append(chunk)
        except requests.RequestException as e:
            raise PacsUnreachable(f"{where}: the answer broke off ({type(e).__name__}): is the server up? A later "
                                  "run goes on from where this one stopped") from None
        body = b"".join(chunks)
        try:
            return json.loads(body) if body.strip() else []
        except ValueError:
            raise PacsError(f"{where}: the answer is not DICOM JSON") from None

    def instance(self, url: str) -> bytes:
        """One instance as stored (its own transfer syntax, so the reduced-size decoders
        apply): the first part of the multipart answer."""
        r = self.request("GET", url, headers={
            "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
        parts = multipart_parts(r.content, r.headers.get("Content-Type", ""))
        if not parts:
            raise PacsError(f"{_safe(url)}: the server answered without a DICOM part")
        return parts[0]

    # ------------------------------------------------------------ STOW-RS
    def store(self, instances: list[bytes], sop_uids: list[str], study: str | None = None) -> list[StoreResult]:
        """Store ``instances`` (DICOM Part 10 bytes) in one STOW-RS request; each instance's
        outcome (a 202 can store some and refuse others)."""
        boundary = uuid.uuid4().hex
        body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + d + b"\r\n"
                        for d in instances) + b"--" + boundary.encode() + b"--\r\n"
        r = self.request("POST", f"studies/{study}" if study else "studies", data=body, headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": DICOM_JSON})
        return _store_results(r, sop_uids)


def _env_number(name: str, default: float) -> float:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        raise PacsError(f"{name}={text!r}: a number, e.g. {default:g}") from None
    if not 0 <= value < 1e6:
        raise PacsError(f"{name}={text!r}: a number from 0, e.g. {default:g}")
    return value


def _reason(r) -> str:
    text = (r.text or "").strip().splitlines()
    return f": {text[0][:200]}" if text else ""


def _retry_after(r) -> float | None:
    try:
        return float(r.headers.get("Retry-After", ""))
    except ValueError:
        return None


def _first_uid(rows: list[dict]) -> str | None:
    first = rows[0] if rows else {}
    for tag in ("00080018", "0020000E", "0020000D"):
        v = first.get(tag, {}).get("Value") if isinstance(first, dict) else None
        if v:
            return str(v[0])
    return None


def multipart_parts(body: bytes, content_type: str) -> list[bytes]:
    """The parts of a ``multipart/related`` body (their headers dropped)."""
    boundary = next((p.split("=", 1)[1].strip().strip('"') for p in content_type.split(";")
                     if p.strip().lower().startswith("boundary=")), None)
    if not boundary:
        return [body] if body.startswith(b"\0" * 128 + b"DICM") or body[128:132] == b"DICM" else []
    delimiter = b"--" + boundary.encode()
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        head, sep, payload = chunk.partition(b"\r\n\r\n")
        if sep:
            parts.append(payload[:-2] if payload.endswith(b"\r\n") else payload)
    return parts


def _store_results(r, sop_uids: list[str]) -> list[StoreResult]:
    """Per instance: stored (ReferencedSOPSequence) or refused (FailedSOPSequence, its
    FailureReason); an instance the answer does not name counts as stored on a 200."""
    try:
        answer = r.json() if r.content.strip() else {}
    except ValueError:
        answer = {}
    if isinstance(answer, list):
        answer = answer[0] if answer else {}
    failed: dict[str, str] = {}
    for item in (answer.get("00081198", {}) or {}).get("Value", []) or []:
        sop = (item.get("00081155", {}).get("Value") or [""])[0]
        reason = (item.get("00081197", {}).get("Value") or [""])[0]
        failed[sop] = f"refused (FailureReason {reason:#06x})" if isinstance(reason, int) else "refused"
    return [StoreResult(s, s not in failed, failed.get(s, "")) for s in sop_uids]


def dicom_json_value(item: dict, tag: str) -> str | None:
    """A DICOM JSON element's first value as text (a person name's alphabetic form)."""
    v = item.get(tag, {}).get("Value")
    if not v:
        return None
    first = v[0]
    if isinstance(first, dict):
        first = first.get("Alphabetic")
    return None if first is None else str(first)
