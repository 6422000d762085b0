"""Atomic outputs: a stage killed half-way never leaves a file that looks finished."""

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path


def _remove(path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_output(path):
    """Yields a temporary path beside `path` (file or folder) and moves it onto `path` on success.

    On any error the temporary is removed and whatever was at `path` before is untouched.
    Leftovers of writers that were killed (SIGKILL skips cleanup) are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        _remove(stale)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        if path.is_dir():
            # A folder cannot be replaced in one rename: move the old one aside first.
            old = path.with_name(f".{path.name}.tmp-old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            _remove(tmp)


def json_text(obj):
    """The one JSON style of the project: sorted keys, so reruns are byte-identical."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_json(path, obj):
    with atomic_output(path) as tmp:
        tmp.write_text(json_text(obj), encoding="utf-8")


def write_jsonl(path, records):
    """Writes one JSON value per line; returns how many were written."""
    count = 0
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
            count += 1
    return count


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)
