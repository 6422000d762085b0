"""Where raw data comes from: a Hugging Face hub dataset, or a local folder in the same layout.

A hub dataset is named by a pin folder (`data/hub/*/hub.json`: its id, and a commit or null for the
newest), which DVC can track as the extract stage's dep as it tracks a local folder (a hub id is not a
path); a stage run by hand also takes a bare hub id.

The same `datasets` calls read both, so the bundled sample and the tests go through exactly the
code the hub data goes through. Before streaming, a hub id is resolved to a commit with a short
timeout: an unreachable hub or an unknown dataset fails in seconds with a message that says how to
use a local folder instead, and the commit pins what is streamed.

Faults: huggingface_hub retries every data read (6 tries, 1 to 8 s apart) and datasets retries a
read that lost its connection again (20 times, 5 s apart). Neither retries the metadata calls
(dataset_info, listing the files, the HEAD before a download), so those are retried here, a few
times: `_with_retries`. Files are streamed one at a time, so that an error can name the file.
"""

import json
import os
import time
from pathlib import Path

import datasets
import huggingface_hub
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RemoteEntryNotFoundError
from huggingface_hub.utils import httpx

from model.errors import PipelineError

HUB_TIMEOUT_SECONDS = 10
HUB_ATTEMPTS = 3  # of each metadata call and download; waits of 2 s, then 4 s, in between
HUB_RETRY_WAIT_SECONDS = 2
HUB_PIN = "hub.json"


class SourceError(PipelineError, RuntimeError):
    """A dataset source that cannot be read."""


def is_hub_id(source):
    """`owner/name` with no local folder of that name is a hub id; anything else is a path."""
    return source.count("/") == 1 and not source.startswith((".", "/")) and not Path(source).exists()


def is_transient(error):
    """A lost connection, a timeout or a server-side answer (5xx, 429) from the hub: worth another try.

    datasets' own `ConnectionError("Server Disconnected")` is not: it comes after its 20 retries.
    """
    if isinstance(error, HfHubHTTPError):
        return error.response is not None and (error.response.status_code >= 500 or error.response.status_code == 429)
    # LocalEntryNotFoundError: hf_hub_download could not reach the hub (and had no cached copy).
    return isinstance(
        error, (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError, LocalEntryNotFoundError)
    )


def _is_network_error(error):
    return is_transient(error) or isinstance(error, (ConnectionError, TimeoutError, httpx.HTTPError))


def _describe(error):
    """The root cause in one line, e.g. `RemoteProtocolError: peer closed connection ...`."""
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no message'}"


def _with_retries(call):
    for attempt in range(1, HUB_ATTEMPTS + 1):
        try:
            return call()
        except Exception as error:
            if attempt == HUB_ATTEMPTS or not is_transient(error):
                raise
            time.sleep(HUB_RETRY_WAIT_SECONDS * attempt)


def read_pin(pin, key):
    """(hub id, commit or None) from a pin file: {"dataset": "owner/name", "revision": "<commit>" or null}."""
    try:
        fields = json.loads(Path(pin).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # ValueError: not UTF-8, not JSON
        raise SourceError(f"{key}: cannot read hub pin '{pin}' ({_describe(error)})") from error
    valid = (
        isinstance(fields, dict)
        and set(fields) == {"dataset", "revision"}
        and isinstance(fields["dataset"], str)
        and fields["dataset"].count("/") == 1
        and (fields["revision"] is None or isinstance(fields["revision"], str))
    )
    if not valid:
        raise SourceError(
            f'{key}: hub pin \'{pin}\' must hold exactly {{"dataset": "owner/name", "revision": a '
            f"commit or null for the newest}}, not {json.dumps(fields)}"
        )
    return fields["dataset"], fields["revision"]


def resolve(source, key):
    """Returns (where to load from, hub commit or None). `key` names the param for error messages."""
    revision = None
    pin = Path(source) / HUB_PIN
    if pin.is_file():
        source, revision = read_pin(pin, key)
    elif not is_hub_id(source):
        if not Path(source).is_dir():
            raise SourceError(
                f"{key}: local folder '{source}' does not exist. Point {key} in params.yaml at a folder "
                f"in the hub dataset's layout, or at a hub pin folder (data/hub/...: a hub.json naming the dataset)."
            )
        return source, None
    try:
        info = _with_retries(
            lambda: huggingface_hub.HfApi().dataset_info(source, revision=revision, timeout=HUB_TIMEOUT_SECONDS)
        )
    except huggingface_hub.errors.RevisionNotFoundError as error:
        raise SourceError(
            f"{key}: dataset '{source}' has no revision '{revision}' on the Hugging Face hub ({pin})."
        ) from error
    except huggingface_hub.errors.RepositoryNotFoundError as error:
        raise SourceError(
            f"{key}: dataset '{source}' was not found on the Hugging Face hub. Check the id, or set {key} "
            f"in params.yaml to a local folder in the hub dataset's layout (e.g. data/sample/...)."
        ) from error
    except Exception as error:
        endpoint = os.environ.get("HF_ENDPOINT", huggingface_hub.constants.ENDPOINT)
        raise SourceError(
            f"{key}: cannot reach the Hugging Face hub at {endpoint} for dataset '{source}' "
            f"({_describe(error)}; {HUB_ATTEMPTS} attempts). Without network access, download the dataset elsewhere "
            f"and set {key} in params.yaml to a local folder in the hub dataset's layout (e.g. data/sample/...)."
        ) from error
    return source, info.sha


def _network_error(key, source, what, error):
    return SourceError(
        f"{key}: {what} of dataset '{source}' failed: the Hugging Face hub did not answer properly and retrying "
        f"did not help ({_describe(error)}). Nothing was written. Rerun the stage when the hub is reachable, or "
        f"set {key} in params.yaml to a local folder in the hub dataset's layout."
    )


def stream_records(source, key, *, data_dir=None, data_files=None):
    """Opens a parquet / JSON-lines dataset as a stream in file order: (records, hub commit or None)."""
    path, revision = resolve(source, key)
    if revision is None:
        pattern = data_files or f"{data_dir}/**/*"
        if not any(match.is_file() for match in Path(path).glob(pattern)):
            raise SourceError(f"{key}: no data files match '{pattern}' under local folder '{path}'.")
    try:
        builder = _with_retries(
            lambda: datasets.load_dataset_builder(path, data_dir=data_dir, data_files=data_files, revision=revision)
        )
    except Exception as error:
        if revision is not None and _is_network_error(error):
            raise _network_error(key, source, "listing the data files", error) from error
        raise
    return _stream_files(builder.name, builder.config.data_files["train"], source, key), revision


def _stream_files(file_format, files, source, key):
    """The records of `files` (parquet or JSON lines) one file after the other."""
    for file in files:
        try:
            records = _with_retries(
                lambda file=file: datasets.load_dataset(file_format, data_files=[file], split="train", streaming=True)
            )
            yield from records
        except Exception as error:
            if _is_network_error(error):
                raise _network_error(key, source, f"reading '{file}'", error) from error
            # A damaged file (truncated, garbage bytes, invalid UTF-8 in a JSON line) stops the stage rather
            # than being skipped: a skipped shard would silently change the corpus. The hub's parquet and
            # JSON files are valid UTF-8, so an undecodable byte means a damaged copy, not text to repair.
            remedy = (
                "Rerun the stage; if it fails again, the file on the hub is damaged"
                if file.startswith("hf://")
                else "Download it again, or remove it from the folder if it does not belong there"
            )
            raise SourceError(
                f"{key}: cannot read '{file}' ({_describe(error)}). The file is damaged (truncated or corrupt) "
                f"or not a valid {file_format} file. {remedy}."
            ) from error


def fetch_file(source, key, filename):
    """A file of a dataset repo (hub, cached by huggingface_hub) or of a local folder: its local path."""
    path, revision = resolve(source, key)
    if revision is None:
        local = Path(path) / filename
        if not local.is_file():
            raise SourceError(f"{key}: '{local}' is missing; the folder must hold {filename}.")
        return local, None
    try:
        downloaded = _with_retries(
            lambda: huggingface_hub.hf_hub_download(path, filename, repo_type="dataset", revision=revision)
        )
    except RemoteEntryNotFoundError as error:
        raise SourceError(f"{key}: dataset '{source}' has no file '{filename}'.") from error
    except Exception as error:
        if _is_network_error(error):
            raise _network_error(key, source, f"downloading '{filename}'", error) from error
        raise
    return Path(downloaded), revision
