"""Atomic outputs: a stage killed half-way never leaves a file that looks finished."""

import errno
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

from model.errors import PipelineError


def _remove(path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


class DiskFullError(PipelineError, OSError):
    """The disk (or the quota) filled up while an output was written; the previous output is untouched."""


NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _is_disk_full(error):
    """ENOSPC or EDQUOT, also where a library drops the errno: numpy's short write ("N requested and M
    written"), and safetensors' Rust I/O error ("... (os error 28)")."""
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno in NO_SPACE
    if isinstance(error, OSError) and re.fullmatch(r"\d+ requested and \d+ written", str(error)):
        return True
    match = re.search(r"\(os error (\d+)\)", str(error))
    return match is not None and int(match.group(1)) in NO_SPACE


@contextmanager
def atomic_output(path):
    """Yields a temporary path beside `path` (file or folder) and moves it onto `path` on success.

    On any error the temporary is removed and whatever was at `path` before is untouched; a full disk
    is reported as DiskFullError naming `path`. Leftovers of writers that were killed (SIGKILL skips
    cleanup) are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        _remove(stale)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        try:
            yield tmp
        except Exception as error:
            if not _is_disk_full(error):
                raise
            raise DiskFullError(
                errno.ENOSPC,
                f"No space left on device while writing {path}: the disk is full. "
                f"Free some space and rerun; the previous {path}, if any, is untouched",
            ) from error
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
