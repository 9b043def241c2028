"""``lrm human-eval serve``: the local web server of a human pairwise study.

Library choice: the standard library's ``http.server.ThreadingHTTPServer``, not Starlette/FastAPI or Flask.
The page needs five routes (the page, ``api/next``, ``api/vote``, ``media/<token>/<side>``, ``health``), JSON
bodies and file bytes, for a handful of raters on one machine or a lab network. Correctness under concurrent
raters comes from SQLite transactions (``eval.human_eval.store``), not from the web layer, so an ASGI framework
(Starlette/FastAPI + uvicorn: five to eight packages, an event loop around a blocking database) or Flask (whose
development server is the same kind of threaded server) would add dependencies without making a vote safer. With
the standard library the study runs wherever the toolkit runs, offline, with nothing to install. The cost is a few
lines of routing and request checks, done here: a body size limit, JSON-only bodies, unknown fields refused.
The server is meant for trusted networks: it has no TLS and no login; it binds 127.0.0.1 unless told otherwise.

Routes:
    GET  /                      the voting page (``eval.human_eval.page``)
    POST /api/next              {rater, page_version} -> the pair to show (token, prompt, media) or {done: true}
    POST /api/vote              {token, rater, choice, page_version, client_ms} -> {ok, progress}
    GET  /media/<token>/<side>  the sample on that side (sha256-checked; animations as one sprite sheet)
    GET  /api/health            {ok, votes}
Errors are JSON ``{"error": message}`` with a 4xx status; nothing is stored for a refused request.
"""

from __future__ import annotations

import io
import ipaddress
import json
import math
import re
import signal
import sys
import threading
import traceback
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from eval.human_eval.page import render_page
from eval.human_eval.store import VoteError, VoteStore
from eval.human_eval.study import Sample, Study, StudyError, media_type

PAGE_VERSION = "1"
MAX_BODY = 4096  # bytes of a JSON request body
DRAIN_LIMIT = 1 << 20  # a larger body is not read: the connection is closed instead
BOX = 448  # display box (CSS px) of the larger sample's longer side
NEXT_FIELDS = {"rater", "page_version"}
VOTE_FIELDS = {"token", "rater", "choice", "page_version", "client_ms"}
MEDIA_RE = re.compile(r"^/media/([A-Za-z0-9_-]{1,100})/(left|right)$")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def display_box(a: Sample, b: Sample, box: int = BOX) -> dict[str, Any]:
    """One display size for both samples: the larger one scaled to fit ``box`` px (whole-number upscaling for
    small samples, drawn pixelated)."""
    w, h = max(a.width, b.width), max(a.height, b.height)
    scale = min(box / w, box / h)
    if scale >= 1:
        scale = float(math.floor(scale))
    return {"width": int(round(w * scale)), "height": int(round(h * scale)), "pixelated": scale >= 2}


def sprite_sheet(data: bytes) -> tuple[bytes, int]:
    """An animated WebP/GIF (its bytes) as one PNG sprite sheet (frames row-major, ``cols`` per row) and ``cols``."""
    from PIL import Image, ImageSequence

    with Image.open(io.BytesIO(data)) as im:
        frames = [f.convert("RGBA") for f in ImageSequence.Iterator(im)]
    n = len(frames)
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    w, h = frames[0].size
    sheet = Image.new("RGBA", (cols * w, rows * h))
    for i, f in enumerate(frames):
        sheet.paste(f, ((i % cols) * w, (i // cols) * h))
    buf = io.BytesIO()
    sheet.save(buf, "PNG")
    return buf.getvalue(), cols


class HumanEvalServer(ThreadingHTTPServer):
    """The study's server. ``HumanEvalServer(study_dir, port=0).start()`` serves in a background thread (tests);
    ``serve`` runs it in the foreground. Every sample file is re-hashed before the server opens (a changed sample
    is a ``StudyError``), and again whenever it is sent."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, study_dir: str | Path, host: str = "127.0.0.1", port: int = 8765, verify: bool = True,
                 seed: int | None = None):
        self.study = Study.load(study_dir)
        if verify:
            self.study.verify()
        if not is_loopback(host):
            warnings.warn(f"binding to {host}: anyone who can reach this machine on port {port} can see the samples "
                          "and vote (no login, no TLS); bind 127.0.0.1 (the default) unless raters need the network",
                          UserWarning, stacklevel=2)
        self.store = VoteStore(self.study, seed=seed)
        self.page = render_page(self.study.title, self.study.study_id, PAGE_VERSION)
        self._sprites: dict[str, tuple[bytes, int]] = {}
        self._sprite_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        super().__init__((host, port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{port}/"

    def start(self) -> HumanEvalServer:
        self._thread = threading.Thread(target=self.serve_forever, name="lrm-human-eval", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self.shutdown()
            self._thread.join(timeout=10)
        self.server_close()
        self.store.close()

    def sprite(self, s: Sample, data: bytes) -> tuple[bytes, int]:
        """The sprite sheet of an animated sample whose (checked) bytes are ``data``; cached by sha256."""
        with self._sprite_lock:
            hit = self._sprites.get(s.sha256)
        if hit is None:
            hit = sprite_sheet(data)
            with self._sprite_lock:
                if len(self._sprites) > 512:
                    self._sprites.clear()
                self._sprites[s.sha256] = hit
        return hit

    def media_info(self, token: str, side: str, s: Sample) -> dict[str, Any]:
        info = {"url": f"media/{token}/{side}", "kind": s.kind, "width": s.width, "height": s.height,
                "frames": s.frames, "fps": s.fps}
        if s.kind == "animation":
            info["cols"] = max(1, math.ceil(math.sqrt(s.frames)))
        return info


class Handler(BaseHTTPRequestHandler):
    server: HumanEvalServer
    server_version = "lrm-human-eval/" + PAGE_VERSION
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: errors are logged in _error
        pass

    # ---- responses ------------------------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json; charset=utf-8")

    def _error(self, status: int, message: str) -> None:
        if status >= 409 or status == 403:
            print(f"lrm human-eval: {status} {self.command} {self.path}: {message}", file=sys.stderr)
        self._json(status, {"error": message})

    # ---- requests -------------------------------------------------------------------------------------------------
    def _read_body(self) -> bytes:
        """The request body (read once, so an error answer never leaves unread bytes on a kept-alive socket)."""
        if getattr(self, "_raw", None) is not None:
            return self._raw
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            raise VoteError(411, "the request needs a Content-Length")
        n = int(length)
        if n > MAX_BODY:
            if n <= DRAIN_LIMIT:
                self.rfile.read(n)
            self.close_connection = True
            raise VoteError(413, f"the body has {n} bytes, at most {MAX_BODY} are read")
        self._raw = self.rfile.read(n)
        return self._raw

    def _body(self, allowed: set[str]) -> dict[str, Any]:
        raw = self._read_body()
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise VoteError(415, f"send a JSON body (Content-Type: application/json), got {ctype or 'none'!r}")
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise VoteError(400, f"the body is not valid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise VoteError(400, f"the body must be a JSON object with {sorted(allowed)}, got {type(obj).__name__}")
        unknown = sorted(set(obj) - allowed)
        if unknown:
            raise VoteError(400, f"unknown field(s) {unknown}; expected {sorted(allowed)}")
        return obj

    def _version(self, obj: dict[str, Any]) -> None:
        v = obj.get("page_version")
        if v != PAGE_VERSION:
            raise VoteError(409, f"this page is version {v!r}, the server runs version {PAGE_VERSION!r}: reload the "
                                 "page")

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path in ("/", "/index.html"):
                return self._send(200, self.server.page, "text/html; charset=utf-8")
            if path == "/api/health":
                return self._json(200, {"ok": True, "votes": self.server.store.n_votes()})
            if path == "/favicon.ico":
                return self._send(204, b"", "image/x-icon")
            m = MEDIA_RE.match(path)
            if m:
                return self._media(m.group(1), m.group(2))
            if path in ("/api/next", "/api/vote"):
                raise VoteError(405, f"{path} takes POST with a JSON body")
            raise VoteError(404, f"no page {path}")
        except VoteError as e:
            self._error(e.status, str(e))
        except StudyError as e:
            self._error(409, str(e))
        except Exception as e:  # a bug: answer (the page shows it) and keep the traceback for the operator
            traceback.print_exc()
            self._error(500, f"internal error: {type(e).__name__}: {e}")

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        self._raw = None
        try:
            if path == "/api/next":
                obj = self._body(NEXT_FIELDS)
                self._version(obj)
                return self._next(obj.get("rater"))
            if path == "/api/vote":
                obj = self._body(VOTE_FIELDS)
                missing = sorted(f for f in ("token", "rater", "choice", "page_version") if f not in obj)
                if missing:
                    raise VoteError(400, f"a vote needs {missing}")
                self._version(obj)
                row = self.server.store.served(obj["token"]) if isinstance(obj["token"], str) else None
                if row is not None:  # a vote on a sample that changed since prepare is not a vote on the sample
                    study = self.server.study
                    for ck in (row["left_ckpt"], row["right_ckpt"]):
                        study.check_file(study.sample(ck, row["prompt_id"], row["seed"]))
                progress = self.server.store.vote(obj["token"], obj["rater"], obj["choice"], obj["page_version"],
                                                  obj.get("client_ms"))
                return self._json(200, {"ok": True, "progress": progress})
            self._read_body()
            raise VoteError(404 if path not in ("/", "/api/health") else 405, f"no POST route {path}")
        except VoteError as e:
            self._error(e.status, str(e))
        except StudyError as e:
            self._error(409, str(e))
        except Exception as e:  # a bug: nothing was committed (each write is one transaction)
            traceback.print_exc()
            self._error(500, f"internal error: {type(e).__name__}: {e}")

    def _next(self, rater: Any) -> None:
        store = self.server.store
        pair = store.next_pair(rater, PAGE_VERSION)
        progress = store.progress(rater)
        if pair is None:
            return self._json(200, {"done": True, "progress": progress})
        tok = pair["token"]
        self._json(200, {"done": False, "token": tok, "prompt": pair["prompt"], "progress": progress,
                         "page_version": PAGE_VERSION, "box": display_box(pair["left"], pair["right"]),
                         "left": self.server.media_info(tok, "left", pair["left"]),
                         "right": self.server.media_info(tok, "right", pair["right"])})

    def _media(self, token: str, side: str) -> None:
        row = self.server.store.served(token)
        if row is None:
            raise VoteError(404, "no sample for this token: the pair was not served by this study")
        study = self.server.study
        s = study.sample(row["left_ckpt"] if side == "left" else row["right_ckpt"], row["prompt_id"], row["seed"])
        try:
            data = Path(s.path).read_bytes()
        except OSError:
            raise StudyError(f"sample file {s.path} is missing; restore it or prepare a new study") from None
        study.check_file(s, data)  # the bytes about to be sent are the prepared ones
        if s.kind == "animation":
            sheet, _ = self.server.sprite(s, data)
            return self._send(200, sheet, "image/png")
        if s.kind == "video":
            return self._range(data, media_type(s.path))
        return self._send(200, data, media_type(s.path))

    def _range(self, data: bytes, ctype: str) -> None:
        """Videos: honour a single ``Range: bytes=a-b`` (browsers seek and loop with them)."""
        rng = self.headers.get("Range")
        m = re.match(r"^bytes=(\d*)-(\d*)$", rng or "")
        if not m or (not m.group(1) and not m.group(2)):
            return self._send(200, data, ctype, {"Accept-Ranges": "bytes"})
        n = len(data)
        if m.group(1):
            a, b = int(m.group(1)), int(m.group(2)) if m.group(2) else n - 1
        else:
            a, b = max(0, n - int(m.group(2))), n - 1
        if a >= n or a > b:
            return self._send(416, b"", ctype, {"Content-Range": f"bytes */{n}"})
        b = min(b, n - 1)
        self._send(206, data[a:b + 1], ctype, {"Accept-Ranges": "bytes", "Content-Range": f"bytes {a}-{b}/{n}"})


def serve(study_dir: str | Path, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve the study until Ctrl+C."""
    server = HumanEvalServer(study_dir, host=host, port=port)
    s = server.study
    print(f"human evaluation of {len(s.checkpoints)} checkpoints ({len(s.pairs)} pairs), {len(s.prompts)} prompts x "
          f"{len(s.seeds)} seeds, {s.quota} comparisons per rater; votes in {server.store.path} "
          f"({server.store.n_votes()} so far)")
    print(f"open {server.url} (Ctrl+C stops; votes are kept)")
    if threading.current_thread() is threading.main_thread():  # `kill` stops it like Ctrl+C

        def _stop(signum, frame):
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, _stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.server_close()
        server.store.close()
