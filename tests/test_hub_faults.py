"""The extraction stages against a stand-in Hugging Face hub on 127.0.0.1 (tests/hub_standin.py), with faults.

The stand-in serves the bundled sample as `wikimedia/wikipedia`, `allenai/c4` and `roskoN/dailydialog`, so
the stages run the RyanGPT profile's hub code path (dataset_info, datasets streaming, hf_hub_download) end to
end, in a fresh interpreter with HF_ENDPOINT pointing at the stand-in and every cache in tmp_path.

- Transient faults (dropped connections, 5xx answers, a stall) are retried and the outputs are byte-identical
  to the local-folder run, which is itself identical to a fault-free hub run.
- Persistent faults fail the stage after a bounded number of requests, in seconds (the test scales the
  clients' waits and timeouts down, see `scale_down_retries`), with a message that names the dataset and what
  failed; no output appears, and an earlier output at the same path is left as it was.
- A damaged file served by the hub is an error naming the file (its hf:// URL, which holds the commit).
"""

import contextlib
import json
import shutil
import time
from pathlib import Path

import pytest
import yaml

from model.sources import HUB_ATTEMPTS as SOURCE_TRIES  # model/sources.py's tries of a hub call
from tests.hub_standin import DATASETS_RETRIES, HubStandin, run_stages
from tests.paths import REPO_ROOT

SAMPLE = REPO_ROOT / "data" / "sample"
HUB = {"wikipedia": "wikimedia/wikipedia", "c4": "allenai/c4", "dialog": "roskoN/dailydialog"}
FOLDERS = {"wikipedia": SAMPLE / "wikipedia", "c4": SAMPLE / "c4", "dialog": SAMPLE / "dailydialog"}
OUTPUTS = {"wikipedia": "wikipedia.jsonl", "c4": "c4.jsonl", "dialog": "dialog"}
HUB_TRIES = 6  # huggingface_hub: a request and 5 retries
TIME_LIMIT = 60  # seconds, for a stage that meets a persistent fault (it takes a few)


def _write_params(folder, sources):
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))
    for name, source in sources.items():
        params[name]["source"] = str(source)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    return folder


def _command(name, folder):
    return (f"stages.extract_{name}", folder / OUTPUTS[name], folder / f"{name}.manifest.json")


def _contents(path):
    """A file's bytes, or a folder's {name: bytes}; None if absent."""
    path = Path(path)
    if path.is_dir():
        return {child.name: child.read_bytes() for child in sorted(path.iterdir())}
    return path.read_bytes() if path.exists() else None


def _manifest(folder, name):
    return json.loads((folder / f"{name}.manifest.json").read_text(encoding="utf-8"))


def _leftovers(folder):
    return sorted(path.name for path in folder.iterdir() if ".tmp-" in path.name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The three stages on the local sample folders, in this process: {name: (output, manifest)}."""
    folder = _write_params(tmp_path_factory.mktemp("local"), FOLDERS)
    with contextlib.chdir(folder):
        for name in HUB:
            module, *args = _command(name, folder)
            __import__(module, fromlist=["main"]).main(*map(str, args))
    return {name: (_contents(folder / OUTPUTS[name]), _manifest(folder, name)) for name in HUB}


@pytest.fixture
def hub():
    with HubStandin({HUB[name]: FOLDERS[name] for name in HUB}) as standin:
        yield standin


def _run(hub, tmp_path, *names):
    folder = _write_params(tmp_path / "work", HUB)
    started = time.monotonic()
    result = run_stages(hub.environ(tmp_path), folder, *(_command(name, folder) for name in names))
    return folder, result, time.monotonic() - started


def _assert_same_as_reference(folder, name, reference, hub):
    output, manifest = reference[name]
    assert _contents(folder / OUTPUTS[name]) == output, f"{name}: the output differs from the local-folder run"
    assert _manifest(folder, name) == dict(manifest, source=HUB[name], revision=hub.sha(HUB[name]))


def test_stages_stream_the_ryangpt_sources_from_the_hub(hub, tmp_path, reference):
    folder, result, _ = _run(hub, tmp_path, "wikipedia", "c4", "dialog")
    assert result.returncode == 0, result.stderr[-3000:]
    for name in HUB:
        _assert_same_as_reference(folder, name, reference, hub)
    assert hub.unrouted == [], "the clients called hub endpoints the stand-in does not implement"
    assert not list((tmp_path / "work").glob("**/.*.tmp-*"))


def test_the_ryangpt_profiles_hub_pins_stream_the_same_as_the_hub_ids(hub, tmp_path, reference):
    """The profile names the hub datasets by the pin folders in data/hub/ (paths DVC can track as deps)."""
    pins = {name: REPO_ROOT / "data" / "hub" / ("dailydialog" if name == "dialog" else name) for name in HUB}
    folder = _write_params(tmp_path / "work", pins)
    result = run_stages(hub.environ(tmp_path), folder, *(_command(name, folder) for name in HUB))
    assert result.returncode == 0, result.stderr[-3000:]
    for name in HUB:
        assert _contents(folder / OUTPUTS[name]) == reference[name][0]
        assert _manifest(folder, name)["revision"] == hub.sha(HUB[name])


@pytest.mark.parametrize(
    "pin, message",
    [
        ({"dataset": "allenai/c4", "revision": "0" * 40}, "has no revision '0000000000000000000000000000000000000000'"),
        ({"dataset": "allenai/c4"}, "must hold exactly"),
        ({"dataset": "c4", "revision": None}, "must hold exactly"),
    ],
)
def test_a_pin_with_a_revision_the_hub_lacks_or_a_malformed_pin_is_one_clear_error(hub, tmp_path, pin, message):
    (tmp_path / "pin").mkdir()
    (tmp_path / "pin" / "hub.json").write_text(json.dumps(pin))
    folder = _write_params(tmp_path / "work", {"c4": tmp_path / "pin"})
    result = run_stages(hub.environ(tmp_path), folder, _command("c4", folder))
    assert result.returncode != 0 and message in result.stderr and "c4.source" in result.stderr, result.stderr
    assert not (folder / OUTPUTS["c4"]).exists()


def test_a_pinned_revision_is_the_one_streamed(hub, tmp_path, reference):
    (tmp_path / "pin").mkdir()
    (tmp_path / "pin" / "hub.json").write_text(json.dumps({"dataset": HUB["c4"], "revision": hub.sha(HUB["c4"])}))
    folder = _write_params(tmp_path / "work", {"c4": tmp_path / "pin"})
    result = run_stages(hub.environ(tmp_path), folder, _command("c4", folder))
    assert result.returncode == 0, result.stderr[-3000:]
    assert _contents(folder / OUTPUTS["c4"]) == reference["c4"][0]


def test_transient_faults_are_retried_and_the_outputs_are_unchanged(hub, tmp_path, reference):
    faults = [
        # metadata calls: not retried by the libraries, retried by model/sources.py
        hub.fail("drop", r"^/api/datasets/wikimedia/wikipedia$", times=1),  # the commit lookup
        hub.fail("status", r"^/api/datasets/wikimedia/wikipedia/tree/", times=1, status=503),  # listing files
        hub.fail("drop", r"^/datasets/allenai/c4/resolve/.*/README\.md$", times=1, methods=("HEAD",)),
        hub.fail("stall", r"^/api/datasets/allenai/c4$", times=1),
        hub.fail("drop", r"/dailydialog/resolve/.*/train\.zip$", times=1, methods=("HEAD",)),
        # data reads: retried by huggingface_hub (and by datasets around it)
        hub.fail("status", r"\.parquet$", times=2, methods=("GET",), status=500),
        hub.fail("drop", r"\.parquet$", times=1, methods=("GET",)),  # after the two 500s: half the bytes
        hub.fail("stall", r"c4-train\.00000-of-00512\.json\.gz$", times=1, methods=("GET",)),
        hub.fail("drop", r"c4-train\.00001-of-00512\.json\.gz$", times=2, methods=("GET",)),  # mid-stream
        hub.fail("status", r"/dailydialog/resolve/.*/validation\.zip$", times=1, methods=("GET",), status=502),
        hub.fail("drop", r"/dailydialog/resolve/.*/test\.zip$", times=2, methods=("GET",)),
    ]
    folder, result, elapsed = _run(hub, tmp_path, "wikipedia", "c4", "dialog")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [fault.hits for fault in faults] == [fault.times for fault in faults], "every fault was met"
    for name in HUB:
        _assert_same_as_reference(folder, name, reference, hub)
    assert elapsed < TIME_LIMIT


def _assert_failed_cleanly(result, elapsed, *names_in_message):
    assert result.returncode != 0, "the stage must fail"
    assert elapsed < TIME_LIMIT, f"a persistent fault must fail the stage in bounded time, took {elapsed:.0f}s"
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: "), result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]  # an expected failure: one sentence
    for name in names_in_message:
        assert name in last_line, f"{name!r} missing from: {last_line}"
    return last_line


def test_a_persistent_drop_while_streaming_fails_after_bounded_retries_and_keeps_the_old_output(hub, tmp_path):
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "c4.jsonl").write_text('{"text": "the previous, good output"}\n', encoding="utf-8")
    (folder / "c4.manifest.json").write_text('{"previous": true}\n', encoding="utf-8")
    fault = hub.fail("drop", r"c4-train\.00001-of-00512\.json\.gz$", methods=("GET",))  # the second shard
    folder, result, elapsed = _run(hub, tmp_path, "c4")
    message = _assert_failed_cleanly(
        result, elapsed, "c4.source", "'allenai/c4'", "c4-train.00001-of-00512.json.gz", "RemoteProtocolError"
    )
    assert "Nothing was written" in message
    # datasets retried the read DATASETS_RETRIES times, each one a request with 5 retries by huggingface_hub
    assert fault.hits == DATASETS_RETRIES * HUB_TRIES
    assert (folder / "c4.jsonl").read_text(encoding="utf-8") == '{"text": "the previous, good output"}\n'
    assert (folder / "c4.manifest.json").read_text(encoding="utf-8") == '{"previous": true}\n'
    assert _leftovers(folder) == []


def test_persistent_server_errors_fail_after_bounded_retries_and_write_nothing(hub, tmp_path):
    fault = hub.fail("status", r"\.parquet$", methods=("GET",), status=500)
    folder, result, elapsed = _run(hub, tmp_path, "wikipedia")
    _assert_failed_cleanly(
        result,
        elapsed,
        "wikipedia.source",
        "'wikimedia/wikipedia'",
        "20231101.sample/train-00000-of-00001.parquet",
        "500",
    )
    assert fault.hits == SOURCE_TRIES * HUB_TRIES  # each of model/sources.py's tries: 6 by huggingface_hub
    assert not (folder / "wikipedia.jsonl").exists()
    assert not (folder / "wikipedia.manifest.json").exists()
    assert _leftovers(folder) == []


def test_a_persistently_stalled_download_times_out_after_bounded_retries(hub, tmp_path):
    fault = hub.fail("stall", r"/dailydialog/resolve/.*/validation\.zip$", methods=("GET",), seconds=30)
    folder, result, elapsed = _run(hub, tmp_path, "dialog")
    _assert_failed_cleanly(result, elapsed, "dialog.source", "'roskoN/dailydialog'", "'validation.zip'", "ReadTimeout")
    assert fault.hits == SOURCE_TRIES * HUB_TRIES
    assert not (folder / "dialog").exists()
    assert _leftovers(folder) == []


def test_a_hub_that_keeps_failing_the_commit_lookup_is_reported_after_bounded_retries(hub, tmp_path):
    fault = hub.fail("status", r"^/api/datasets/allenai/c4$", status=503)
    folder, result, elapsed = _run(hub, tmp_path, "c4")
    _assert_failed_cleanly(
        result, elapsed, "c4.source", "'allenai/c4'", "cannot reach the Hugging Face hub", "503", "local folder"
    )
    assert fault.hits == SOURCE_TRIES
    assert [r for r in hub.requests if "/resolve/" in r.path] == [], "nothing may be streamed without a commit"
    assert not (folder / "c4.jsonl").exists()


def test_a_damaged_file_on_the_hub_is_an_error_naming_it(tmp_path):
    folder = tmp_path / "c4"
    shutil.copytree(FOLDERS["c4"], folder)
    shard = folder / "realnewslike" / "c4-train.00001-of-00512.json.gz"
    shard.write_bytes(shard.read_bytes()[:20_000])  # truncated: the first shard streams, the second breaks
    with HubStandin({HUB["c4"]: folder}) as hub:
        work, result, elapsed = _run(hub, tmp_path, "c4")
    url = f"hf://datasets/allenai/c4@{hub.sha(HUB['c4'])}/realnewslike/c4-train.00001-of-00512.json.gz"
    _assert_failed_cleanly(result, elapsed, "c4.source", url, "EOFError", "damaged")
    assert not (work / "c4.jsonl").exists()
    assert _leftovers(work) == []
