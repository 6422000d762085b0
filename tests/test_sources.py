"""Raw data sources: local folders in the hub layouts, and fast, helpful failures without a hub."""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from model.sources import SourceError, fetch_file, is_hub_id, stream_records
from tests.paths import REPO_ROOT

C4_FILES = "realnewslike/c4-train.*-of-00512.json.gz"


def _wikipedia_rows(n):
    return [
        {
            "id": str(100 + i),
            "url": f"https://simple.wikipedia.org/wiki?curid={100 + i}",
            "title": f"Title {i}",
            "text": f"Article {i} text.\n\nSecond paragraph of article {i}.",
        }
        for i in range(n)
    ]


def _c4_rows(start, n):
    return [
        {
            "text": f"News item {i}.\nIt happened on a Tuesday.",
            "timestamp": f"2019-04-{10 + i % 10:02d}T10:00:00Z",
            "url": f"https://news.example/{i}",
        }
        for i in range(start, start + n)
    ]


def test_stream_records_reads_a_local_wikipedia_parquet_folder(tmp_path, make_wikipedia):
    rows = _wikipedia_rows(5)
    root = make_wikipedia(tmp_path / "wikipedia", rows, data_dir="20231101.xx")
    records, revision = stream_records(str(root), "wikipedia.source", data_dir="20231101.xx")
    assert revision is None
    assert [dict(record) for record in records] == rows


def test_stream_records_reads_only_the_configured_wikipedia_language(tmp_path, make_wikipedia):
    make_wikipedia(tmp_path / "wikipedia", _wikipedia_rows(3), data_dir="20231101.xx")
    other = [dict(row, text="other language") for row in _wikipedia_rows(2)]
    root = make_wikipedia(tmp_path / "wikipedia", other, data_dir="20231101.yy")
    records, _ = stream_records(str(root), "wikipedia.source", data_dir="20231101.yy")
    assert [record["text"] for record in records] == ["other language", "other language"]


def test_stream_records_reads_local_c4_shards_in_file_order(tmp_path, make_c4):
    shards = [_c4_rows(0, 3), _c4_rows(3, 4)]
    root = make_c4(tmp_path / "c4", shards)
    records, revision = stream_records(str(root), "c4.source", data_files=C4_FILES)
    records = list(records)
    assert revision is None
    assert [(record["text"], record["url"]) for record in records] == [
        (row["text"], row["url"]) for row in shards[0] + shards[1]
    ]
    assert all(set(record) == {"text", "timestamp", "url"} for record in records)


def test_stream_records_names_the_param_key_for_a_missing_local_folder(tmp_path):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(SourceError) as info:
        stream_records(str(missing), "wikipedia.source", data_dir="20231101.xx")
    assert "wikipedia.source" in str(info.value)
    assert str(missing) in str(info.value)


def test_stream_records_names_the_param_key_when_no_file_matches(tmp_path, make_c4):
    root = make_c4(tmp_path / "c4", [_c4_rows(0, 2)])
    with pytest.raises(SourceError) as info:
        stream_records(str(root), "c4.source", data_files="en/c4-train.*-of-01024.json.gz")
    assert "c4.source" in str(info.value)
    assert "en/c4-train.*-of-01024.json.gz" in str(info.value)


def test_stream_records_names_the_param_key_for_a_data_dir_without_files(tmp_path):
    (tmp_path / "wikipedia" / "20231101.xx" / "empty-subfolder").mkdir(parents=True)
    with pytest.raises(SourceError) as info:
        stream_records(str(tmp_path / "wikipedia"), "wikipedia.source", data_dir="20231101.xx")
    assert "wikipedia.source" in str(info.value)
    assert "20231101.xx" in str(info.value)


def test_unreachable_hub_fails_fast_and_points_to_a_local_folder(tmp_path):
    # HF_ENDPOINT is read when huggingface_hub is imported, so the check runs in a fresh interpreter.
    script = textwrap.dedent(
        """
        from model.sources import SourceError, stream_records
        try:
            stream_records("wikimedia/wikipedia", "wikipedia.source", data_dir="20231101.simple")
        except SourceError as error:
            print("SOURCE_ERROR:", error)
        """
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(
        HF_ENDPOINT="http://127.0.0.1:9",
        HF_HOME=str(tmp_path / "hf-home"),
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]),
    )
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert "SOURCE_ERROR:" in result.stdout, result.stdout + result.stderr
    message = result.stdout
    assert elapsed < 15, f"an unreachable hub must fail in seconds, took {elapsed:.1f}s"
    assert "'wikimedia/wikipedia'" in message
    assert "wikipedia.source" in message
    assert "local folder" in message


def test_fetch_file_returns_the_path_of_a_file_in_a_local_folder(tmp_path, make_dailydialog):
    root = make_dailydialog(tmp_path / "dd", {"train": ["Hi . __eou__ Hello . __eou__"]})
    path, revision = fetch_file(str(root), "dialog.source", "train.zip")
    assert revision is None
    assert Path(path) == root / "train.zip"


def test_fetch_file_names_the_missing_file(tmp_path, make_dailydialog):
    root = make_dailydialog(
        tmp_path / "dd", {"train": ["Hi . __eou__ Hello . __eou__"], "test": ["Hi . __eou__ Hello . __eou__"]}
    )
    with pytest.raises(SourceError) as info:
        fetch_file(str(root), "dialog.source", "validation.zip")
    assert "validation.zip" in str(info.value)
    assert "dialog.source" in str(info.value)


def test_fetch_file_names_the_param_key_for_a_missing_local_folder(tmp_path):
    with pytest.raises(SourceError, match="dialog.source"):
        fetch_file(str(tmp_path / "absent"), "dialog.source", "train.zip")


def test_is_hub_id_tells_hub_ids_from_local_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner" / "local").mkdir(parents=True)
    assert is_hub_id("wikimedia/wikipedia")
    assert not is_hub_id("owner/local"), "an existing folder wins over the hub"
    assert not is_hub_id("data/sample/wikipedia")
    assert not is_hub_id("./wikimedia/wikipedia")
    assert not is_hub_id(str(tmp_path / "absolute"))
    assert not is_hub_id("folder")
