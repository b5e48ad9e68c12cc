"""A local Hugging Face Hub stand-in for the hf:// tests: the few endpoints huggingface_hub's snapshot_download
and model_info call (repo info with file sizes, the recursive tree, HEAD/GET of resolve URLs), serving one
directory as a repository over real HTTP. `HF_ENDPOINT` points the client at it."""

from __future__ import annotations

import contextlib
import hashlib
import json
import pathlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@contextlib.contextmanager
def local_hub(repo_id: str, root: pathlib.Path, host: str = "127.0.0.1"):
    """Yield the endpoint URL of a hub serving `root` as the model repository `repo_id` at revision main."""
    files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    class Hub(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _send(self, status: int, body: bytes, headers: dict | None = None, head: bool = False) -> None:
            self.send_response(status)
            for k, v in {"Content-Length": str(len(body)), **(headers or {})}.items():
                self.send_header(k, v)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, obj, head: bool = False) -> None:
            self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json"}, head)

        def _route(self, head: bool) -> None:
            path = unquote(urlparse(self.path).path)
            api = f"/api/models/{repo_id}/"
            if path.startswith(api + "revision/") or path == api.rstrip("/"):
                siblings = [{"rfilename": f, "size": len(b)} for f, b in files.items()]
                return self._json({"id": repo_id, "sha": COMMIT, "private": False, "siblings": siblings}, head)
            if path.startswith(api + "tree/"):
                entries = [
                    {"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                    for f, b in files.items()
                ]
                return self._json(entries, head)
            prefix = f"/{repo_id}/resolve/"
            if path.startswith(prefix):
                _rev, _, name = path[len(prefix) :].partition("/")
                if name in files:
                    body = files[name]
                    etag = '"' + hashlib.sha256(body).hexdigest() + '"'
                    return self._send(200, body, {"X-Repo-Commit": COMMIT, "ETag": etag}, head)
            self._send(404, b'{"error": "not found"}', {"X-Error-Code": "EntryNotFound"}, head)

        def do_GET(self):
            self._route(head=False)

        def do_HEAD(self):
            self._route(head=True)

    server = ThreadingHTTPServer((host, 0), Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
