"""Shared fixtures: small local datasets in the hub layouts, and a tokenizer trained on the bundled sample."""

import gzip
import json
import sys
import zipfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

# `python -m pytest` from the repo root finds `model` anyway; a bare `pytest` run from elsewhere needs this.
if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.corpus import clean_c4, clean_wikipedia, extract_documents  # noqa: E402 (after the path is set)
from model.dialog import SPLITS, read_split_zip  # noqa: E402
from model.tokenizer import bpe_lines, train_bpe  # noqa: E402
from tests.paths import REPO_ROOT  # noqa: E402

SAMPLE = REPO_ROOT / "data" / "sample"
TEST_VOCAB_SIZE = 1024
TEST_SEED = 1234


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: runs the DVC pipeline end to end in a scratch copy of the repo (slow)")
    config.addinivalue_line("markers", "faults: kills and disk-full failures injected into the pipeline (slow)")
    config.addinivalue_line("markers", "remote: `dvc push`/`dvc pull` through a local S3 server (slow)")


@pytest.fixture
def make_wikipedia():
    """Writes rows (dicts with id/url/title/text) as `<root>/<data_dir>/train-00000-of-00001.parquet`."""

    def make(root, rows, data_dir="20231101.xx"):
        folder = Path(root) / data_dir
        folder.mkdir(parents=True, exist_ok=True)
        columns = {name: [row[name] for row in rows] for name in ("id", "url", "title", "text")}
        table = pa.table({name: pa.array(values, type=pa.string()) for name, values in columns.items()})
        pq.write_table(table, folder / "train-00000-of-00001.parquet")
        return Path(root)

    return make


@pytest.fixture
def make_c4():
    """Writes shards of rows (dicts with text/timestamp/url) as gzip JSON lines in C4's realnewslike layout."""

    def make(root, shards):
        folder = Path(root) / "realnewslike"
        folder.mkdir(parents=True, exist_ok=True)
        for index, rows in enumerate(shards):
            with gzip.open(folder / f"c4-train.{index:05d}-of-00512.json.gz", "wt", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
        return Path(root)

    return make


@pytest.fixture
def make_dailydialog():
    """Writes `<root>/SPLIT.zip` holding `SPLIT/dialogues_SPLIT.txt`; `lines_by_split` maps split -> raw lines."""

    def make(root, lines_by_split):
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        for split, lines in lines_by_split.items():
            with zipfile.ZipFile(root / f"{split}.zip", "w") as archive:
                archive.writestr(f"{split}/dialogues_{split}.txt", "\n".join(lines) + "\n")
        return root

    return make


def _sample_lines():
    """The bundled sample as build_bpe sees it: cleaned documents and dialogue turns, split into lines."""
    table = pq.read_table(SAMPLE / "wikipedia" / "20231101.sample" / "train-00000-of-00001.parquet")
    texts = [doc["text"] for doc in extract_documents(table.to_pylist(), clean_wikipedia, 10**9, 200, Counter())]
    for shard in sorted((SAMPLE / "c4" / "realnewslike").glob("*.json.gz")):
        with gzip.open(shard, "rt", encoding="utf-8") as f:
            records = [json.loads(line) for line in f]
        texts += [doc["text"] for doc in extract_documents(records, clean_c4, 10**9, 200, Counter())]
    for split in SPLITS:
        texts += [turn for turns in read_split_zip(SAMPLE / "dailydialog" / f"{split}.zip", split) for turn in turns]
    return bpe_lines(texts)


@pytest.fixture(scope="session")
def sample_lines():
    lines = _sample_lines()
    assert len(lines) > 500, "the bundled sample should give the tokenizer a few hundred lines at least"
    return lines


@pytest.fixture(scope="session")
def bpe_settings():
    """(vocab_size, seed) of the session's test tokenizer."""
    return TEST_VOCAB_SIZE, TEST_SEED


@pytest.fixture(scope="session")
def tokenizer_model_bytes(sample_lines, bpe_settings):
    return train_bpe(sample_lines, *bpe_settings)


@pytest.fixture(scope="session")
def tokenizer_model_file(tokenizer_model_bytes, tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
    path.write_bytes(tokenizer_model_bytes)
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_model_file):
    from model.tokenizer import Tokenizer

    return Tokenizer(tokenizer_model_file)


@pytest.fixture(scope="session")
def tiny_exports(tmp_path_factory, tokenizer_model_file, tokenizer):
    """tiny_exports(context_length=128): a models folder holding the tiny `base` and `chat` exports
    (tests/tiny.py's make_exports), written once per session and context length. Shared: copy it to change it."""
    from tests.tiny import make_exports

    made = {}

    def exports(context_length=128):
        if context_length not in made:
            folder = tmp_path_factory.mktemp(f"models-{context_length}") / "models"
            make_exports(folder, tokenizer_model_file, tokenizer.vocab_size, context_length)
            made[context_length] = folder
        return made[context_length]

    return exports


@pytest.fixture(scope="session")
def short_pipeline(tmp_path_factory):
    """A scratch copy of the repository with short training (tests/pipeline_copy.py), after one uninterrupted
    `dvc repro`: the reference of the kill test and the repository of the remote test.

    Returns (workspace, dvc.lock as it was right after that run).
    """
    from tests.pipeline_copy import SHORT_TRAINING, make_workspace

    workspace = make_workspace(tmp_path_factory, "short-pipeline", params=SHORT_TRAINING)
    workspace.dvc("repro")
    return workspace, workspace.lock()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
