"""A full disk while a stage rewrites an output of an earlier run: the stage fails with an error that names
the output and says the disk is full, the previous output stays byte for byte, and no temporary is left.

The stages run in a scratch folder holding params.yaml, with the bundled sample as their sources. The disk
fills up in two ways: an `open` in model/files.py that fails part-way through a JSON lines file (always
runs), and a real 8 MiB tmpfs filled up to half the size of the output (where this process may mount one,
e.g. as root; skipped elsewhere).
"""

import errno
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from safetensors import SafetensorError

import model.files
from model.files import DiskFullError, atomic_output
from model.gpt import save_model
from stages import build_bpe, combine, encode, extract_c4, extract_dialog, extract_wikipedia
from tests.paths import REPO_ROOT
from tests.tiny import servable_model

SAMPLE = REPO_ROOT / "data" / "sample"
FILLER = "filler"


def _write_params(folder):
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))
    for section, source in (("wikipedia", "wikipedia"), ("c4", "c4"), ("dialog", "dailydialog")):
        params[section]["source"] = str(SAMPLE / source)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


def _digests(folder):
    """sha256 of every file under `folder` but the filler, by path: what a failed rewrite must not change."""
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != FILLER
    }


def _size(path):
    path = Path(path)
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _assert_fails_for_lack_of_space_and_keeps_everything(folder, run, output):
    before = _digests(folder)
    with pytest.raises(OSError) as raised:
        run()
    message = str(raised.value)
    assert raised.value.errno == errno.ENOSPC, message
    assert "the disk is full" in message and output in message, message
    assert _digests(folder) == before, "the previous outputs are untouched and no temporary is left"


# --- atomic_output on its own --------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        OSError("1048576 requested and 4096 written"),  # numpy's short write: no errno
        SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
    ],
    ids=["ENOSPC", "EDQUOT", "numpy", "safetensors"],
)
def test_atomic_output_reports_a_full_disk_with_the_output_path(tmp_path, error):
    target = tmp_path / "out.bin"
    target.write_bytes(b"previous")
    with pytest.raises(DiskFullError) as raised:
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"part of the new")
            raise error
    assert raised.value.errno == errno.ENOSPC
    assert "the disk is full" in str(raised.value) and str(target) in str(raised.value)
    assert raised.value.__cause__ is error
    assert target.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_atomic_output_passes_other_errors_through(tmp_path):
    with pytest.raises(PermissionError):
        with atomic_output(tmp_path / "out.bin"):
            raise PermissionError(errno.EACCES, "Permission denied")
    with pytest.raises(OSError, match="requested") as raised:  # a short write on a disk with room: not full
        with atomic_output(tmp_path / "out.bin"):
            raise OSError("10 requested and 10 written, oddly")
    assert not isinstance(raised.value, DiskFullError)


# --- a stage's write fails part-way (monkeypatched) ----------------------------------------------


class _FillsUpAfter:
    """A text file that takes `limit` characters, then fails as a full disk does."""

    def __init__(self, file, limit):
        self.file, self.room = file, limit

    def write(self, text):
        if len(text) > self.room:
            self.file.write(text[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(text)
        return self.file.write(text)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.file.close()


@pytest.fixture
def stage_folder(tmp_path, monkeypatch):
    _write_params(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    "stage, args, output",
    [
        (
            extract_wikipedia,
            ("data/extracted/wikipedia.jsonl", "metrics/extract_wikipedia.json"),
            "data/extracted/wikipedia.jsonl",
        ),
        (extract_dialog, ("data/extracted/dialog", "metrics/extract_dialog.json"), "data/extracted/dialog"),
    ],
    ids=["extract_wikipedia", "extract_dialog"],
)
def test_a_write_failing_for_lack_of_space_keeps_the_previous_output(stage_folder, monkeypatch, stage, args, output):
    stage.main(*args)
    limit = _size(output) // 2

    def open_that_fills_up(file, mode="r", *rest, **options):
        opened = open(file, mode, *rest, **options)
        return _FillsUpAfter(opened, limit) if "w" in mode else opened

    monkeypatch.setattr(model.files, "open", open_that_fills_up, raising=False)
    _assert_fails_for_lack_of_space_and_keeps_everything(stage_folder, lambda: stage.main(*args), output)


# --- a real full disk: a small tmpfs -------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MiB tmpfs mounted for the test; skips where mounting is not permitted."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def _fill(folder, leave):
    """Fills the file system of `folder` with a filler file until about `leave` bytes are free."""
    remaining = shutil.disk_usage(folder).free - leave
    chunk = bytes(1 << 16)
    with open(folder / FILLER, "wb") as f:
        while remaining > 0:
            remaining -= f.write(chunk[: min(remaining, len(chunk))])


def test_a_full_tmpfs_fails_each_kind_of_writer_clearly_and_keeps_the_previous_outputs(small_disk, monkeypatch):
    _write_params(small_disk)
    monkeypatch.chdir(small_disk)
    tiny = servable_model(vocab_size=600)
    runs = {  # output: the stage function that writes it, as dvc.yaml calls it
        "data/extracted/wikipedia.jsonl": lambda: extract_wikipedia.main(
            "data/extracted/wikipedia.jsonl", "metrics/extract_wikipedia.json"
        ),
        "data/extracted/c4.jsonl": lambda: extract_c4.main("data/extracted/c4.jsonl", "metrics/extract_c4.json"),
        "data/extracted/dialog": lambda: extract_dialog.main("data/extracted/dialog", "metrics/extract_dialog.json"),
        "data/combined": lambda: combine.main(
            "data/extracted/wikipedia.jsonl", "data/extracted/c4.jsonl", "data/combined", "metrics/combine.json"
        ),
        "data/tokenizer.model": lambda: build_bpe.main(
            "data/combined", "data/extracted/dialog", "data/tokenizer.model"
        ),
        "data/tokens": lambda: encode.main(
            "data/tokenizer.model", "data/combined", "data/extracted/dialog", "data/tokens"
        ),
        "models/pretrain": lambda: save_model(tiny, "models/pretrain"),  # what pretrain ends with
    }
    for run in runs.values():
        run()
    # JSON lines, a folder of JSON lines, numpy arrays (no errno on a short write), safetensors (nor there).
    for output in ("data/extracted/wikipedia.jsonl", "data/combined", "data/tokens", "models/pretrain"):
        _fill(small_disk, leave=_size(output) // 2)
        try:
            _assert_fails_for_lack_of_space_and_keeps_everything(small_disk, runs[output], output)
        finally:
            (small_disk / FILLER).unlink()
