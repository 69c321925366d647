"""A loopback HTTP test double of the Hugging Face Hub, for tests only.

This is NOT a Hub server: it is an in-memory test double that answers the handful of Hub HTTP routes that
``huggingface_hub`` 2.x and ``transformers`` 5.x use to push a model (``create_repo``, ``upload_folder``,
``create_commit``, ``push_to_hub``) and to load it back (``hf_hub_download``, ``from_pretrained(repo_id)``,
``ModelCard.load``). It listens on 127.0.0.1 only, keeps every repository in memory and forgets everything
when stopped.

Usage (the environment variables must be set BEFORE huggingface_hub / transformers are imported, so the
client side normally runs in a subprocess)::

    from hub_double import HubTestDouble

    with HubTestDouble(tokens={"hf_test_write_token": "alice"}) as hub:
        env = dict(os.environ, HF_ENDPOINT=hub.endpoint, HF_TOKEN="hf_test_write_token", HF_HOME=tmp)
        subprocess.run([sys.executable, "-c", "..."], env=env, stdin=subprocess.DEVNULL, check=True)
        hub.file_bytes("alice/tiny-bert", "config.json")

    # or from a shell, for manual experiments:
    #   python tests/hub_double.py --token hf_test_write_token=alice
    # prints the endpoint and serves until interrupted.

What it emulates (and how it differs from the real Hub):

* Routes: ``GET /api/whoami-v2``, ``GET /api/agent-harnesses`` (empty registry), ``POST /api/validate-yaml``,
  ``POST /api/repos/create``, ``DELETE /api/repos/delete``, ``GET /api/{type}s/{ns}/{name}[/revision/{rev}]``,
  ``POST /api/{type}s/{id}/preupload/{rev}``, ``POST /api/{type}s/{id}/commit/{rev}`` (NDJSON, base64 files),
  ``GET /api/{type}s/{id}/tree/{rev}[/{path}]``, ``POST /api/{type}s/{id}/paths-info/{rev}``,
  ``HEAD|GET /[{type}s/]{id}/resolve/{rev}/{path}`` (with ``Range`` support). Anything else answers 404 and is
  recorded in :attr:`HubTestDouble.unhandled` so a test can notice a route the client needed.
* Every file is committed as a regular (base64) file: the preupload route never asks for LFS, because the
  real LFS path of huggingface_hub 2.x goes through Xet storage, which this double does not emulate.
* Commits are atomic: a commit that fails midway (see :meth:`HubTestDouble.fail_next_commit`) leaves the
  repository exactly as it was, like a git ref that was never moved. Commits are applied one at a time, each to
  the head it finds; a commit with ``parentCommit`` that is not the head of the branch any more is refused with
  HTTP 412 ("A commit has happened since"), as the Hub refuses it. :meth:`HubTestDouble.commits_in_pairs` holds
  each commit until a second one arrives, so two concurrent pushes race on every round.
* Authentication: ``Authorization: Bearer <token>`` with tokens given at construction (token -> user name).
  Private repositories are visible to their owner only; an anonymous read answers 401 and a read with
  another user's token 404, both with ``X-Error-Code: RepoNotFound`` as the Hub does (it does not reveal
  that a private repo exists). Writes need the owner's token (401 anonymous, 403 other user).
* 404s carry ``X-Error-Code`` ``RepoNotFound`` / ``RevisionNotFound`` / ``EntryNotFound``, which
  transformers relies on to tell "optional file absent" from "repo absent".
* README.md metadata sent to ``/api/validate-yaml`` (and committed README.md files) is parsed with PyYAML
  and, when it holds ``model-index``, checked with huggingface_hub's own model-index parser.
* Tokens are never stored in the request log (only whether a request was authenticated, and as whom).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["HubTestDouble", "RequestRecord"]

_REPO_TYPES = ("model", "dataset", "space")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_FAULT_MODES = ("error", "disconnect")


def git_blob_oid(data: bytes) -> str:
    """The git blob id of ``data`` (what the Hub reports as a regular file's oid / ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class _Commit:
    oid: str
    files: dict  # path -> bytes (full tree at this commit)
    message: str
    created_at: float


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    owner: str
    private: bool
    commits: list = field(default_factory=list)  # oldest first; commits[-1] is the head of "main"

    @property
    def head(self) -> _Commit:
        return self.commits[-1]

    def commit_for(self, revision: str):
        """The commit a revision names ("main", a full or >= 7 character commit oid), or None."""
        if revision == "main":
            return self.head
        if re.fullmatch(r"[0-9a-f]{7,40}", revision):
            hits = [c for c in self.commits if c.oid.startswith(revision)]
            if len(hits) == 1:
                return hits[0]
        return None


@dataclass(frozen=True)
class RequestRecord:
    """One request seen by the double. ``user`` is the authenticated user name (never the token)."""

    method: str
    path: str
    status: int
    user: str | None


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, error_code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code


class _Disconnect(Exception):
    """Raised to drop the connection without any response (fault injection)."""


class HubTestDouble:
    """In-memory, loopback-only HTTP test double of the Hub (see the module docstring).

    Args:
        tokens: mapping ``token -> user name``. Requests carrying one of these tokens as a bearer token are
            authenticated as that user; any other bearer token answers 401 "Invalid credentials".
        host: address to bind; must be a loopback address (127.0.0.0/8 or ::1).
        port: TCP port, 0 (default) picks a free one. The chosen endpoint is :attr:`endpoint`.

    Use as a context manager, or call :meth:`start` / :meth:`stop`.
    """

    def __init__(self, tokens: dict | None = None, host: str = "127.0.0.1", port: int = 0):
        if not (host.startswith("127.") or host in ("::1", "localhost")):
            raise ValueError(f"host={host!r}: the Hub test double only binds loopback addresses (127.x.x.x, ::1)")
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port={port!r}: expected an integer in [0, 65535]")
        tokens = dict(tokens or {})
        for token, user in tokens.items():
            if not isinstance(token, str) or not token:
                raise ValueError(f"tokens: every token must be a non-empty string, got {token!r}")
            if not isinstance(user, str) or not _NAME_RE.match(user):
                raise ValueError(f"tokens: user name {user!r} is not a valid Hub namespace")
        self._tokens = tokens
        self._host = host
        self._port = port
        self._lock = threading.RLock()
        self._repos: dict = {}  # (repo_type, repo_id) -> _Repo
        self._counter = 0
        self._faults: list = []  # pending commit faults: dicts(after_operations, mode, status)
        self._pairing = threading.Condition()  # commits_in_pairs: guards _pair_waiting
        self._pair_commits = False
        self._pair_waiting = None  # the threading.Event of a commit waiting for a partner
        self.requests: list = []  # RequestRecord, in arrival order
        self.unhandled: list = []  # (method, path) of requests no route matched
        self._server = None
        self._thread = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def endpoint(self) -> str:
        """Base URL to use as ``HF_ENDPOINT`` (e.g. ``http://127.0.0.1:43123``)."""
        if self._server is None:
            raise RuntimeError("the Hub test double is not started: call start() or use it as a context manager")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubTestDouble:
        if self._server is not None:
            raise RuntimeError("the Hub test double is already started")
        handler = type("_BoundHandler", (_Handler,), {"double": self})
        server = ThreadingHTTPServer((self._host, self._port), handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="hub-test-double", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = None
            self._thread = None

    def __enter__(self) -> HubTestDouble:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ test helpers
    def fail_next_commit(self, after_operations: int = 1, mode: str = "error", status: int = 500) -> None:
        """Make the next commit fail after the server has processed ``after_operations`` file operations.

        ``mode="error"`` answers HTTP ``status`` (5xx) with an error body; ``mode="disconnect"`` closes the
        connection without any response. Either way nothing of that commit is applied (commits are atomic).
        Faults queue up: call it twice to fail the next two commits.
        """
        if mode not in _FAULT_MODES:
            raise ValueError(f"mode={mode!r}: expected one of {_FAULT_MODES}")
        if not isinstance(after_operations, int) or after_operations < 0:
            raise ValueError(f"after_operations={after_operations!r}: expected an integer >= 0")
        if not isinstance(status, int) or not 500 <= status <= 599:
            raise ValueError(f"status={status!r}: expected a server error status in [500, 599]")
        with self._lock:
            self._faults.append({"after_operations": after_operations, "mode": mode, "status": status})

    def pending_faults(self) -> int:
        """Number of injected commit faults not triggered yet."""
        with self._lock:
            return len(self._faults)

    @contextlib.contextmanager
    def commits_in_pairs(self, wait_seconds: float = 15.0):
        """While active, a commit request waits (at most ``wait_seconds``) until a second one arrives; then both
        go on (applied one at a time, as always). Two clients pushing at once thus both plan against the same
        head before either commit lands: the race of two concurrent pushes, made to happen on every round."""
        with self._pairing:
            self._pair_commits = True
        try:
            yield self
        finally:
            with self._pairing:
                self._pair_commits = False
                if self._pair_waiting is not None:
                    self._pair_waiting.set()
                    self._pair_waiting = None

    def _wait_for_partner(self, wait_seconds: float = 15.0) -> None:
        with self._pairing:
            if not self._pair_commits:
                return
            if self._pair_waiting is not None:  # a partner is waiting: both go
                self._pair_waiting.set()
                self._pair_waiting = None
                return
            event = self._pair_waiting = threading.Event()
        if not event.wait(wait_seconds):
            with self._pairing:
                if self._pair_waiting is event:
                    self._pair_waiting = None

    def repo_exists(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._lock:
            return (repo_type, repo_id) in self._repos

    def list_files(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> list:
        """Sorted paths of the files of a repo at ``revision`` (owner-independent: a test-side view)."""
        return sorted(self._commit(repo_id, repo_type, revision).files)

    def file_bytes(self, repo_id: str, path: str, repo_type: str = "model", revision: str = "main") -> bytes:
        files = self._commit(repo_id, repo_type, revision).files
        if path not in files:
            raise KeyError(f"{path!r} not in {repo_type} repo {repo_id!r} at {revision!r}; files: {sorted(files)}")
        return files[path]

    def commit_count(self, repo_id: str, repo_type: str = "model") -> int:
        """Number of commits of a repo, including the initial empty one made at creation."""
        with self._lock:
            return len(self._get_repo_or_keyerror(repo_type, repo_id).commits)

    def commit_messages(self, repo_id: str, repo_type: str = "model") -> list:
        """Commit summaries of a repo, oldest first (the first one is the creation commit)."""
        with self._lock:
            return [c.message for c in self._get_repo_or_keyerror(repo_type, repo_id).commits]

    def commit_trees(self, repo_id: str, repo_type: str = "model") -> list:
        """``(summary, {path: bytes})`` of every commit of a repo, oldest first (the creation commit included)."""
        with self._lock:
            return [(c.message, dict(c.files)) for c in self._get_repo_or_keyerror(repo_type, repo_id).commits]

    def is_private(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._lock:
            return self._get_repo_or_keyerror(repo_type, repo_id).private

    def all_stored_bytes(self):
        """Yield ``(repo_id, revision_oid, path, bytes)`` for every file of every commit of every repo."""
        with self._lock:
            items = [
                (repo.repo_id, commit.oid, path, data)
                for repo in self._repos.values()
                for commit in repo.commits
                for path, data in commit.files.items()
            ]
        yield from items

    def _get_repo_or_keyerror(self, repo_type, repo_id) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise KeyError(f"no {repo_type} repo {repo_id!r} in the Hub test double")
        return repo

    def _commit(self, repo_id, repo_type, revision) -> _Commit:
        with self._lock:
            commit = self._get_repo_or_keyerror(repo_type, repo_id).commit_for(revision)
            if commit is None:
                raise KeyError(f"revision {revision!r} not found in {repo_type} repo {repo_id!r}")
            return commit

    # ------------------------------------------------------------------ internals used by the handler
    def _user_for(self, headers) -> str | None:
        auth = headers.get("Authorization")
        if not auth:
            return None
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _HTTPError(401, "Invalid credentials in Authorization header")
        user = self._tokens.get(token.strip())
        if user is None:
            raise _HTTPError(401, "Invalid credentials in Authorization header")
        return user

    def _new_oid(self, *parts: str) -> str:
        with self._lock:
            self._counter += 1
            seed = "\0".join((str(self._counter), str(time.time_ns())) + parts)
        return hashlib.sha1(seed.encode()).hexdigest()

    def _create_repo(self, repo_type, repo_id, owner, private) -> _Repo:
        repo = _Repo(repo_type=repo_type, repo_id=repo_id, owner=owner, private=private)
        repo.commits.append(_Commit(self._new_oid(repo_id, "init"), {}, "initial commit", time.time()))
        self._repos[(repo_type, repo_id)] = repo
        return repo

    def _readable_repo(self, repo_type, repo_id, user) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None or (repo.private and user != repo.owner):
            status = 401 if user is None else 404
            raise _HTTPError(status, "Repository not found", "RepoNotFound")
        return repo

    def _writable_repo(self, repo_type, repo_id, user) -> _Repo:
        repo = self._readable_repo(repo_type, repo_id, user)
        if user is None:
            raise _HTTPError(401, "You must be authenticated to write to a repository")
        if user != repo.owner:
            raise _HTTPError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _take_fault(self):
        with self._lock:
            return self._faults.pop(0) if self._faults else None


def _validate_card_metadata(content: str):
    """Return a list of error messages for the YAML metadata block of a README.md (empty list if valid)."""
    import yaml

    if not content.startswith("---"):
        return []
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, flags=re.S)
    if match is None:
        return ["README.md starts with '---' but the YAML metadata block is not closed by a '---' line"]
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as exc:
        return [f"Invalid YAML in the metadata block: {exc}"]
    if data is None:
        return []
    if not isinstance(data, dict):
        return [f"The metadata block must be a YAML mapping, got {type(data).__name__}"]
    errors = []
    if "model-index" in data:
        try:
            from huggingface_hub.repocard_data import model_index_to_eval_results

            model_index_to_eval_results(data["model-index"])
        except Exception as exc:  # noqa: BLE001 - any parse failure is a validation error here
            errors.append(f"Invalid model-index: {type(exc).__name__}: {exc}")
    return errors


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    double: HubTestDouble  # set on the bound subclass
    server_version = "HubTestDouble/1"

    def log_message(self, format, *args):  # noqa: A002 - keep the test output quiet
        pass

    # --------------------------------------------------------------- plumbing
    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_PUT(self):
        self._dispatch("PUT")

    def _body(self) -> bytes:
        if getattr(self, "_cached_body", None) is None:
            length = int(self.headers.get("Content-Length") or 0)
            self._cached_body = self.rfile.read(length) if length else b""
        return self._cached_body

    def _json_body(self):
        try:
            return json.loads(self._body() or b"{}")
        except json.JSONDecodeError as exc:
            raise _HTTPError(400, f"Request body is not valid JSON: {exc}") from None

    def _send(self, status, body=b"", content_type="application/json", headers=None, head_only=False):
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        elif isinstance(body, str):
            body = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head_only and self.command != "HEAD":
            self.wfile.write(body)
        self._status = status

    def _dispatch(self, method):
        self._cached_body = None
        self._status = 0
        user = None
        parsed = urllib.parse.urlsplit(self.path)
        path = parsed.path
        query = urllib.parse.parse_qs(parsed.query)
        double = self.double
        try:
            user = double._user_for(self.headers)
            if method in ("POST", "PUT", "DELETE"):
                self._body()  # always drain the body so keep-alive connections stay in sync
            self._route(method, path, query, user)
        except _Disconnect:
            self.close_connection = True
            try:
                self.connection.shutdown(2)
            except OSError:
                pass
            self._status = -1
        except _HTTPError as exc:
            headers = {}
            if exc.error_code:
                headers["X-Error-Code"] = exc.error_code
            headers["X-Error-Message"] = exc.message
            self._send(exc.status, {"error": exc.message}, headers=headers)
        except Exception as exc:  # noqa: BLE001 - a bug in the double must show up as a 500, not a hang
            self._send(500, {"error": f"Hub test double internal error: {type(exc).__name__}: {exc}"})
        finally:
            with double._lock:
                double.requests.append(RequestRecord(method, path, self._status, user))

    # --------------------------------------------------------------- routing
    def _route(self, method, path, query, user):
        double = self.double
        unq = urllib.parse.unquote
        if path == "/api/whoami-v2" and method == "GET":
            if user is None:
                raise _HTTPError(401, "Invalid credentials in Authorization header")
            auth = {"type": "access_token", "accessToken": {"displayName": "test-double", "role": "write"}}
            return self._send(200, {"type": "user", "id": f"user-{user}", "name": user, "fullname": user,
                                    "orgs": [], "auth": auth})
        if path == "/api/agent-harnesses" and method == "GET":  # huggingface_hub's user-agent registry
            return self._send(200, {"standardEnvVars": [], "harnesses": {}})
        if path == "/api/validate-yaml" and method == "POST":
            content = self._json_body().get("content", "")
            errors = _validate_card_metadata(content)
            if errors:
                return self._send(400, {"errors": [{"message": m} for m in errors], "warnings": []})
            return self._send(200, {"errors": [], "warnings": []})
        if path == "/api/repos/create" and method == "POST":
            return self._create(self._json_body(), user)
        if path == "/api/repos/delete" and method == "DELETE":
            return self._delete(self._json_body(), user)

        m = re.match(r"^/api/(models|datasets|spaces)/([^/]+)/([^/]+)(?:/(.*))?$", path)
        if m:
            repo_type = m.group(1)[:-1]
            repo_id = f"{unq(m.group(2))}/{unq(m.group(3))}"
            rest = m.group(4) or ""
            if rest == "" and method == "GET":
                return self._info(repo_type, repo_id, "main", user)
            sub = re.match(r"^(revision|preupload|commit|tree|paths-info)/([^/]+)(?:/(.*))?$", rest)
            if sub:
                kind, revision, extra = sub.group(1), unq(sub.group(2)), unq(sub.group(3) or "")
                if kind == "revision" and method == "GET":
                    return self._info(repo_type, repo_id, revision, user)
                if kind == "preupload" and method == "POST":
                    return self._preupload(repo_type, repo_id, revision, user, query)
                if kind == "commit" and method == "POST":
                    return self._commit_route(repo_type, repo_id, revision, user, query)
                if kind == "tree" and method == "GET":
                    return self._tree(repo_type, repo_id, revision, extra, user, query)
                if kind == "paths-info" and method == "POST":
                    return self._paths_info(repo_type, repo_id, revision, user)

        m = re.match(r"^/(?:(datasets|spaces)/)?([^/]+)/([^/]+)/resolve/([^/]+)/(.+)$", path)
        if m and method in ("GET", "HEAD"):
            repo_type = (m.group(1) or "models")[:-1]
            repo_id = f"{unq(m.group(2))}/{unq(m.group(3))}"
            return self._resolve(repo_type, repo_id, unq(m.group(4)), unq(m.group(5)), user, method)

        with double._lock:
            double.unhandled.append((method, path))
        raise _HTTPError(404, f"Route {method} {path} is not emulated by the Hub test double")

    # --------------------------------------------------------------- handlers
    def _create(self, payload, user):
        double = self.double
        if user is None:
            raise _HTTPError(401, "You must be authenticated to create a repository")
        name = payload.get("name")
        namespace = payload.get("organization") or user
        repo_type = payload.get("type") or "model"
        if repo_type not in _REPO_TYPES:
            raise _HTTPError(400, f"Invalid repo type {repo_type!r}: expected one of {_REPO_TYPES}")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise _HTTPError(400, f"Invalid repo name {name!r}: letters, digits, '.', '_', '-' (max 96)")
        if namespace != user:
            raise _HTTPError(403, f"You don't have the rights to create a repository under {namespace!r}")
        if "visibility" in payload:
            if payload["visibility"] not in ("public", "private"):
                raise _HTTPError(400, f"Invalid visibility {payload['visibility']!r}: 'public' or 'private'")
            private = payload["visibility"] == "private"
        else:
            private = bool(payload.get("private", False))
        repo_id = f"{namespace}/{name}"
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = f"{self._endpoint()}/{prefix}{repo_id}"
        with double._lock:
            if (repo_type, repo_id) in double._repos:
                return self._send(409, {"error": "You already created this repo", "url": url})
            double._create_repo(repo_type, repo_id, user, private)
        return self._send(200, {"url": url, "name": repo_id, "id": repo_id})

    def _delete(self, payload, user):
        double = self.double
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or user}/{payload.get('name')}"
        with double._lock:
            double._writable_repo(repo_type, repo_id, user)
            del double._repos[(repo_type, repo_id)]
        return self._send(200, {})

    def _endpoint(self):
        host = self.headers.get("Host") or "{}:{}".format(*self.server.server_address[:2])
        return f"http://{host}"

    def _resolve_commit(self, repo, revision) -> _Commit:
        commit = repo.commit_for(revision)
        if commit is None:
            raise _HTTPError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _info(self, repo_type, repo_id, revision, user):
        double = self.double
        with double._lock:
            repo = double._readable_repo(repo_type, repo_id, user)
            commit = self._resolve_commit(repo, revision)
            files = sorted(commit.files)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(commit.created_at))
        info = {"_id": repo_id, "id": repo_id, "author": repo.owner, "sha": commit.oid, "private": repo.private,
                "disabled": False, "gated": False, "lastModified": stamp, "createdAt": stamp, "downloads": 0,
                "likes": 0, "tags": [], "siblings": [{"rfilename": f} for f in files]}
        if repo_type == "model":
            info["modelId"] = repo_id
        return self._send(200, info)

    def _preupload(self, repo_type, repo_id, revision, user, query):
        double = self.double
        payload = self._json_body()
        with double._lock:
            repo = double._writable_repo(repo_type, repo_id, user)
            commit = self._resolve_commit(repo, revision)
            existing = dict(commit.files)
        out = []
        for entry in payload.get("files", []):
            path = entry.get("path")
            if not isinstance(path, str) or not path:
                raise _HTTPError(400, f"preupload: invalid path {path!r}")
            oid = git_blob_oid(existing[path]) if path in existing else None
            out.append({"path": path, "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
        return self._send(200, {"files": out, "commitOid": commit.oid})

    def _commit_route(self, repo_type, repo_id, revision, user, query):
        double = self.double
        if query.get("create_pr"):
            raise _HTTPError(400, "The Hub test double does not emulate pull requests (create_pr)")
        if revision != "main":
            raise _HTTPError(400, f"The Hub test double only commits to 'main', got revision {revision!r}")
        with double._lock:
            double._writable_repo(repo_type, repo_id, user)
        lines = [line for line in self._body().split(b"\n") if line.strip()]
        try:
            items = [json.loads(line) for line in lines]
        except json.JSONDecodeError as exc:
            raise _HTTPError(400, f"commit: body is not valid NDJSON: {exc}") from None
        if not items or items[0].get("key") != "header":
            raise _HTTPError(400, "commit: the first NDJSON line must be the header")
        header = items[0].get("value") or {}
        summary = header.get("summary") or ""
        if not summary:
            raise _HTTPError(400, "commit: empty commit summary")
        double._wait_for_partner()
        # one commit at a time, each applied to the head it finds (as the Hub does); with parentCommit, only if
        # that head is the one the client planned from
        with double._lock:
            repo = double._writable_repo(repo_type, repo_id, user)
            parent = repo.head
            if header.get("parentCommit") and parent.oid != header["parentCommit"]:
                raise _HTTPError(412, "A commit has happened since. Please refresh and try again.")
            fault = double._take_fault()
            staged = dict(parent.files)  # work on a copy: nothing is applied unless the whole commit succeeds
            for index, item in enumerate(items[1:]):
                if fault is not None and index >= fault["after_operations"]:
                    break
                key, value = item.get("key"), item.get("value") or {}
                path = value.get("path")
                if not isinstance(path, str) or not path or path.startswith("/") or ".." in path.split("/"):
                    raise _HTTPError(400, f"commit: invalid path {path!r}")
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise _HTTPError(400, f"commit: unsupported encoding {value.get('encoding')!r} for {path}")
                    try:
                        staged[path] = base64.b64decode(value.get("content", ""), validate=True)
                    except ValueError as exc:
                        raise _HTTPError(400, f"commit: bad base64 for {path}: {exc}") from None
                    if path == "README.md":
                        errors = _validate_card_metadata(staged[path].decode("utf-8", "replace"))
                        if errors:
                            raise _HTTPError(400, "commit: invalid README.md metadata: " + "; ".join(errors))
                elif key == "deletedFile":
                    if path not in staged:
                        raise _HTTPError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    del staged[path]
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    for p in [p for p in staged if p.startswith(prefix)]:
                        del staged[p]
                elif key == "lfsFile":
                    raise _HTTPError(400, f"commit: {path} was sent as LFS; the Hub test double only takes regular "
                                     "files")
                else:
                    raise _HTTPError(400, f"commit: unsupported operation {key!r}")
            if fault is not None:
                if fault["mode"] == "disconnect":
                    raise _Disconnect()
                raise _HTTPError(fault["status"], "Internal Error - the commit was interrupted (fault injected by "
                                 "the Hub test double); nothing was committed")
            new = _Commit(double._new_oid(repo_id, summary), staged, summary, time.time())
            repo.commits.append(new)
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        return self._send(200, {"success": True, "commitOid": new.oid, "pullRequestUrl": None,
                                "commitUrl": f"{self._endpoint()}/{prefix}{repo_id}/commit/{new.oid}"})

    @staticmethod
    def _entries(files, base, recursive):
        base = base.strip("/")
        prefix = base + "/" if base else ""
        dirs, out = set(), []
        for path in sorted(files):
            if not path.startswith(prefix):
                continue
            rel = path[len(prefix):]
            if "/" in rel and not recursive:
                dirs.add(prefix + rel.split("/")[0])
                continue
            parts = rel.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                dirs.add(prefix + "/".join(parts[:i]))
            out.append({"type": "file", "oid": git_blob_oid(files[path]), "size": len(files[path]), "path": path})
        folders = [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                   for d in sorted(dirs)]
        return folders + out

    def _tree(self, repo_type, repo_id, revision, subpath, user, query):
        double = self.double
        with double._lock:
            repo = double._readable_repo(repo_type, repo_id, user)
            files = dict(self._resolve_commit(repo, revision).files)
        subpath = subpath.strip("/")
        if subpath and not any(p.startswith(subpath + "/") for p in files):
            raise _HTTPError(404, f"Entry not found: {subpath}", "EntryNotFound")
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        return self._send(200, self._entries(files, subpath, recursive))

    def _paths_info(self, repo_type, repo_id, revision, user):
        double = self.double
        with double._lock:
            repo = double._readable_repo(repo_type, repo_id, user)
            files = dict(self._resolve_commit(repo, revision).files)
        ctype = self.headers.get("Content-Type", "")
        if ctype.startswith("application/json"):
            paths = self._json_body().get("paths", [])
        else:
            paths = urllib.parse.parse_qs(self._body().decode()).get("paths", [])
        if isinstance(paths, str):
            paths = [paths]
        out = []
        for p in paths:
            p = p.strip("/")
            if p in files:
                out.append({"type": "file", "oid": git_blob_oid(files[p]), "size": len(files[p]), "path": p})
            elif any(f.startswith(p + "/") for f in files):
                out.append({"type": "directory", "oid": hashlib.sha1(p.encode()).hexdigest(), "size": 0, "path": p})
        return self._send(200, out)

    def _resolve(self, repo_type, repo_id, revision, filename, user, method):
        double = self.double
        with double._lock:
            repo = double._readable_repo(repo_type, repo_id, user)
            commit = self._resolve_commit(repo, revision)
            data = commit.files.get(filename)
        if data is None:
            raise _HTTPError(404, f"Entry not found: {filename}", "EntryNotFound")
        etag = f'"{git_blob_oid(data)}"'
        headers = {"X-Repo-Commit": commit.oid, "ETag": etag, "Accept-Ranges": "bytes"}
        rng = self.headers.get("Range")
        if rng and method == "GET":
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if m is None:
                raise _HTTPError(416, f"Unsupported Range header {rng!r}")
            start = int(m.group(1))
            end = int(m.group(2)) if m.group(2) else len(data) - 1
            if start >= len(data) and len(data) > 0:
                raise _HTTPError(416, f"Range {rng!r} starts past the end ({len(data)} bytes)")
            end = min(end, len(data) - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return self._send(206, data[start:end + 1], "application/octet-stream", headers)
        if method == "HEAD":
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            self._status = 200
            return None
        return self._send(200, data, "application/octet-stream", headers)


def _main(argv=None):
    parser = argparse.ArgumentParser(
        description="Serve the in-memory Hub test double on loopback until interrupted (for manual tests).")
    parser.add_argument("--port", type=int, default=0, help="TCP port (default: pick a free one)")
    parser.add_argument("--token", action="append", default=[], metavar="TOKEN=USER",
                        help="accept TOKEN as USER's bearer token (repeatable)")
    args = parser.parse_args(argv)
    tokens = {}
    for item in args.token:
        token, sep, user = item.partition("=")
        if not sep:
            parser.error(f"--token {item!r}: expected TOKEN=USER")
        tokens[token] = user
    with HubTestDouble(tokens=tokens, port=args.port) as hub:
        print(f"Hub test double listening on {hub.endpoint} (Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    _main()
