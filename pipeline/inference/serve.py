"""A search page and a JSON API over one index: `python -m pipeline.search serve --index INDEX`.

    GET  /                       the page: text box, image upload, k, results, the run's model card
    GET  /api/query?text=...&k=10            the JSON line `python -m pipeline.search query --text` prints
    POST /api/query  (multipart: file `image`, field `k`)   the line `query --image` prints, `query` being
                                                        the uploaded file's name
    GET  /api/item/<position>    a gallery image (image galleries) or text (text galleries), by position
    GET  /api/info               the index and the model card as JSON

Every answer of /api/query is made by the index's own ranking and `SearchIndex.line`, the code the
`query` command prints with, so the API answers exactly what the command prints; the response's
`X-Positions` header lists each result's gallery position (what /api/item takes).

Safe by default: the server binds 127.0.0.1; gallery files are served by position only, from the
index's own list, and only when they still lie inside the folder the index was built from (a file
replaced by a link leading outside it is refused); an upload over MAX_UPLOAD bytes or MAX_PIXELS, not
an image, or one that fails to decode gets a 400 with a one-line reason. Queries are answered one at a time (the
model uses torch's threads; the tokenizer is not safe to share between threads); requests wait their
turn. This module receives an opened `SearchIndex` (pipeline/inference/search.py opens it, refusing an
index whose run's weights changed), so it imports nothing from the command.
"""
from __future__ import annotations

import io
import json
import sys
import threading
from pathlib import Path

from flask import Flask, Response, render_template_string, request, send_file
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.serving import make_server

from pipeline.inference.export import family_line
from pipeline.inference.folder import decode_image
from pipeline.inference.serve_page import PAGE, SCRIPT, STYLE
from pipeline.training.provenance import read as read_provenance

MAX_UPLOAD = 10 * 2**20  # bytes of an uploaded image (10 MiB)
MAX_PIXELS = 40_000_000  # an upload's width x height: a small file can hold a huge image (a decompression bomb)
MAX_K = 100
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
# the page loads nothing from elsewhere: its script, style and images come from this server (blob: is the
# preview of the image the user picked)
SECURITY_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; object-src 'none'; "
                                               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
                    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


class BadQuery(ValueError):
    """A request that cannot be answered: its one-line reason goes back with a 400."""


def parse_k(value) -> int:
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise BadQuery(f"k must be a whole number from 1 to {MAX_K}, not {str(value)[:20]!r}") from None
    if not 1 <= k <= MAX_K:
        raise BadQuery(f"k must be from 1 to {MAX_K}, not {k}")
    return k


def upload_pixels(upload, transform):
    """The uploaded file as the run's pixels, or BadQuery with the reason."""
    if upload is None or not upload.filename:
        raise BadQuery("no image: send the file in the multipart field 'image'")
    data = upload.stream.read(MAX_UPLOAD + 1)
    if len(data) > MAX_UPLOAD:
        raise BadQuery(f"{upload.filename}: the upload is over {MAX_UPLOAD // 2**20} MiB")
    pixels, reason = decode_image(io.BytesIO(data), transform, MAX_PIXELS)
    if pixels is None:
        why = {"not_an_image": "is not an image", "too_large": f"is over {MAX_PIXELS // 10**6} megapixels"}.get(
            reason, "fails to decode (a damaged or truncated image)")
        raise BadQuery(f"{upload.filename} {why}")
    return pixels


def gallery_file(index, position: int) -> Path | None:
    """The image at `position` of the index's own list, if it still lies inside the folder the index was
    built from (resolved: a link that now leads outside it is refused); None otherwise."""
    if index.item_key != "path" or not 0 <= position < len(index.items):
        return None
    root = Path(index.meta["root"]).resolve()
    path = (root / index.items[position]).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        return None
    return path


def model_card(index) -> dict:
    """What the page shows of the run: its family, test metrics and provenance."""
    run = index.run
    metrics = run.test_metrics() or {}
    prov = read_provenance(run.path) or {}
    code, machine = prov.get("code", {}), prov.get("machine", {})
    return {"name": run.name, "family": family_line(run), "representation": run.representation,
            "measure": index.meta["measure"], "path": str(run.path),
            "metrics": {k: v for k, v in metrics.items() if "/" not in k and isinstance(v, (int, float))},
            "metric_table": metric_table(metrics),
            "provenance": {"commit": (code.get("commit") or "")[:12] or None, "dirty": code.get("dirty"),
                           "dataset": prov.get("dataset", {}).get("name"), "seed": prov.get("seed"),
                           "started": prov.get("started"), "devices": machine.get("devices"),
                           "accelerator": machine.get("accelerator")} if prov else {},
            "gallery": index.meta["gallery"], "count": index.meta["count"], "root": index.meta["root"],
            "index": str(index.folder)}


def metric_table(metrics: dict) -> dict:
    """The test metrics the page shows, a row per direction, R@K and mAP in % (mAP is stored as a fraction):
    {"columns", "rows": {direction: [text]}, "rsum"}. /api/info has every metric."""
    names = [n for n in ("R@1", "R@5", "R@10", "mAP@N")
             if any(f"{d}_{n}" in metrics for d in ("i2t", "t2i"))]

    def shown(name: str, value) -> str:
        if value is None:
            return ""
        return f"{100 * value if name.startswith('mAP') else value:.1f}"

    return {"columns": names, "rows": {d: [shown(n, metrics.get(f"{d}_{n}")) for n in names] for d in ("i2t", "t2i")},
            "rsum": metrics.get("rsum")}


def create_app(index, screen_k: int | None = None) -> Flask:
    """The Flask app over an opened SearchIndex (`screen_k`: a token-level run's screen depth)."""
    app = Flask(__name__)
    # the body may hold the image and the form's small fields: werkzeug refuses a larger one before reading it
    app.config["MAX_CONTENT_LENGTH"] = MAX_UPLOAD + 64 * 1024
    card, lock = model_card(index), threading.Lock()

    def answer(query: str, rank) -> Response:
        with lock:
            ranked = rank()
        response = Response(index.line(query, index.named(ranked)[0]), mimetype="application/json")
        response.headers["X-Positions"] = ",".join(str(p) for p, _ in ranked[0])
        return response

    @app.get("/api/query")
    def query_text():
        text, k = request.args.get("text", ""), parse_k(request.args.get("k", 10))
        if not text.strip():
            raise BadQuery("no query: give ?text=... (or POST an image)")
        return answer(text, lambda: index.rank_texts([text], k, screen_k))

    @app.post("/api/query")
    def query_image():
        k = parse_k(request.form.get("k", 10))
        upload = request.files.get("image")
        pixels = upload_pixels(upload, index.run.inputs.transform)
        return answer(upload.filename, lambda: index.rank_pixels([pixels], k, screen_k))

    @app.get("/api/item/<int:position>")
    def item(position: int):
        if index.item_key == "text":
            if position >= len(index.items):
                return _error(404, f"no item {position}: the gallery has {len(index.items)}")
            return Response(index.items[position], mimetype="text/plain")
        path = gallery_file(index, position)
        if path is None:
            return _error(404, f"no image at position {position} of this index")
        return send_file(path, max_age=3600)

    @app.get("/api/info")
    def info():
        return Response(json.dumps(card, ensure_ascii=False), mimetype="application/json")

    @app.get("/")
    def page():
        return render_template_string(PAGE, card=card, max_k=MAX_K, max_mib=MAX_UPLOAD // 2**20)

    @app.get("/page.js")
    def script():
        return Response(SCRIPT, mimetype="text/javascript")

    @app.get("/page.css")
    def style():
        return Response(STYLE, mimetype="text/css")

    @app.errorhandler(BadQuery)
    def bad_query(e):
        return _error(400, str(e))

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(_):
        return _error(400, f"the upload is over {MAX_UPLOAD // 2**20} MiB")

    @app.errorhandler(HTTPException)
    def http_error(e):
        return _error(e.code or 500, e.name)

    @app.after_request
    def headers(response):
        response.headers.update(SECURITY_HEADERS)
        return response

    return app


def _error(status: int, reason: str) -> Response:
    return Response(json.dumps({"error": reason}) + "\n", status=status, mimetype="application/json")


def make_server_for(index, host: str = "127.0.0.1", port: int = 8000, screen_k: int | None = None):
    """werkzeug's threaded WSGI server with the app, bound (port 0: any free port); says in one line on
    stderr when the address is not this machine's loopback."""
    if host not in LOCAL_HOSTS:
        print(f"warning: serving on {host}, not 127.0.0.1: the index (its images or texts, and the model card) "
              f"is readable by anyone who can reach {host}:{port}", file=sys.stderr)
    return make_server(host, port, create_app(index, screen_k), threaded=True)


def serve(index, host: str = "127.0.0.1", port: int = 8000, screen_k: int | None = None) -> None:
    """Serves the index until interrupted (Ctrl-C); the line printed gives the address."""
    server = make_server_for(index, host, port, screen_k)
    print(f"serving {index.meta['count']} {index.meta['gallery']} of {index.folder} with {index.run.name} on "
          f"http://{host}:{server.server_port}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
