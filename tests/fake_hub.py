"""A tiny stand-in for the Hugging Face hub on 127.0.0.1, answering the requests huggingface_hub 2.x makes.

``hf_hub_download`` (huggingface_hub/file_download.py) first sends ``HEAD {endpoint}/{repo_id}/resolve/{revision}/
{filename}`` and reads, from the answer, ``X-Repo-Commit`` (the commit the revision resolves to), ``X-Linked-Etag``
or ``ETag`` (the blob's name in the cache) and ``X-Linked-Size`` or ``Content-Length``; it follows redirects only
while they stay on the hub's host. Then it GETs the file (at the redirect's ``Location`` if there was one). Errors are
told apart by the ``X-Error-Code`` header: ``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``.

Like the real hub, small files are answered directly (``ETag`` = git blob sha1) and "LFS" files (weights) with a
``302`` to a CDN on another host name (``localhost`` instead of ``127.0.0.1``) carrying ``X-Linked-Etag`` (the
sha256) and ``X-Linked-Size``. Every request is logged in :attr:`FakeHub.requests` as ``(method, path)``.
"""

from __future__ import annotations

import hashlib
import http.server
import threading
import urllib.parse
from typing import Mapping

LFS_SUFFIXES = (".safetensors", ".bin", ".msgpack", ".h5", ".ot", ".onnx")


class FakeHub:
    """Serve ``repos``: ``{repo_id: {"commits": {sha: {filename: bytes}}, "refs": {branch_or_tag: sha}}}``."""

    def __init__(self, repos: Mapping[str, Mapping]):
        self.repos = repos
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_HEAD(self):
                hub._handle(self, body=False)

            def do_GET(self):
                hub._handle(self, body=True)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._blobs: dict[str, bytes] = {}
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> "FakeHub":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket: later connections are refused."""
        self._server.shutdown()
        self._server.server_close()

    def fetched(self, method: str = "GET") -> list[str]:
        """File names requested with ``method`` through ``/resolve/`` URLs."""
        return [urllib.parse.unquote(p.split("/resolve/", 1)[1].split("/", 1)[1]) for m, p in self.requests
                if m == method and "/resolve/" in p]

    # -------------------------------------------------------------------------------------------------------
    def _handle(self, request: http.server.BaseHTTPRequestHandler, body: bool) -> None:
        path = urllib.parse.urlsplit(request.path).path
        self.requests.append((request.command, path))
        if path.startswith("/cdn/"):
            data = self._blobs.get(path[len("/cdn/"):])
            if data is None:
                return self._send(request, 404, {}, b"", body)
            return self._send(request, 200, {"Content-Length": str(len(data))}, data, body)
        if "/resolve/" not in path:
            return self._send(request, 404, {}, b"", body)
        repo_id, rest = path.lstrip("/").split("/resolve/", 1)
        revision, _, filename = rest.partition("/")
        revision, filename = urllib.parse.unquote(revision), urllib.parse.unquote(filename)
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._send(request, 401, {"X-Error-Code": "RepoNotFound"}, b"Repository not found", body)
        commit = repo["refs"].get(revision, revision if revision in repo["commits"] else None)
        if commit is None:
            return self._send(request, 404, {"X-Error-Code": "RevisionNotFound"}, b"Invalid rev id", body)
        files = repo["commits"][commit]
        if filename not in files:
            headers = {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit}
            return self._send(request, 404, headers, b"Entry not found", body)
        data = files[filename]
        if filename.endswith(LFS_SUFFIXES):
            sha256 = hashlib.sha256(data).hexdigest()
            self._blobs[sha256] = data
            headers = {
                "X-Repo-Commit": commit,
                "X-Linked-Etag": f'"{sha256}"',
                "X-Linked-Size": str(len(data)),
                "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                "Location": f"http://localhost:{self.port}/cdn/{sha256}",
                "Content-Length": "0",
            }
            return self._send(request, 302, headers, b"", body)
        git_sha = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        headers = {"X-Repo-Commit": commit, "ETag": f'"{git_sha}"', "Content-Length": str(len(data))}
        return self._send(request, 200, headers, data, body)

    @staticmethod
    def _send(request, status: int, headers: Mapping[str, str], data: bytes, body: bool) -> None:
        request.send_response(status)
        headers = dict(headers)
        headers.setdefault("Content-Length", str(len(data)))
        for key, value in headers.items():
            request.send_header(key, value)
        request.end_headers()
        if body and data and status != 302:
            request.wfile.write(data)
