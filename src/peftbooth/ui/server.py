"""The HTTP side: a JSON API and one static page, on the standard library's threading HTTP server.

Every request passes `Handler.allowed` first: with a token (required off 127.0.0.1), the token must come with it;
without one, the Host header must be this loopback address (a page on another site that resolves its own name to
127.0.0.1 gets nothing). Requests that change something must also come from this page's own origin.
"""

from __future__ import annotations

import hmac
import json
import mimetypes
import os
import re
import shutil
import sys
import traceback
import zipfile
from http import HTTPStatus
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from ..config.sections import UsageError
from ..runs.rundir import RunDir
from . import files, runs, schema, tryit
from .api import FORM, Api

STATIC = Path(__file__).parent / "static"
MAX_JSON_BYTES = 1 << 20
TOKEN_ENV = "PEFTBOOTH_UI_TOKEN"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
COOKIE = "peftbooth_ui_token"
# the page loads nothing from anywhere else: no CDN, no web fonts, no analytics
CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; connect-src 'self'; "
       "frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
REPORT_CSP = "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; frame-ancestors 'self'"


class App:
    """What the handlers share: the runs folder, the folders the page may read, the queue, the loaded models."""

    def __init__(self, runs_dir: Path, allowed_dirs: list[Path], token: str | None, port: int):
        self.runs_dir = runs_dir.resolve()
        self.roots = [self.runs_dir] + [d.resolve() for d in allowed_dirs]
        self.token = token
        self.port = port
        self.queue = runs.Queue(self.runs_dir)
        self.studio = tryit.Studio()

    # --- run folders
    def run(self, name: str, must_exist: bool = True) -> Path:
        path = files.run_dir(self.runs_dir, name)
        if must_exist and not path.is_dir():
            raise NotFound(f"no run named {name!r}")
        return path

    def photo_dir(self, run: Path) -> Path:
        """Where this run's photos are: uploads in RUN/photos, or a folder named on the page."""
        draft = read_json(run / files.UI_DIR / "draft.json")
        typed = draft.get("instance_data_dir")
        return Path(typed) if typed else run / files.PHOTOS

    def detail(self, run: Path) -> dict:
        out = runs.summary(run, self.queue.queued())
        out.update(runs.progress(run))
        folder = self.photo_dir(run)
        out["photo_dir"] = str(folder)
        config_file = RunDir(run).config_file
        out["config"] = str(config_file)
        out["photos"] = files.photos_of(folder)
        try:
            out["settings"] = schema.values_of(config_file) if config_file.is_file() else None
        except Exception:  # noqa: BLE001 - a hand-edited config.yaml (bad YAML, unknown key) must not hide progress
            out["settings"] = None
        out["finished_runs"] = [p.name for p in self.queue.runs() if RunDir(p).is_finished()]
        # a draft has no config.yaml yet: no command to give, and its last checked form comes back for "Edit"
        out["command"] = f"peftbooth train --config {config_file}" if config_file.is_file() else None
        out["form"] = read_json(run / files.UI_DIR / FORM) if out["state"] == "draft" else None
        out["fused"] = (run / files.UI_DIR / tryit.FUSED).is_dir()
        return out


class NotFound(Exception):
    pass


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class Handler(Api, BaseHTTPRequestHandler):
    server_version = "peftbooth-ui"
    app: App  # set on the subclass made by `make_server`

    def log_message(self, format, *args):  # the terminal shows errors only, not every poll
        pass

    # --- access checks
    def allowed(self) -> bool:
        app = self.app
        if app.token:
            given = self.headers.get("X-Peftbooth-Token") or ""
            cookie = SimpleCookie(self.headers.get("Cookie") or "")
            if not given and COOKIE in cookie:
                given = cookie[COOKIE].value
            if not given:
                given = (parse_qs(urlsplit(self.path).query).get("token") or [""])[0]
            if not hmac.compare_digest(given.encode(), app.token.encode()):
                self.send_json({"error": f"token required: open the URL with ?token=<{TOKEN_ENV}>"},
                               HTTPStatus.UNAUTHORIZED)
                return False
        else:
            host = (self.headers.get("Host") or "").lower()
            if host not in {f"{h}:{app.port}" for h in ("127.0.0.1", "localhost", "[::1]")}:
                self.send_json({"error": "wrong Host"}, HTTPStatus.FORBIDDEN)
                return False
        if self.command != "GET":
            origin = self.headers.get("Origin")
            if origin is not None and urlsplit(origin).netloc.lower() != (self.headers.get("Host") or "").lower():
                self.send_json({"error": "cross-origin request refused"}, HTTPStatus.FORBIDDEN)
                return False
        return True

    # --- responses
    def send_body(self, body: bytes, ctype: str, status=HTTPStatus.OK, headers: dict | None = None):
        self.send_response(status)
        self.send_common(ctype, dict(headers or {}))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, data, status=HTTPStatus.OK):
        self.send_body(json.dumps(data).encode(), "application/json", status)

    def send_file(self, path: Path, download: bool = False, csp: str = CSP, filename: str | None = None):
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        headers = {"csp": csp}
        if download or not ctype.startswith(("image/", "text/html", "text/css", "text/javascript", "application/json")):
            headers["Content-Disposition"] = f'attachment; filename="{filename or path.name}"'
        self.send_response(HTTPStatus.OK)
        self.send_common(ctype, headers)
        self.send_header("Content-Length", str(path.stat().st_size))
        self.end_headers()
        if self.command != "HEAD":
            with open(path, "rb") as f:  # streamed: an export or a fused model can be gigabytes
                shutil.copyfileobj(f, self.wfile, 1 << 20)

    def send_common(self, ctype: str, headers: dict) -> None:
        self.send_header("Content-Type", ctype)
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", headers.pop("csp", CSP))
        for k, v in headers.items():
            self.send_header(k, v)

    def body(self, limit: int = MAX_JSON_BYTES) -> bytes:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise UsageError("bad Content-Length") from None
        if length > limit:
            message = f"upload of {length / 2**20:.1f} MB is over the {limit // 2**20} MB limit"
            if length <= 4 * limit:  # read and dropped in chunks, so the browser gets this answer, not a reset
                left = length
                while left > 0:
                    left -= len(self.rfile.read(min(1 << 16, left))) or left  # or: the client stopped sending
            else:  # far too big to bother: the body is not read, and this connection cannot be reused
                self.close_connection = True
            raise TooLarge(message)
        return self.rfile.read(length)

    def json_body(self) -> dict:
        try:
            data = json.loads(self.body() or b"{}")
        except ValueError:
            raise UsageError("request body is not JSON") from None
        if not isinstance(data, dict):
            raise UsageError("request body must be a JSON object")
        return data

    # --- dispatch
    def do_GET(self):
        self.dispatch("GET")

    def do_HEAD(self):
        self.dispatch("GET")

    def do_POST(self):
        self.dispatch("POST")

    def do_PUT(self):
        self.dispatch("PUT")

    def do_DELETE(self):
        self.dispatch("DELETE")

    def dispatch(self, method: str):
        if not self.allowed():
            return
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        try:
            for pattern_method, pattern, func in ROUTES:
                m = pattern.fullmatch(path)
                if m and pattern_method == method:
                    return func(self, query, *m.groups())
            raise NotFound(f"{method} {path}: no such page")
        except NotFound as e:
            self.send_json({"error": str(e)}, HTTPStatus.NOT_FOUND)
        except tryit.Exists as e:  # the page asks whether to replace it
            self.send_json({"error": str(e), "exists": True}, HTTPStatus.CONFLICT)
        except TooLarge as e:
            self.send_json({"error": str(e)}, HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        except UsageError as e:
            self.send_json({"error": str(e)}, HTTPStatus.BAD_REQUEST)
        except Exception as e:  # noqa: BLE001 - shown on the page and in the terminal; the server goes on
            traceback.print_exc(file=sys.stderr)
            self.send_json({"error": f"{type(e).__name__}: {e}"}, HTTPStatus.INTERNAL_SERVER_ERROR)

    # --- pages
    def index(self, query):
        headers = {}
        if self.app.token:  # the token came in the URL: keep it in a cookie, so images and downloads carry it
            headers["Set-Cookie"] = f"{COOKIE}={self.app.token}; HttpOnly; SameSite=Strict; Path=/"
        self.send_body((STATIC / "index.html").read_bytes(), "text/html; charset=utf-8", headers=headers)

    def static(self, query, name):
        if name not in {p.name for p in STATIC.iterdir()}:
            raise NotFound(name)
        self.send_file(STATIC / name)

    def run_file(self, query, name, rel):
        run = self.app.run(name)
        try:
            path = files.file_in(run, rel)
        except UsageError as e:
            raise NotFound(str(e)) from None
        csp = REPORT_CSP if path.suffix == ".html" else CSP
        as_name = (query.get("as") or [""])[0]
        self.send_file(path, download="download" in query, csp=csp,
                       filename=files.safe_name(as_name, "file name") if as_name else None)

    def fused_zip(self, query, name):
        """RUN/ui/fused/ as one zip, written straight into the response (no second copy on disk). Stored, not
        compressed: safetensors do not shrink. HTTP/1.0: the end of the connection ends the file."""
        folder = self.app.run(name) / files.UI_DIR / tryit.FUSED
        if not folder.is_dir():
            raise NotFound(f"run {name}: not fused yet")
        self.send_response(HTTPStatus.OK)
        self.send_common("application/zip", {"Content-Disposition": f'attachment; filename="{name}-fused.zip"'})
        self.end_headers()
        self.close_connection = True
        with zipfile.ZipFile(self.wfile, "w", zipfile.ZIP_STORED) as z:
            for f in sorted(folder.rglob("*")):
                if f.is_file():
                    z.write(f, f"{name}-fused/{f.relative_to(folder).as_posix()}")

    def photo(self, query, name, photo):
        run = self.app.run(name)
        folder = self.app.photo_dir(run)
        try:
            path = files.file_in(folder, files.safe_name(photo, "photo"))
        except UsageError as e:
            raise NotFound(str(e)) from None
        if path.suffix.lower() not in files.IMAGE_EXTENSIONS:
            raise NotFound(photo)
        self.send_file(path)


class TooLarge(Exception):
    pass


NAME = r"([A-Za-z0-9_-]+)"
ROUTES = [(m, re.compile(p), f) for m, p, f in [
    ("GET", r"/", Handler.index),
    ("GET", r"/static/([A-Za-z0-9_.-]+)", Handler.static),
    ("GET", rf"/runs/{NAME}/file/(.+)", Handler.run_file),
    ("GET", rf"/runs/{NAME}/photo/([^/]+)", Handler.photo),
    ("GET", rf"/runs/{NAME}/fused\.zip", Handler.fused_zip),
    ("GET", r"/api/schema", Handler.api_schema),
    ("GET", r"/api/runs", Handler.api_runs),
    ("POST", r"/api/runs", Handler.api_new_run),
    ("POST", r"/api/defaults", Handler.api_defaults),
    ("POST", r"/api/new/check", Handler.api_check_new),
    ("POST", r"/api/new/start", Handler.api_start_new),
    ("GET", rf"/api/runs/{NAME}", Handler.api_run),
    ("DELETE", rf"/api/runs/{NAME}", Handler.api_delete),
    ("POST", rf"/api/runs/{NAME}/photos", Handler.api_upload),
    ("POST", rf"/api/runs/{NAME}/folder", Handler.api_folder),
    ("PUT", rf"/api/runs/{NAME}/caption", Handler.api_caption),
    ("POST", rf"/api/runs/{NAME}/check", Handler.api_check),
    ("POST", rf"/api/runs/{NAME}/start", Handler.api_start),
    ("POST", rf"/api/runs/{NAME}/queue", Handler.api_queue),
    ("POST", rf"/api/runs/{NAME}/stop", Handler.api_stop),
    ("POST", rf"/api/runs/{NAME}/resume", Handler.api_resume),
    ("GET", rf"/api/runs/{NAME}/samples", Handler.api_samples),
    ("POST", rf"/api/runs/{NAME}/generate", Handler.api_generate),
    ("POST", rf"/api/runs/{NAME}/export", Handler.api_export),
    ("POST", rf"/api/runs/{NAME}/fuse", Handler.api_fuse),
]]


def make_server(runs_dir: Path, host: str = "127.0.0.1", port: int = 7860,
                allowed_dirs: list[Path] | None = None) -> ThreadingHTTPServer:
    """A server for `runs_dir` on host:port (port 0: a free one). Off 127.0.0.1 a token is required, from the
    PEFTBOOTH_UI_TOKEN environment variable (never a flag: flags show up in `ps` and shell history)."""
    token = os.environ.get(TOKEN_ENV) or None
    if host not in LOCAL_HOSTS and not token:
        raise UsageError(f"--host {host}: serving beyond this machine needs a token; set {TOKEN_ENV} to a long "
                         "random string (the page is then opened with ?token=...)")
    if token is not None and len(token) < 16:
        raise UsageError(f"{TOKEN_ENV}: use at least 16 characters")
    for d in allowed_dirs or []:
        if not d.is_dir():
            raise UsageError(f"--allow-dir {d}: no such folder")
    runs_dir.mkdir(parents=True, exist_ok=True)
    handler = type("BoundHandler", (Handler,), {})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    handler.app = App(runs_dir, allowed_dirs or [], token, server.server_address[1])
    return server
