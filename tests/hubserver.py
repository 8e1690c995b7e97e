"""A stand-in for the Hugging Face hub on loopback: enough of its HTTP API for huggingface_hub 2.4.

Tests of `layertime prefetch` point ``HF_ENDPOINT`` at this server and let the real download code run
(`snapshot_download`, `hf_hub_download`, `HfApi.model_info` / `dataset_info` / `list_repo_tree`). What
huggingface_hub 2.4 asks for, and what this server answers, read from its sources:

- ``GET /api/{models,datasets}/{repo}/revision/{rev}`` -> ``{"id", "sha", "siblings": [...]}``
  (`repo_info`, the commit a revision points at). Unknown repo: 404 with ``X-Error-Code: RepoNotFound``;
  unknown revision: 404 with ``X-Error-Code: RevisionNotFound``.
- ``GET /api/{models,datasets}/{repo}/tree/{rev}?recursive=True`` -> ``[{"type": "file", "path", "size",
  "oid", "lfs": {"oid", "size", "pointerSize"}}]`` (`list_repo_tree`; one page, no ``Link`` header).
- ``HEAD|GET /{repo}/resolve/{rev}/{path}`` (models) and ``/datasets/{repo}/resolve/...``: small files
  answer 200 with ``ETag`` (git blob sha1), ``X-Repo-Commit`` and ``Content-Length``. LFS files answer
  302 like the hub: ``Location`` on another origin (the "CDN": a second port of this server, so the
  client does not follow the HEAD redirect), ``X-Linked-Etag`` (sha256), ``X-Linked-Size`` and
  ``X-Repo-Commit``; the GET then goes to the CDN. Missing file: 404 ``EntryNotFound`` with the commit.
- ``GET /cdn/{sha256}`` on the CDN port: the bytes (``Range: bytes=N-`` honoured).

Every request is counted, and so are the file bytes sent, so a test can assert that a second prefetch
transferred nothing. Repos are built in memory (`FakeHub.add`) or read from a hub cache directory
(`FakeHub.add_from_cache`, e.g. the demo model's fabricated cache).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from layertime.hub.fake import blob_etag, default_commit


@dataclass
class _Repo:
    files: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit -> path -> content
    refs: dict[str, str] = field(default_factory=dict)  # revision -> commit

    def commit_of(self, revision: str) -> str | None:
        if revision in self.files:
            return revision
        return self.refs.get(revision)


def _is_lfs(path: str, content: bytes) -> bool:
    # blob_etag gives LFS files (weights, by suffix) a sha256 etag; data files (parquet) are LFS on the hub too.
    return len(blob_etag(path, content)) == 64 or path.endswith((".parquet", ".arrow"))


def _entry(path: str, content: bytes) -> dict:
    """A file as the hub's tree and siblings listings describe it."""
    oid = hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
    entry = {"type": "file", "path": path, "size": len(content), "oid": oid}
    if _is_lfs(path, content):
        entry["lfs"] = {"oid": hashlib.sha256(content).hexdigest(), "size": len(content), "pointerSize": 134}
    return entry


def _tree(files: dict[str, bytes], folder: str, recursive: bool) -> list[dict]:
    """The tree endpoint: the files under `folder`, and (not recursive) its direct subfolders."""
    base = f"{folder}/" if folder else ""
    out, folders = [], set()
    for path, content in sorted(files.items()):
        if not path.startswith(base):
            continue
        rest = path[len(base) :]
        if recursive or "/" not in rest:
            out.append(_entry(path, content))
        if "/" in rest:
            parts = rest.split("/")[:-1]
            depth = len(parts) if recursive else 1
            folders |= {base + "/".join(parts[: i + 1]) for i in range(depth)}
    tree_id = hashlib.sha1(base.encode()).hexdigest()
    return [{"type": "directory", "path": p, "oid": tree_id, "size": 0} for p in sorted(folders)] + out


class FakeHub:
    """The repos, the two servers (hub API and CDN) and the request and byte counters."""

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], _Repo] = {}  # (repo_type, repo_id) -> repo
        self.requests: Counter[str] = Counter()  # "HEAD resolve", "GET cdn", "GET api:revision", ...
        self.bytes_sent = 0  # file content only (resolve and CDN bodies), not JSON
        self.files_sent: list[str] = []  # "repo@commit:path" per file body sent
        self._lock = threading.Lock()
        self._blobs: dict[str, bytes] = {}  # sha256 -> content, for the CDN
        self._servers: list[ThreadingHTTPServer] = []
        self.endpoint = ""
        self.cdn = ""

    # ------------------------------------------------------------------ content

    def add(
        self,
        repo_id: str,
        files: dict[str, bytes],
        revisions: list[str],
        repo_type: str = "model",
        commit: str | None = None,
    ) -> str:
        """Publish `files` as one commit of `repo_id` and point `revisions` at it; return the commit."""
        commit = commit or default_commit(f"{repo_type}:{repo_id}", files)
        repo = self.repos.setdefault((repo_type, repo_id), _Repo())
        repo.files[commit] = dict(files)
        for revision in revisions:
            repo.refs[revision] = commit
        for path, content in files.items():
            if _is_lfs(path, content):
                self._blobs[hashlib.sha256(content).hexdigest()] = content
        return commit

    def add_from_cache(self, cache_dir: Path, source_repo: str, repo_id: str) -> dict[str, str]:
        """Publish every revision of `source_repo` found in hub cache `cache_dir` as `repo_id`."""
        source = Path(cache_dir) / ("models--" + source_repo.replace("/", "--"))
        commits: dict[str, str] = {}
        for ref in sorted((source / "refs").iterdir()):
            commit = ref.read_text().strip()
            snapshot = source / "snapshots" / commit
            files = {p.name: p.read_bytes() for p in sorted(snapshot.iterdir()) if p.is_file()}
            commits[ref.name] = self.add(repo_id, files, [ref.name], commit=commit)
        return commits

    def remove_revision(self, repo_id: str, revision: str, repo_type: str = "model") -> None:
        del self.repos[(repo_type, repo_id)].refs[revision]

    def reset_counters(self) -> None:
        with self._lock:
            self.requests.clear()
            self.bytes_sent = 0
            self.files_sent = []

    def _count(self, what: str, sent: int = 0, name: str | None = None) -> None:
        with self._lock:
            self.requests[what] += 1
            self.bytes_sent += sent
            if name is not None:
                self.files_sent.append(name)

    # ------------------------------------------------------------------ serving

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        class CdnHandler(_CdnHandler):
            fake = hub

        for handler in (Handler, CdnHandler):
            server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, name="fake-hub", daemon=True).start()
            self._servers.append(server)
        self.endpoint = f"http://127.0.0.1:{self._servers[0].server_address[1]}"
        self.cdn = f"http://127.0.0.1:{self._servers[1].server_address[1]}"
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers = []

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


_API = re.compile(
    r"^/api/(?P<type>models|datasets)/(?P<repo>[^/]+/[^/]+)/(?P<op>revision|tree)/(?P<rest>.+)$"
)
_RESOLVE = re.compile(r"^/(?:(?P<type>datasets)/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


class _Base(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects from the hub
    fake: FakeHub

    def log_message(self, format: str, *args) -> None:  # quiet
        pass

    def _send(self, status: int, headers: dict[str, str], body: bytes = b"", head: bool = False) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", headers.get("Content-Length", str(len(body))))
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _json(self, obj, status: int = 200) -> None:
        self._send(status, {"Content-Type": "application/json"}, json.dumps(obj).encode())

    def _error(self, status: int, code: str, extra: dict[str, str] | None = None, head: bool = False) -> None:
        body = json.dumps({"error": code}).encode()
        headers = {"X-Error-Code": code, "X-Error-Message": code, "Content-Type": "application/json"}
        self._send(status, {**headers, **(extra or {})}, body, head=head)


class _Handler(_Base):
    def do_GET(self) -> None:
        self._route(head=False)

    def do_HEAD(self) -> None:
        self._route(head=True)

    def _route(self, head: bool) -> None:
        path = urlsplit(self.path).path
        if m := _API.match(path):
            self.fake._count(f"GET api:{m['op']}")
            self._api(m["type"][:-1], unquote(m["repo"]), m["op"], unquote(m["rest"]))
        elif m := _RESOLVE.match(path):
            self._resolve(m["type"][:-1] if m["type"] else "model", unquote(m["repo"]), unquote(m["rev"]),
                          unquote(m["path"]), head)  # fmt: skip
        else:
            self.fake._count(f"{self.command} other")
            self._error(404, "NotFound", head=head)

    def _lookup(self, repo_type: str, repo_id: str, revision: str, head: bool = False):
        repo = self.fake.repos.get((repo_type, repo_id))
        if repo is None:
            self._error(404, "RepoNotFound", head=head)
            return None, None
        commit = repo.commit_of(revision)
        if commit is None:
            self._error(404, "RevisionNotFound", head=head)
            return None, None
        return repo, commit

    def _api(self, repo_type: str, repo_id: str, op: str, rest: str) -> None:
        revision, _, prefix = rest.partition("/") if op == "tree" else (rest, "", "")
        repo, commit = self._lookup(repo_type, repo_id, revision)
        if repo is None:
            return
        files = repo.files[commit]
        if op == "tree":
            recursive = "recursive=true" in urlsplit(self.path).query.lower()
            self._json(_tree(files, prefix.strip("/"), recursive))
            return
        entries = [_entry(p, c) for p, c in sorted(files.items())]
        siblings = [{"rfilename": e["path"]} for e in entries]
        if "blobs=" in urlsplit(self.path).query:  # files_metadata=True: sizes and LFS info, as the hub does
            for sibling, e in zip(siblings, entries, strict=True):
                sibling |= {"size": e["size"], "blobId": e["oid"]}
                if "lfs" in e:
                    sibling["lfs"] = {"sha256": e["lfs"]["oid"], "size": e["size"], "pointerSize": 134}
        self._json({"id": repo_id, "sha": commit, "private": False, "siblings": siblings})

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str, head: bool) -> None:
        self.fake._count(f"{self.command} resolve")
        repo, commit = self._lookup(repo_type, repo_id, revision, head)
        if repo is None:
            return
        content = repo.files[commit].get(path)
        if content is None:
            self._error(404, "EntryNotFound", {"X-Repo-Commit": commit}, head=head)
            return
        entry = _entry(path, content)
        headers = {"X-Repo-Commit": commit, "ETag": f'"{entry["oid"]}"', "Accept-Ranges": "bytes"}
        if "lfs" in entry:
            sha = entry["lfs"]["oid"]
            headers |= {"Location": f"{self.fake.cdn}/cdn/{sha}", "X-Linked-Etag": f'"{sha}"',
                        "X-Linked-Size": str(len(content))}  # fmt: skip
            self._send(302, headers, b"", head=head)
            return
        if not head:
            self.fake._count("file", len(content), f"{repo_id}@{commit}:{path}")
        self._send(200, {**headers, "Content-Length": str(len(content))}, content, head=head)


class _CdnHandler(_Base):
    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def _serve(self, head: bool) -> None:
        self.fake._count(f"{self.command} cdn")
        sha = urlsplit(self.path).path.removeprefix("/cdn/")
        content = self.fake._blobs.get(sha)
        if content is None:
            self._send(404, {}, b"no such blob", head=head)
            return
        start = 0
        if m := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "")):
            start = min(int(m[1]), len(content))
        body = content[start:]
        headers = {"ETag": f'"{sha}"', "Content-Length": str(len(body)), "Accept-Ranges": "bytes"}
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(content) - 1}/{len(content)}"
        if not head:
            self.fake._count("file", len(body), f"cdn:{sha}")
        self._send(206 if start else 200, headers, body, head=head)
