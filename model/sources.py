"""Where raw data comes from: a Hugging Face hub dataset, or a local folder in the same layout.

The same `datasets.load_dataset` call reads both, so the bundled sample and the tests go through
exactly the code the hub data goes through. Before streaming, a hub id is resolved to a commit
with a short timeout: an unreachable hub or an unknown dataset fails in seconds with a message
that says how to use a local folder instead, and the commit pins what is streamed.
"""

import os
from pathlib import Path

import datasets
import huggingface_hub

HUB_TIMEOUT_SECONDS = 10


class SourceError(RuntimeError):
    """A dataset source that cannot be read."""


def is_hub_id(source):
    """`owner/name` with no local folder of that name is a hub id; anything else is a path."""
    return source.count("/") == 1 and not source.startswith((".", "/")) and not Path(source).exists()


def resolve(source, key):
    """Returns (where to load from, hub commit or None). `key` names the param for error messages."""
    if not is_hub_id(source):
        if not Path(source).is_dir():
            raise SourceError(
                f"{key}: local folder '{source}' does not exist. Point {key} in params.yaml at a folder "
                f"in the hub dataset's layout, or at a hub id such as 'owner/name'."
            )
        return source, None
    try:
        info = huggingface_hub.HfApi().dataset_info(source, timeout=HUB_TIMEOUT_SECONDS)
    except huggingface_hub.errors.RepositoryNotFoundError as error:
        raise SourceError(
            f"{key}: dataset '{source}' was not found on the Hugging Face hub. Check the id, or set {key} "
            f"in params.yaml to a local folder in the hub dataset's layout (e.g. data/sample/...)."
        ) from error
    except Exception as error:
        endpoint = os.environ.get("HF_ENDPOINT", huggingface_hub.constants.ENDPOINT)
        raise SourceError(
            f"{key}: cannot reach the Hugging Face hub at {endpoint} for dataset '{source}' "
            f"({type(error).__name__}). Without network access, download the dataset elsewhere and set "
            f"{key} in params.yaml to a local folder in the hub dataset's layout (e.g. data/sample/...)."
        ) from error
    return source, info.sha


def stream_records(source, key, *, data_dir=None, data_files=None):
    """Opens a parquet / JSON-lines dataset as a stream in file order: (records, hub commit or None)."""
    path, revision = resolve(source, key)
    if revision is None:
        pattern = data_files or f"{data_dir}/**/*"
        if not any(match.is_file() for match in Path(path).glob(pattern)):
            raise SourceError(f"{key}: no data files match '{pattern}' under local folder '{path}'.")
    dataset = datasets.load_dataset(
        path, data_dir=data_dir, data_files=data_files, split="train", streaming=True, revision=revision
    )
    return dataset, revision


def fetch_file(source, key, filename):
    """A file of a dataset repo (hub, cached by huggingface_hub) or of a local folder: its local path."""
    path, revision = resolve(source, key)
    if revision is None:
        local = Path(path) / filename
        if not local.is_file():
            raise SourceError(f"{key}: '{local}' is missing; the folder must hold {filename}.")
        return local, None
    try:
        downloaded = huggingface_hub.hf_hub_download(source, filename, repo_type="dataset", revision=revision)
    except huggingface_hub.errors.EntryNotFoundError as error:
        raise SourceError(f"{key}: dataset '{source}' has no file '{filename}'.") from error
    return Path(downloaded), revision
