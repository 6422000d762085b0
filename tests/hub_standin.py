"""A stand-in for the Hugging Face hub on 127.0.0.1, with fault injection, for the data-extraction tests.

It serves local folders (the bundled sample is in the hub layouts) as dataset repos, through just the
endpoints that `huggingface_hub` and `datasets` streaming call:

    GET  /api/datasets/{repo}[/revision/{rev}]          dataset_info: the commit sha and the file list
    GET  /api/datasets/{repo}/tree/{rev}[/{path}]        HfFileSystem.ls, for datasets' file patterns
    HEAD /datasets/{repo}/resolve/{rev}/{file}           hf_hub_download's metadata (ETag, X-Repo-Commit)
    GET  /datasets/{repo}/resolve/{rev}/{file}           the bytes, whole or one `Range: bytes=a-b`

(Found by logging what huggingface_hub 2.4 and datasets 5.2 request; a request for any other endpoint is
recorded in `unrouted`.) Every repo has one commit, a sha derived from its files, so a manifest's `revision`
can be checked. Faults are added per test with `fail(...)`; every request is logged in `requests` with the
fault it got.

    with HubStandin({"allenai/c4": SAMPLE / "c4"}) as hub:
        hub.fail("drop", "/resolve/", times=2)       # the first two file requests lose the connection
        result = run_stages(hub.environ(tmp_path), workdir, ("stages.extract_c4", OUT, MANIFEST))
"""

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

FAULT_KINDS = ("drop", "status", "stall")


@dataclass
class Fault:
    """`kind` for requests whose path matches `path` (a regex) and method is in `methods`.

    drop: the headers and half the body are sent, then the socket is closed (a HEAD gets no answer at all).
    status: answers `status` with a short JSON error.
    stall: waits `seconds` (meant to be longer than the client's timeout), then closes the socket.
    `times`: how many matching requests get the fault; None for every one.
    """

    kind: str
    path: str = ""
    times: int | None = None
    methods: tuple = ("GET", "HEAD")
    status: int = 500
    seconds: float = 30.0
    hits: int = 0

    def applies(self, method, path):
        return (
            method in self.methods
            and re.search(self.path, path) is not None
            and (self.times is None or self.hits < self.times)
        )


@dataclass
class Request:
    method: str
    path: str
    fault: str | None = None
    range: str | None = None
    at: float = field(default_factory=time.monotonic)


@dataclass
class _Repo:
    folder: Path
    sha: str
    files: dict = field(default_factory=dict)  # repo path -> (size, git blob oid)


def _scan(folder):
    folder = Path(folder)
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        git_oid = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        files[path.relative_to(folder).as_posix()] = (len(data), git_oid)
    sha = hashlib.sha1(json.dumps(sorted(files.items())).encode()).hexdigest()
    return _Repo(folder, sha, files)


class HubStandin:
    def __init__(self, repos):
        """`repos` maps a dataset id (owner/name) to a local folder in the hub layout."""
        self.repos = {repo_id: _scan(folder) for repo_id, folder in repos.items()}
        self.faults = []
        self.requests = []
        self.unrouted = []  # requests for endpoints the stand-in does not implement: a client that changed
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._closing.set()  # wakes stalled handlers
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def sha(self, repo_id):
        return self.repos[repo_id].sha

    def fail(self, kind, path="", times=None, **options):
        assert kind in FAULT_KINDS, kind
        fault = Fault(kind, path, times, **options)
        with self._lock:
            self.faults.append(fault)
        return fault

    def environ(self, tmp_path):
        """Environment for a subprocess that must talk to this stand-in only, with its caches in tmp_path."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
        env.update(
            HF_ENDPOINT=self.url,
            HF_HOME=str(Path(tmp_path) / "hf-home"),
            HF_DATASETS_CACHE=str(Path(tmp_path) / "hf-datasets-cache"),
            HF_HUB_DISABLE_TELEMETRY="1",
            NO_PROXY="127.0.0.1,localhost",
            no_proxy="127.0.0.1,localhost",
        )
        return env

    # --- request handling ---------------------------------------------------------------------------

    def _take_fault(self, method, path):
        with self._lock:
            for fault in self.faults:
                if fault.applies(method, path):
                    fault.hits += 1
                    return fault
        return None

    def _log(self, request):
        with self._lock:
            self.requests.append(request)


def _handler(hub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def do_GET(self):
            self._dispatch("GET")

        def do_HEAD(self):
            self._dispatch("HEAD")

        def do_POST(self):  # no POST endpoint is implemented: recorded in `unrouted`
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self._dispatch("POST")

        # --- plumbing -----------------------------------------------------------------------------

        def _dispatch(self, method):
            url = urlsplit(self.path)
            path = unquote(url.path)
            fault = hub._take_fault(method, path)
            self._drop = fault is not None and fault.kind == "drop"  # answer, but cut the body short
            hub._log(Request(method, self.path, fault.kind if fault else None, self.headers.get("Range")))
            if fault and fault.kind == "stall":
                hub._closing.wait(fault.seconds)
                self._abort()
                return
            if fault and fault.kind == "status":
                self._json(fault.status, {"error": f"injected {fault.status}"}, method)
                return
            try:
                self._route(method, path, parse_qs(url.query))
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

        def _abort(self):
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        def _send(self, status, body, method, headers=(), content_type="application/json"):
            if self._drop and method != "GET":
                self._abort()
                return
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers:
                self.send_header(name, value)
            self.end_headers()
            if method == "HEAD":
                return
            if self._drop:
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self._abort()
                return
            self.wfile.write(body)

        def _json(self, status, obj, method="GET", headers=()):
            self._send(status, json.dumps(obj).encode(), method, headers)

        def _not_found(self, method, what, code="EntryNotFound"):
            self._json(404, {"error": f"{what} not found"}, method, [("X-Error-Code", code)])

        # --- the hub API --------------------------------------------------------------------------

        def _route(self, method, path, query):
            match = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
            if match and method in ("GET", "HEAD"):
                return self._dataset_info(method, match[1], match[2])
            match = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path)
            if match and method == "GET":
                return self._tree(method, match[1], match[2], (match[3] or "").strip("/"), query)
            match = re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if match and method in ("GET", "HEAD"):
                return self._resolve(method, match[1], match[2], match[3])
            hub.unrouted.append(f"{method} {path}")
            self._not_found(method, path, code="")

        def _repo(self, method, repo_id, revision):
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._json(404, {"error": "Repository not found"}, method, [("X-Error-Code", "RepoNotFound")])
                return None
            if revision not in (None, "main", repo.sha):
                self._json(404, {"error": "Invalid rev id"}, method, [("X-Error-Code", "RevisionNotFound")])
                return None
            return repo

        def _dataset_info(self, method, repo_id, revision):
            repo = self._repo(method, repo_id, revision)
            if repo:
                self._json(
                    200,
                    {
                        "_id": repo.sha[:24],
                        "id": repo_id,
                        "author": repo_id.split("/")[0],
                        "sha": repo.sha,
                        "lastModified": "2024-01-01T00:00:00.000Z",
                        "private": False,
                        "gated": False,
                        "disabled": False,
                        "downloads": 0,
                        "likes": 0,
                        "tags": [],
                        "cardData": {},
                        "siblings": [{"rfilename": name} for name in repo.files],
                    },
                    method,
                )

        def _entry(self, repo, name):
            if name in repo.files:
                size, oid = repo.files[name]
                return {"type": "file", "oid": oid, "size": size, "path": name}
            if any(f.startswith(name + "/") for f in repo.files) or name == "":
                return {"type": "directory", "oid": hashlib.sha1(name.encode()).hexdigest(), "size": 0, "path": name}
            return None

        def _tree(self, method, repo_id, revision, folder, query):
            repo = self._repo(method, repo_id, revision)
            if not repo:
                return
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            if folder and self._entry(repo, folder) is None:
                return self._not_found(method, folder)
            prefix = folder + "/" if folder else ""
            names = set()
            for name in repo.files:
                if not name.startswith(prefix):
                    continue
                parts = name[len(prefix) :].split("/")
                for depth in range(1, len(parts) + 1 if recursive else 2):
                    names.add(prefix + "/".join(parts[:depth]))
            self._json(200, [self._entry(repo, name) for name in sorted(names)], method)

        def _resolve(self, method, repo_id, revision, name):
            repo = self._repo(method, repo_id, revision)
            if not repo:
                return
            if name not in repo.files:
                return self._not_found(method, name)
            size, oid = repo.files[name]
            headers = [("ETag", f'"{oid}"'), ("X-Repo-Commit", repo.sha), ("Accept-Ranges", "bytes")]
            start, end, status = 0, size - 1, 200
            requested = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
            if requested and size:
                if requested[1]:
                    start, end = int(requested[1]), min(int(requested[2] or size - 1), size - 1)
                else:  # bytes=-N: the last N bytes
                    start = max(0, size - int(requested[2]))
                if start > end:
                    return self._json(
                        416, {"error": "range not satisfiable"}, method, [("Content-Range", f"bytes */{size}")]
                    )
                status = 206
                headers.append(("Content-Range", f"bytes {start}-{end}/{size}"))
            if method == "HEAD":
                data = b"\0" * (end - start + 1)  # only its length is sent
            else:
                with open(repo.folder / name, "rb") as f:
                    f.seek(start)
                    data = f.read(end - start + 1)
            self._send(status, data, method, headers, content_type="application/octet-stream")

    return Handler


# --- running stage scripts against the stand-in ----------------------------------------------------

CLIENT_TIMEOUT_SECONDS = 0.3  # of every hub request in a test run; a "stall" fault must last longer
CLOCK_SPEEDUP = 100  # every retry wait (time.sleep) in a test run is this much shorter
DATASETS_RETRIES = 3  # datasets' retries of a lost read, 20 outside the tests


def scale_down_retries():
    """Makes a persistent fault fail a stage in seconds: called in the stage's process, before the stage runs.

    Every wait between retries is CLOCK_SPEEDUP times shorter (time.sleep is scaled, which reaches the waits of
    huggingface_hub, datasets and model/sources.py alike) and every request times out after
    CLIENT_TIMEOUT_SECONDS. The retry counts of huggingface_hub (6 tries of a request) and model/sources.py (3)
    stay; datasets' retries of a read that lost its connection go from 20 to DATASETS_RETRIES.
    """
    import datasets
    import huggingface_hub.constants
    from huggingface_hub import file_download

    import model.sources

    real_sleep = time.sleep
    time.sleep = lambda seconds: real_sleep(seconds / CLOCK_SPEEDUP)
    huggingface_hub.constants.HF_HUB_DOWNLOAD_TIMEOUT = CLIENT_TIMEOUT_SECONDS
    huggingface_hub.constants.HF_HUB_ETAG_TIMEOUT = CLIENT_TIMEOUT_SECONDS
    file_download._ETAG_RETRY_TIMEOUT = CLIENT_TIMEOUT_SECONDS  # the second HEAD before a download: 60 s
    model.sources.HUB_TIMEOUT_SECONDS = CLIENT_TIMEOUT_SECONDS
    datasets.config.STREAMING_READ_MAX_RETRIES = DATASETS_RETRIES
    datasets.config.STREAMING_OPEN_MAX_RETRIES = DATASETS_RETRIES


# Runs `python -m MODULE ARGS...` for each [MODULE, *ARGS] of the JSON list in argv[1], in one process.
_RUNNER = """
import json, runpy, sys
from tests.hub_standin import scale_down_retries
scale_down_retries()
for module, *args in json.loads(sys.argv[1]):
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def run_stages(env, cwd, *commands, timeout=120):
    """Runs stage scripts (`("stages.extract_c4", OUT, MANIFEST)`, ...) in a fresh interpreter with `env`.

    The stages read params.yaml from `cwd`; the repository is put on PYTHONPATH.
    """
    root = str(Path(__file__).resolve().parents[1])
    env = dict(env, PYTHONPATH=os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")])))
    return subprocess.run(
        [sys.executable, "-c", _RUNNER, json.dumps([list(map(str, c)) for c in commands])],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


if __name__ == "__main__":  # a manual run: python -m tests.hub_standin, then HF_ENDPOINT=... in another shell
    SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"
    with HubStandin(
        {
            "wikimedia/wikipedia": SAMPLE / "wikipedia",
            "allenai/c4": SAMPLE / "c4",
            "roskoN/dailydialog": SAMPLE / "dailydialog",
        }
    ) as hub:
        print(hub.url, flush=True)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
