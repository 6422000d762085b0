"""Damaged inputs, through the extraction stages: each is a clear error that names the file, and no output.

The rule (model/sources.py, model/dialog.py): a file that cannot be read whole stops the stage rather than
being skipped, because a skipped shard or a turn full of U+FFFD would silently change the training data.
A very long document is not damaged: it is kept whole, in memory bounded by the document, not the corpus.
"""

import gzip
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from model.sources import SourceError
from tests.paths import REPO_ROOT

SAMPLE = REPO_ROOT / "data" / "sample"
WIKIPEDIA_FILE = "20231101.sample/train-00000-of-00001.parquet"
PREVIOUS = '{"text": "the previous, good output"}\n'


def _stage(name, work, monkeypatch, **changes):
    """Writes params.yaml (the sample profile with `changes` to section `name`) and returns the stage's main."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))
    params[name].update({key: str(value) if isinstance(value, Path) else value for key, value in changes.items()})
    work.mkdir(parents=True, exist_ok=True)
    (work / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    monkeypatch.chdir(work)
    return __import__(f"stages.extract_{name}", fromlist=["main"]).main


def _leftovers(folder):
    return sorted(path.name for path in folder.iterdir() if ".tmp-" in path.name)


def _c4_rows(n, start=0):
    return [
        {
            "text": f"News item {i}. " + "It happened on a Tuesday, and the council met. " * 6,
            "timestamp": "2019-04-10T10:00:00Z",
            "url": f"https://news.example/{i}",
        }
        for i in range(start, start + n)
    ]


# --- parquet (Wikipedia) --------------------------------------------------------------------------


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _overwrite_with_garbage(path):
    data = bytearray(path.read_bytes())
    data[1000:5000] = bytes(range(256)) * 15 + bytes(160)  # the first data pages: fixed, not random, garbage
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _overwrite_with_garbage], ids=["truncated", "garbage"])
def test_a_damaged_parquet_file_is_an_error_naming_the_file(tmp_path, monkeypatch, damage):
    source = tmp_path / "wikipedia"
    shutil.copytree(SAMPLE / "wikipedia", source)
    damage(source / WIKIPEDIA_FILE)
    work = tmp_path / "work"
    main = _stage("wikipedia", work, monkeypatch, source=source)
    (work / "out.jsonl").write_text(PREVIOUS, encoding="utf-8")
    with pytest.raises(SourceError) as info:
        main("out.jsonl", "manifest.json")
    message = str(info.value)
    assert str(source / WIKIPEDIA_FILE) in message
    assert "wikipedia.source" in message and "damaged" in message
    assert (work / "out.jsonl").read_text(encoding="utf-8") == PREVIOUS, "the earlier output is left as it was"
    assert not (work / "manifest.json").exists()
    assert _leftovers(work) == []


# --- gzip JSON lines (C4) -------------------------------------------------------------------------


def test_a_truncated_c4_shard_is_an_error_naming_it_after_the_good_shards(tmp_path, monkeypatch, make_c4):
    source = make_c4(tmp_path / "c4", [_c4_rows(40), _c4_rows(400, start=40)])
    shard = source / "realnewslike" / "c4-train.00001-of-00512.json.gz"
    _truncate(shard)
    work = tmp_path / "work"
    main = _stage("c4", work, monkeypatch, source=source)
    with pytest.raises(SourceError) as info:
        main("out.jsonl", "manifest.json")
    assert str(shard) in str(info.value)
    assert "EOFError" in str(info.value)
    assert not (work / "out.jsonl").exists(), "the first shard's documents must not be left as a complete-looking file"
    assert _leftovers(work) == []


def test_invalid_utf8_in_a_c4_json_line_is_an_error_naming_the_file(tmp_path, monkeypatch, make_c4):
    source = make_c4(tmp_path / "c4", [_c4_rows(3)])
    shard = source / "realnewslike" / "c4-train.00000-of-00512.json.gz"
    good = gzip.decompress(shard.read_bytes()).splitlines(keepends=True)
    bad = b'{"text": "caf\xe9 ' + b"and a long enough sentence. " * 10 + b'", "timestamp": "x", "url": "u"}\n'
    shard.write_bytes(gzip.compress(good[0] + bad + good[1]))
    work = tmp_path / "work"
    main = _stage("c4", work, monkeypatch, source=source)
    with pytest.raises(SourceError) as info:
        main("out.jsonl", "manifest.json")
    assert str(shard) in str(info.value)
    assert "UnicodeDecodeError" in str(info.value)
    assert not (work / "out.jsonl").exists()


def test_a_50_mb_document_is_kept_whole_in_bounded_memory_and_time(tmp_path, make_c4):
    # Lines of ~1 kB in one 50 MB document; the byte cap (10 MB) is reached inside it: the document is kept
    # whole (documents are never cut), the stage stops after it, and the next one is not read.
    paragraph = "The council met again on Tuesday and talked about the new bridge over the river. " * 12
    huge = "\n".join([paragraph] * (50_000_000 // (len(paragraph) + 1)))
    source = tmp_path / "c4" / "realnewslike"
    source.mkdir(parents=True)
    with gzip.open(source / "c4-train.00000-of-00512.json.gz", "wt", encoding="utf-8", compresslevel=1) as f:
        for row in _c4_rows(1) + [dict(_c4_rows(1)[0], text=huge)] + _c4_rows(1, start=1):
            f.write(json.dumps(row) + "\n")
    del huge
    work = tmp_path / "work"
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["c4"].update(source=str(tmp_path / "c4"), max_bytes=10_000_000)
    work.mkdir()
    (work / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    script = (
        "import resource, sys\nfrom stages.extract_c4 import main\nmain('out.jsonl', 'manifest.json')\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )  # KiB on Linux
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf")),
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    peak_mb = int(result.stdout.split()[-1]) / 1024
    manifest = json.loads((work / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["documents_read"] == manifest["documents_kept"] == 2
    assert manifest["stopped_at_cap"] == 1
    assert manifest["bytes_kept"] > 49_000_000
    assert (work / "out.jsonl").stat().st_size > 49_000_000
    # about 0.35 GB for the interpreter and its libraries, and a few copies of the document while it is cleaned
    assert peak_mb < 1200, f"peak memory {peak_mb:.0f} MB for a 50 MB document"
    assert elapsed < 30, f"took {elapsed:.1f}s"


# --- DailyDialog zips -----------------------------------------------------------------------------

DIALOGUE = "Hi , how are you ? __eou__ I ' m fine , thanks . __eou__"


def test_a_dailydialog_zip_without_its_split_member_is_an_error_naming_zip_and_member(
    tmp_path, monkeypatch, make_dailydialog
):
    source = make_dailydialog(tmp_path / "dd", {split: [DIALOGUE] for split in ("train", "validation", "test")})
    with zipfile.ZipFile(source / "validation.zip", "w") as archive:
        archive.writestr("validation/dialogues_act_validation.txt", "1 2\n")  # the wrong member only
    work = tmp_path / "work"
    main = _stage("dialog", work, monkeypatch, source=source)
    with pytest.raises(ValueError) as info:
        main("dialog", "manifest.json")
    assert str(source / "validation.zip") in str(info.value)
    assert "validation/dialogues_validation.txt" in str(info.value)
    assert not (work / "dialog").exists() and not (work / "manifest.json").exists()
    assert _leftovers(work) == []


def test_a_missing_dailydialog_split_zip_is_an_error_naming_it(tmp_path, monkeypatch, make_dailydialog):
    source = make_dailydialog(tmp_path / "dd", {split: [DIALOGUE] for split in ("train", "test")})
    work = tmp_path / "work"
    main = _stage("dialog", work, monkeypatch, source=source)
    with pytest.raises(SourceError) as info:
        main("dialog", "manifest.json")
    assert "validation.zip" in str(info.value) and "dialog.source" in str(info.value)
    assert not (work / "dialog").exists()


def test_invalid_utf8_in_dailydialog_text_is_an_error_naming_the_zip(tmp_path, monkeypatch, make_dailydialog):
    source = make_dailydialog(tmp_path / "dd", {split: [DIALOGUE] for split in ("train", "validation", "test")})
    with zipfile.ZipFile(source / "test.zip", "w") as archive:
        archive.writestr("test/dialogues_test.txt", DIALOGUE.encode() + b" Caf\xe9 ! __eou__\n")
    work = tmp_path / "work"
    (work / "dialog").mkdir(parents=True)
    (work / "dialog" / "train.jsonl").write_text('["previous"]\n', encoding="utf-8")
    main = _stage("dialog", work, monkeypatch, source=source)
    with pytest.raises(ValueError) as info:
        main("dialog", "manifest.json")
    assert str(source / "test.zip") in str(info.value) and "not UTF-8" in str(info.value)
    assert [path.name for path in (work / "dialog").iterdir()] == ["train.jsonl"], "the earlier output is intact"
    assert (work / "dialog" / "train.jsonl").read_text(encoding="utf-8") == '["previous"]\n'
    assert _leftovers(work) == []


def test_a_damaged_member_of_a_dailydialog_zip_is_an_error_naming_the_zip(tmp_path, monkeypatch, make_dailydialog):
    lines = [f"Dialogue {i} , line {i * 7 % 13} . __eou__ Reply number {i} ! __eou__" for i in range(2000)]
    source = make_dailydialog(tmp_path / "dd", {split: [DIALOGUE] for split in ("validation", "test")})
    with zipfile.ZipFile(source / "train.zip", "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("train/dialogues_train.txt", "\n".join(lines))
    data = bytearray((source / "train.zip").read_bytes())
    data[100:300] = bytes(byte ^ 0x5A for byte in data[100:300])  # inside the compressed member
    (source / "train.zip").write_bytes(bytes(data))
    work = tmp_path / "work"
    main = _stage("dialog", work, monkeypatch, source=source)
    with pytest.raises(ValueError) as info:
        main("dialog", "manifest.json")
    assert str(source / "train.zip") in str(info.value) and "not a readable zip file" in str(info.value)
    assert not (work / "dialog").exists()


@pytest.mark.parametrize(
    "stage", sorted(path.stem for path in (REPO_ROOT / "stages").glob("*.py") if path.stem != "__init__")
)
def test_a_stage_given_the_wrong_number_of_arguments_prints_its_usage_line(stage, tmp_path):
    """Not a TypeError traceback from main(*sys.argv[1:]): the docstring's usage line, exit status 2, and
    nothing read or written (it runs in an empty folder, with no params.yaml)."""
    result = subprocess.run(
        [sys.executable, "-m", f"stages.{stage}", "one-argument-too-few-or-many"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
    )
    usage = next(
        line for line in (REPO_ROOT / "stages" / f"{stage}.py").read_text().splitlines() if line.startswith("usage:")
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[0] == usage and "arguments, got 1" in result.stderr
    assert list(tmp_path.iterdir()) == []
