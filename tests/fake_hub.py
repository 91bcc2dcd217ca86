"""A local stand-in for the Hugging Face Hub: the subset of its HTTP API that
``HfApi.create_repo`` + ``list_repo_files`` + ``create_commit`` use
(huggingface_hub 0.30 to 2.x).

Endpoints (``TYPE`` is ``models``, ``datasets`` or ``spaces``):

* ``POST /api/repos/create``: JSON ``{name, organization, type, visibility}``;
  401 without a known token, 403 outside the caller's namespace (or with a
  read-only token), 409 when the repo exists, else ``{"url": ...}``.
* ``GET /api/TYPE/NS/NAME[/revision/REV]``: repo info (``sha``, ``private``, ``siblings``).
* ``GET /api/TYPE/NS/NAME/tree/REV[/PATH]``: every file (``type``, ``path``, ``oid``, ``size``).
* ``GET|HEAD /[datasets/]NS/NAME/resolve/REV/PATH``: a file's bytes, with
  ``X-Repo-Commit`` and ``ETag`` (what ``hf_hub_download`` /
  ``snapshot_download`` read).
* ``POST /api/validate-yaml``: checks README.md's YAML header parses.
* ``POST /api/TYPE/NS/NAME/preupload/REV``: answers ``uploadMode: "regular"``
  for every file (so the commit carries the bytes base64-encoded: no LFS or
  Xet transfer is ever negotiated) and the git oid of the file the repo
  already has, which is how huggingface_hub skips unchanged files.
* ``POST /api/TYPE/NS/NAME/commit/REV``: NDJSON lines ``header``, ``file``
  (base64), ``deletedFile``, ``deletedFolder``; applied atomically.

Anything else is answered 404 and recorded in ``unhandled``. Every request is
recorded in ``requests`` (method, path, Authorization header). ``fail_next``
queues an error answer for the next call of one endpoint.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    owner: str
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[dict] = field(default_factory=list)

    @property
    def sha(self) -> str:
        return self.commits[-1]["oid"] if self.commits else "0" * 40


@dataclass
class Request:
    method: str
    path: str
    route: str
    authorization: str | None


_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_REPO = r"/api/(?P<type>models|datasets|spaces)/(?P<ns>[^/]+)/(?P<name>[^/]+)"
# File downloads: /NS/NAME/resolve/REV/PATH (models), /datasets/NS/NAME/resolve/REV/PATH.
_RESOLVE = r"^/(?:(?P<type>datasets|spaces)/)?(?P<ns>[^/]+)/(?P<name>[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$"

_ROUTES = [
    ("GET", "resolve", re.compile(_RESOLVE)),
    ("HEAD", "resolve", re.compile(_RESOLVE)),
    ("POST", "create", re.compile(r"^/api/repos/create$")),
    ("POST", "validate-yaml", re.compile(r"^/api/validate-yaml$")),
    ("GET", "tree", re.compile(_REPO + r"/tree/(?P<rev>[^/]+)(?P<sub>/.*)?$")),
    ("POST", "preupload", re.compile(_REPO + r"/preupload/(?P<rev>[^/]+)$")),
    ("POST", "commit", re.compile(_REPO + r"/commit/(?P<rev>[^/]+)$")),
    ("GET", "info", re.compile(_REPO + r"(/revision/(?P<rev>[^/]+))?$")),
]


class FakeHub:
    def __init__(self, tokens: dict[str, str] | None = None, read_only: tuple[str, ...] = ()):
        self.tokens = dict(tokens or {})  # token -> user name
        self.read_only = set(read_only)  # tokens that may read but not write
        self.repos: dict[tuple[str, str], Repo] = {}  # (type, "ns/name") -> Repo
        self.requests: list[Request] = []
        self.unhandled: list[str] = []
        self._fail: dict[str, list[tuple[int, str]]] = {}
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                hub._handle(self, "GET")

            def do_POST(self):  # noqa: N802
                hub._handle(self, "POST")

            def do_HEAD(self):  # noqa: N802
                hub._handle(self, "HEAD")

            def log_message(self, *args):  # silent
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def fail_next(self, route: str, status: int, message: str = "injected failure") -> None:
        self._fail.setdefault(route, []).append((status, message))

    def add_repo(self, repo_type: str, repo_id: str, owner: str, private: bool = False,
                 files: dict[str, bytes] | None = None) -> Repo:
        repo = Repo(owner, private, dict(files or {}))
        repo.commits.append({"oid": hashlib.sha1(repo_id.encode()).hexdigest(), "summary": "initial commit",
                             "added": sorted(repo.files), "deleted": []})
        self.repos[(repo_type, repo_id)] = repo
        return repo

    def repo(self, repo_type: str, repo_id: str) -> Repo | None:
        return self.repos.get((repo_type, repo_id))

    # -- plumbing ------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(h.path)
        path = unquote(parts.path)
        body = self._body(h)
        for m, name, rx in _ROUTES:
            match = rx.match(path)
            if m == method and match:
                break
        else:
            name, match = None, None
        self.requests.append(Request(method, path, name or "?", h.headers.get("Authorization")))
        if match is None:
            self.unhandled.append(f"{method} {path}")
            return self._send(h, 404, {"error": "not found"})
        if self._fail.get(name):
            status, msg = self._fail[name].pop(0)
            return self._send(h, status, {"error": msg}, {"X-Error-Message": msg})
        with self._lock:
            status, payload, headers = getattr(self, "_" + name.replace("-", "_"))(h, match.groupdict(), body)
        self._send(h, status, payload, headers, head=method == "HEAD")

    @staticmethod
    def _body(h: BaseHTTPRequestHandler) -> bytes:
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(h.rfile.readline().strip(), 16)
                if size == 0:
                    h.rfile.readline()
                    return out
                out += h.rfile.read(size)
                h.rfile.readline()
        n = int(h.headers.get("Content-Length") or 0)
        return h.rfile.read(n) if n else b""

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, payload, headers: dict | None = None,
              head: bool = False) -> None:
        raw = isinstance(payload, bytes)  # a file download
        data = payload if raw else json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/octet-stream" if raw else "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        if not head:
            h.wfile.write(data)

    def _user(self, h) -> str | None:
        auth = h.headers.get("Authorization") or ""
        return self.tokens.get(auth[len("Bearer "):]) if auth.startswith("Bearer ") else None

    def _writer(self, h) -> str | None:
        auth = h.headers.get("Authorization") or ""
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        return None if token in self.read_only else self.tokens.get(token)

    _UNAUTHORIZED = (401, {"error": "Invalid credentials in Authorization header"},
                     {"X-Error-Message": "Invalid credentials in Authorization header"})

    def _lookup(self, h, g, write: bool):
        """(repo, None) or (None, error answer)."""
        repo_type, repo_id = _TYPES[g.get("type") or "models"], f"{g['ns']}/{g['name']}"
        auth = h.headers.get("Authorization")
        if auth and self._user(h) is None:
            return None, self._UNAUTHORIZED
        repo = self.repos.get((repo_type, repo_id))
        user = self._user(h)
        if repo is None or (repo.private and user != repo.owner):
            return None, (404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        if write and (self._writer(h) != repo.owner):
            return None, (403, {"error": f"You don't have the rights to push to {repo_id}"}, {})
        return (repo_type, repo_id, repo), None

    # -- endpoints -------------------------------------------------------------

    def _create(self, h, g, body):
        user = self._user(h)
        if user is None:
            return self._UNAUTHORIZED
        p = json.loads(body)
        ns = p.get("organization") or user
        repo_type = p.get("type") or "model"
        repo_id = f"{ns}/{p['name']}"
        kind = {"model": "", "dataset": "datasets/", "space": "spaces/"}[repo_type]
        if ns != user or self._writer(h) is None:
            return 403, {"error": f'You don\'t have the rights to create a {repo_type} under the namespace "{ns}"'}, {}
        if (repo_type, repo_id) in self.repos:
            return 409, {"error": f"You already created this {repo_type} repo", "url": f"{self.url}/{kind}{repo_id}"}, {}
        self.add_repo(repo_type, repo_id, user, private=p.get("visibility") == "private" or bool(p.get("private")),
                      files={".gitattributes": b"*.parquet filter=lfs diff=lfs merge=lfs -text\n"})
        return 200, {"url": f"{self.url}/{kind}{repo_id}", "name": repo_id}, {}

    def _validate_yaml(self, h, g, body):
        content = json.loads(body).get("content", "")
        m = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        try:
            if m:
                yaml.safe_load(m.group(1))
        except yaml.YAMLError as e:
            return 400, {"errors": [{"message": str(e)}]}, {}
        return 200, {"errors": [], "warnings": []}, {}

    def _info(self, h, g, body):
        found, err = self._lookup(h, g, write=False)
        if err:
            return err
        _, repo_id, repo = found
        return 200, {"id": repo_id, "sha": repo.sha, "private": repo.private,
                     "siblings": [{"rfilename": f} for f in sorted(repo.files)]}, {}

    def _resolve(self, h, g, body):
        found, err = self._lookup(h, g, write=False)
        if err:
            return err
        repo = found[2]
        data = repo.files.get(g["file"])
        if data is None:
            return 404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"}
        return 200, data, {"X-Repo-Commit": repo.sha, "ETag": f'"{git_oid(data)}"'}

    def _tree(self, h, g, body):
        found, err = self._lookup(h, g, write=False)
        if err:
            return err
        repo = found[2]
        sub = (g.get("sub") or "").strip("/")
        return 200, [{"type": "file", "path": p, "oid": git_oid(d), "size": len(d)}
                     for p, d in sorted(repo.files.items()) if not sub or p.startswith(sub + "/")], {}

    def _preupload(self, h, g, body):
        found, err = self._lookup(h, g, write=True)
        if err:
            return err
        repo = found[2]
        files = json.loads(body)["files"]
        return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                "oid": git_oid(repo.files[f["path"]]) if f["path"] in repo.files else None}
                               for f in files], "commitOid": repo.sha}, {}

    def _commit(self, h, g, body):
        found, err = self._lookup(h, g, write=True)
        if err:
            return err
        repo_type, repo_id, repo = found
        files = dict(repo.files)
        summary, added, deleted = "", [], []
        for line in body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value["summary"]
            elif key == "file":
                if value.get("encoding") != "base64":
                    return 400, {"error": f"unsupported encoding {value.get('encoding')!r}"}, {}
                files[value["path"]] = base64.b64decode(value["content"])
                added.append(value["path"])
            elif key == "deletedFile":
                if value["path"] not in files:
                    return 404, {"error": "A file with this name doesn't exist"}, {"X-Error-Code": "EntryNotFound"}
                del files[value["path"]]
                deleted.append(value["path"])
            elif key == "deletedFolder":
                gone = [p for p in files if p.startswith(value["path"].rstrip("/") + "/")]
                for p in gone:
                    del files[p]
                deleted += gone
            else:  # lfsFile: this fake never offers LFS
                return 422, {"error": f"unexpected commit operation {key!r}"}, {}
        if not summary:
            return 400, {"error": "missing commit header"}, {}
        repo.files = files
        oid = hashlib.sha1(f"{repo_id}:{len(repo.commits)}".encode()).hexdigest()
        repo.commits.append({"oid": oid, "summary": summary, "added": added, "deleted": deleted})
        kind = {"model": "", "dataset": "datasets/", "space": "spaces/"}[repo_type]
        return 200, {"success": True, "commitOid": oid, "commitUrl": f"{self.url}/{kind}{repo_id}/commit/{oid}"}, {}
