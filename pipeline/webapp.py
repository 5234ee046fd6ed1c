"""``cxrlabel review``: the local web app where people review masks (Flask, no build step).

Pages: the worklist (``/``) and one image (``/image/<uid>``); the page's script talks to a
small JSON API (``/api/...``). Everything it reads or writes goes through
:mod:`pipeline.review`; no path and no SQL come from a request: images are found by uid in
the catalogue, filters are bound parameters.

Safety: bound to 127.0.0.1 unless told otherwise, and then only with a token, which every
request must carry (``?token=`` once, then a same-site cookie; or the ``X-Review-Token``
header); the access log never shows it. Every request's ``Host`` must name the address the
app serves (or one given with ``--allow-host``, for a reverse proxy), so a web page that
re-points its own name at 127.0.0.1 (DNS rebinding) gets 421, never the worklist. Writes
take JSON only and their ``Origin`` must be that host, so another web page cannot post to
the app from the reviewer's browser. A bad request is a 4xx with a one-line reason.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import math
import os
import re
import socket
from collections.abc import Sequence
from dataclasses import asdict
from urllib.parse import urlencode, urlsplit

from flask import Flask, Response, abort, jsonify, render_template, request
from sqlalchemy.engine import Engine
from werkzeug.exceptions import HTTPException
from werkzeug.serving import WSGIRequestHandler

from pipeline import review as R
from pipeline.resources import resource

log = logging.getLogger(__name__)

TOKEN_ENV = "CXRLABEL_REVIEW_TOKEN"
COOKIE = "cxrlabel_review_token"
MAX_PAGE = 100_000  # worklist pages of 100: ten million images
MAX_VERSION = 2**31 - 1  # reviews.version is a 32-bit integer
MAX_JSON_DEPTH = 32  # a review body is three levels deep; a deeper one is refused before parsing


class ReviewAppError(R.ReviewError):
    pass


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def is_loopback(host: str) -> bool:
    return host == "localhost" or bool((ip := _ip(host)) and ip.is_loopback)


def check_binding(host: str, token: str | None) -> str | None:
    """The token the app will demand: none on a loopback address without one; elsewhere one
    is required (``--token`` or ``CXRLABEL_REVIEW_TOKEN``)."""
    token = token or os.environ.get(TOKEN_ENV) or None
    if not is_loopback(host) and not token:
        raise ReviewAppError(f"binding to {host} lets other machines in: give --token SECRET (or set {TOKEN_ENV}); "
                             "every request must then carry it")
    if token is not None and len(token) < 8:
        raise ReviewAppError("the review token must be at least 8 characters long")
    return token


def hostname_of(host_header: str) -> str:
    """The name in a ``Host`` header, without its port and brackets, lower-cased."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def allowed_hosts(bind: str, allow: Sequence[str] = ()) -> tuple[frozenset[str], bool]:
    """``(names, any_address)``: the host names a request may use for an app bound to
    ``bind``, plus ``allow`` (``--allow-host``); ``any_address`` when bound to every
    interface, where any IP address literal of this machine's is also taken."""
    names = {hostname_of(h) for h in allow if h.strip()}
    wildcard = bind in ("0.0.0.0", "::", "")
    names.add(hostname_of(bind) if ":" not in bind or bind.startswith("[") else bind.lower())
    if is_loopback(bind) or wildcard:
        names |= {"localhost", "127.0.0.1", "::1"}
    if wildcard:
        names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
    return frozenset(names), wildcard


def _json_depth_ok(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``body``'s brackets nest at most ``limit`` deep (strings skipped): checked before
    parsing, so a deeply nested body costs nothing and never reaches the recursive parser."""
    depth, in_string, escaped = 0, False, False
    for ch in body.decode("utf-8", "replace"):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def _filters(args) -> R.Filters:
    """The worklist filters of a request's query string (bad numbers are a 400)."""
    def number(key: str) -> float | None:
        v = args.get(key, "").strip()
        if not v:
            return None
        try:
            number = float(v)
        except ValueError:
            abort(400, f"{key} must be a number")
        if not math.isfinite(number):  # nan matched nothing: an empty worklist without a word
            abort(400, f"{key} must be a finite number, not {v}")
        return number

    reviewed = {"yes": True, "no": False}.get(args.get("reviewed", ""))
    return R.Filters(group=args.get("group") or None, sample=args.get("sample") or None,
                     view=args.get("view") or None, ctr_min=number("ctr_min"), ctr_max=number("ctr_max"),
                     quality_min=number("quality_min"), quality_max=number("quality_max"), reviewed=reviewed)


def _query(f: R.Filters) -> str:
    """A worklist's filters as a query string, to carry from page to page."""
    values = {k: v for k, v in asdict(f).items() if v is not None}
    if "reviewed" in values:
        values["reviewed"] = "yes" if values["reviewed"] else "no"
    return urlencode(values)


def create_app(engine: Engine, model: str = "default", base: R.Filters | None = None, reviewer: str = "",
               token: str | None = None, bind: str = "127.0.0.1", allow_hosts: Sequence[str] = ()) -> Flask:
    """The review app over ``engine``'s labels by ``model``. ``base``: the selection it was
    started on (``--group``/``--sample``), which page filters narrow but never widen.
    ``bind``: the address it serves, whose names (and ``allow_hosts``) a request's ``Host``
    must use."""
    base = base or R.Filters()
    web = resource("web", "review.html").parent
    app = Flask("cxrlabel.review", template_folder=str(web), static_folder=str(web / "static"),
                static_url_path="/static")
    app.config.update(JSON_SORT_KEYS=False, MAX_CONTENT_LENGTH=8 * 1024 * 1024)
    _guard(app, *allowed_hosts(bind, allow_hosts), token)
    _errors(app)
    _pages(app, engine, model, base, reviewer)
    _api(app, engine, model, reviewer)
    return app


def _guard(app: Flask, hosts: frozenset[str], any_address: bool, token: str | None) -> None:
    """Every request: no NUL, a ``Host`` the app answers to, the token; every response: the
    token's cookie and headers that keep the pages out of frames and sniffing."""

    @app.before_request
    def _guard():
        if "\x00" in request.path or any("\x00" in v for v in request.args.values()):
            abort(400, "NUL characters are not accepted in an address")  # no uid or filter holds one
        name = hostname_of(request.host)
        if name not in hosts and not (any_address and _ip(name) is not None):
            abort(421, f"this review app answers to {', '.join(sorted(hosts))}, not {name[:100]!r}: "
                       "behind a reverse proxy, start it with --allow-host NAME")
        if token is None:
            return None
        given = request.headers.get("X-Review-Token") or request.args.get("token") or request.cookies.get(COOKIE)
        if not given or not hmac.compare_digest(given.encode(), token.encode()):
            abort(401, "this review app needs its token: open the address with ?token=...")
        return None

    @app.after_request
    def _headers(resp: Response) -> Response:
        if token is not None and request.args.get("token"):
            resp.set_cookie(COOKIE, token, httponly=True, samesite="Strict")
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["X-Frame-Options"] = "DENY"
        resp.headers["Referrer-Policy"] = "no-referrer"
        return resp


def _errors(app: Flask) -> None:
    """Errors as JSON for the API (plain text for pages), with the review's own status codes."""

    @app.errorhandler(HTTPException)
    def _http(e: HTTPException):
        if request.path.startswith("/api/"):
            return jsonify(error=e.description), e.code
        return Response(f"{e.code} {e.name}: {e.description}\n", status=e.code, mimetype="text/plain")

    @app.errorhandler(R.ReviewConflict)
    def _conflict(e):
        return jsonify(error=str(e), changed=e.changed), 409

    @app.errorhandler(R.ImageMissing)
    def _missing(e):
        return jsonify(error=str(e)), 404

    @app.errorhandler(R.ReviewError)
    def _bad(e):
        return jsonify(error=str(e)), 400


def _pages(app: Flask, engine: Engine, model: str, base: R.Filters, reviewer: str) -> None:
    """The worklist and one image's review page; a page's filters narrow ``base``, never widen it."""

    def filters() -> R.Filters:
        f = _filters(request.args)
        return R.Filters(**{**asdict(f), "group": base.group or f.group, "sample": base.sample or f.sample})

    @app.get("/favicon.ico")
    def favicon():
        return Response(status=204)

    @app.get("/")
    def worklist_page():
        f = filters()
        arg = request.args.get("page", "0")
        page = int(arg) if arg.isdigit() and len(arg) < 8 else 0
        if page > MAX_PAGE:
            abort(400, f"page must be at most {MAX_PAGE}")
        rows, counts = R.worklist(engine, model, f, limit=100, offset=100 * page)
        return render_template("worklist.html", rows=rows, counts=counts, f=f, model=model, query=_query(f),
                               page=page, base=base)

    @app.get("/image/<path:uid>")
    def image_page(uid: str):
        f = filters()
        view = R.image_view(engine, uid, model)
        prev, nxt = R.neighbours(engine, model, uid, f)
        return render_template("review.html", view=view, prev=prev, next=nxt, query=_query(f), model=model,
                               reviewer=reviewer)


def _api(app: Flask, engine: Engine, model: str, reviewer: str) -> None:
    """One image's labels and pixels as the page reads them, and saving a review (from the app's
    own pages only, JSON of bounded depth, against the version the page loaded)."""

    @app.get("/api/image/<path:uid>")
    def image_json(uid: str):
        return jsonify(R.image_view(engine, uid, model))

    # the uid is the last thing in every route: a route with a suffix after it (``/api/image/<uid>/png``)
    # answered the uid ``sub/png`` with the image ``sub``'s pixels
    @app.get("/api/png/<path:uid>")
    def image_png(uid: str):
        R.image_view(engine, uid, model)  # only images of this model's worklist are served
        png, scale = R.display_png(engine, uid)
        resp = Response(png, mimetype="image/png")
        resp.headers["X-Display-Scale"] = f"{scale:.8f}"
        resp.headers["Cache-Control"] = "private, max-age=3600"
        return resp

    @app.post("/api/review/<path:uid>")
    def review_post(uid: str):
        origin = request.headers.get("Origin")
        if origin is not None:
            o = urlsplit(origin)
            if o.scheme not in ("http", "https") or o.netloc.lower() != request.host.lower():
                abort(403, "a review can only be saved from the review app's own pages")
        if not request.is_json:
            abort(415, "send the review as JSON")
        raw = request.get_data(cache=False)
        if not _json_depth_ok(raw):
            abort(400, f"the review nests deeper than {MAX_JSON_DEPTH} levels")
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            abort(400, "the review is not valid JSON")
        if not isinstance(body, dict):
            abort(400, "the review must be a JSON object")
        seen = body.get("version")
        if not isinstance(seen, int) or isinstance(seen, bool) or not 0 <= seen < MAX_VERSION:
            abort(400, "version must be the version the page loaded")
        # each field as sent, type-checked by R.save: nothing is coerced into a string
        given = body.get("reviewer")
        return jsonify(R.save(engine, uid, model, reviewer if given is None or given == "" else given, seen,
                              body.get("decision", ""), body.get("structure") or "",
                              body.get("polygons"), body.get("note")))


_TOKEN_IN_URL = re.compile(r"(token=)[^&\s]*", re.IGNORECASE)


class RequestLog(WSGIRequestHandler):
    """Werkzeug's access log, with any ``token=`` value in a request line masked."""

    def log(self, type: str, message: str, *args) -> None:  # noqa: A002 (werkzeug's signature)
        super().log(type, message, *(_TOKEN_IN_URL.sub(r"\1***", a) if isinstance(a, str) else a for a in args))


def serve(app: Flask, host: str, port: int) -> None:
    """Serve until interrupted (threaded: several browsers at once)."""
    from werkzeug.serving import make_server
    server = make_server(host, port, app, threaded=True, request_handler=RequestLog)
    log.info("review app on http://%s:%d", host, port)
    try:
        server.serve_forever()
    finally:
        server.server_close()
