"""The DVC pipeline, end to end, in scratch copies of the repository.

The data stages: one copy, a handful of `dvc repro` runs (module-scoped fixtures, each building on the
previous one): from scratch; again (nothing may run); --force (byte-identical outputs); a smaller
vocabulary (only the tokenizer and the encoding rerun); a smaller Wikipedia cap (Wikipedia and everything
downstream of it). These runs target the data stages, since each one would otherwise retrain.

The whole pipeline: the session's `short_pipeline` copy (sample profile, shorter training) ran every stage
through export once; a second `dvc repro` must run nothing. Which stages ran is read from DVC's
"Running stage '...'" lines.
"""

import json
import subprocess

import numpy as np
import pytest
import yaml

from model.corpus import SOURCES
from model.dialog import SPLITS
from model.encoding import pretraining_splits
from model.special_tokens import END_OF_TEXT_ID
from model.tokenizer import Tokenizer
from tests.paths import REPO_ROOT
from tests.pipeline_copy import SHORT_TRAINING, Workspace, clone_workspace, make_workspace, stages_that_ran

pytestmark = pytest.mark.e2e

DATA_STAGES = ("extract_wikipedia", "extract_c4", "extract_dialog", "combine", "build_bpe", "encode")


def _expected_outputs():
    tokens = [f"{split}.npy" for split in pretraining_splits()]
    tokens += [f"dialog_{split}{suffix}.npy" for split in SPLITS for suffix in ("", "_mask", "_offsets")]
    return (
        [f"data/extracted/{source}.jsonl" for source in SOURCES]
        + [f"data/extracted/dialog/{split}.jsonl" for split in SPLITS]
        + [f"data/combined/{split}.jsonl" for split in pretraining_splits()]
        + ["data/tokenizer.model", "data/tokens/meta.json"]
        + [f"data/tokens/{name}" for name in tokens]
        + [f"metrics/{stage}.json" for stage in ("extract_wikipedia", "extract_c4", "extract_dialog", "combine")]
    )


class DataWorkspace(Workspace):
    def repro(self, *flags):
        """Runs `dvc repro` of the data stages; returns (names of the stages that ran, DVC's output)."""
        output = self.dvc("repro", *flags, *DATA_STAGES)
        return stages_that_ran(output), output

    def data_outputs(self):
        """Every output and metric the data stages declare in dvc.yaml (folders included)."""
        return [path for name in DATA_STAGES for path in self.outputs(name)]

    def hashes(self):
        """sha256 of every file of every data output, by path."""
        return self.digests(self.data_outputs())


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The repository's tracked and untracked-not-ignored files in a fresh git repository (tests/pipeline_copy.py)."""
    return make_workspace(tmp_path_factory, workspace_class=DataWorkspace)


@pytest.fixture(scope="module")
def first_run(workspace):
    ran, output = workspace.repro()
    return {"ran": ran, "output": output, "hashes": workspace.hashes()}


@pytest.fixture(scope="module")
def second_run(workspace, first_run):
    ran, output = workspace.repro()
    status = workspace.status(*DATA_STAGES)
    return {"ran": ran, "output": output, "status": status}


@pytest.fixture(scope="module")
def forced_run(workspace, second_run):
    before = workspace.hashes()
    ran, output = workspace.repro("--force")
    return {"ran": ran, "output": output, "before": before, "after": workspace.hashes()}


@pytest.fixture(scope="module")
def vocab_run(workspace, forced_run):
    old = workspace.param("tokenizer", "vocab_size")
    new = old // 2 if old // 2 >= 512 else old * 2
    before = workspace.hashes()
    workspace.set_param("tokenizer", "vocab_size", new)
    ran, output = workspace.repro()
    return {"ran": ran, "output": output, "vocab_size": new, "before": before, "after": workspace.hashes()}


@pytest.fixture(scope="module")
def wikipedia_cap_run(workspace, vocab_run):
    before_stats = workspace.json("metrics/extract_wikipedia.json")
    cap = before_stats["bytes_kept"] // 2
    assert cap < workspace.param("wikipedia", "max_bytes")
    before = workspace.hashes()
    workspace.set_param("wikipedia", "max_bytes", cap)
    ran, output = workspace.repro()
    return {
        "ran": ran,
        "output": output,
        "cap": cap,
        "before_stats": before_stats,
        "stats": workspace.json("metrics/extract_wikipedia.json"),
        "before": before,
        "after": workspace.hashes(),
    }


@pytest.fixture(scope="module")
def failed_run(workspace, wikipedia_cap_run):
    """A stage that fails at run time (a vocabulary the corpus cannot support), then the README's way back:
    `git checkout params.yaml` and `dvc checkout`."""
    workspace.commit("the wikipedia cap run")
    before = workspace.hashes()
    workspace.set_param("tokenizer", "vocab_size", 60000)
    result = subprocess.run(
        workspace.dvc_command("repro", *DATA_STAGES),
        cwd=workspace.root,
        env=workspace.env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    tokenizer_kept = (workspace.root / "data/tokenizer.model").exists()
    subprocess.run(["git", "checkout", "params.yaml"], cwd=workspace.root, check=True)
    workspace.dvc("checkout", *DATA_STAGES)  # the data stages: this copy trained nothing
    return {
        "result": result,
        "tokenizer_kept": tokenizer_kept,
        "before": before,
        "after": workspace.hashes(),
        "status": workspace.status(*DATA_STAGES),
    }


def _changed(run, prefix):
    return {path for path in run["after"] if path.startswith(prefix) and run["after"][path] != run["before"].get(path)}


def test_data_stages_are_declared_in_dvc_yaml(workspace):
    assert set(DATA_STAGES) <= set(workspace.stages())


def test_repro_from_scratch_runs_every_data_stage(first_run):
    assert first_run["ran"] >= set(DATA_STAGES), first_run["output"][-3000:]


def test_repro_writes_every_data_output(workspace, first_run):
    for relative in _expected_outputs():
        path = workspace.root / relative
        assert path.is_file(), relative
        assert path.stat().st_size > 0, relative
    for out in workspace.data_outputs():
        assert (workspace.root / out).exists(), out


def test_token_arrays_are_uint16_memory_maps_within_the_vocab(workspace, first_run):
    vocab_size = Tokenizer(workspace.root / "data/tokenizer.model").vocab_size
    token_files = [f"{split}.npy" for split in pretraining_splits()] + [f"dialog_{split}.npy" for split in SPLITS]
    for name in token_files:
        tokens = np.load(workspace.root / "data/tokens" / name, mmap_mode="r")
        assert isinstance(tokens, np.memmap), name
        assert tokens.dtype == np.uint16, name
        assert tokens.size > 0 and int(tokens.max()) < vocab_size, name


def test_dialog_masks_and_offsets_line_up_with_their_tokens(workspace, first_run):
    for split in SPLITS:
        folder = workspace.root / "data/tokens"
        tokens = np.load(folder / f"dialog_{split}.npy", mmap_mode="r")
        mask = np.load(folder / f"dialog_{split}_mask.npy", mmap_mode="r")
        offsets = np.load(folder / f"dialog_{split}_offsets.npy")
        dialogues = (workspace.root / f"data/extracted/dialog/{split}.jsonl").read_text(encoding="utf-8").splitlines()
        assert mask.shape == tokens.shape and set(np.unique(mask)) <= {0, 1}
        assert len(offsets) == len(dialogues) + 1
        assert offsets[0] == 0 and offsets[-1] == len(tokens) and np.all(np.diff(offsets) > 0)
        assert np.all(tokens[offsets[1:] - 1] == END_OF_TEXT_ID), "every dialogue ends with <|endoftext|>"


def test_token_meta_matches_the_arrays_and_documents(workspace, first_run):
    meta = workspace.json("data/tokens/meta.json")
    assert meta["vocab_size"] == workspace.param("tokenizer", "vocab_size")
    for split in pretraining_splits():
        tokens = np.load(workspace.root / "data/tokens" / f"{split}.npy", mmap_mode="r")
        documents = (workspace.root / f"data/combined/{split}.jsonl").read_text(encoding="utf-8").splitlines()
        assert meta["splits"][split]["tokens"] == tokens.size
        assert meta["splits"][split]["documents"] == len(documents)
        assert int(np.count_nonzero(tokens == END_OF_TEXT_ID)) == len(documents), "one <|endoftext|> per document"


def test_second_repro_runs_no_stage(second_run):
    assert second_run["ran"] == set(), second_run["output"]
    assert "didn't change" in second_run["output"]
    assert second_run["status"] == {}


def test_forced_rerun_reproduces_data_outputs_byte_for_byte(forced_run):
    assert forced_run["ran"] >= set(DATA_STAGES), forced_run["output"][-3000:]
    assert any(path.startswith("data/tokens/") for path in forced_run["after"])
    assert forced_run["after"] == forced_run["before"]


def test_vocab_size_change_reruns_tokenizer_and_encode_only(workspace, vocab_run):
    assert vocab_run["ran"] & set(DATA_STAGES) == {"build_bpe", "encode"}, vocab_run["output"][-3000:]
    assert workspace.json("data/tokens/meta.json")["vocab_size"] == vocab_run["vocab_size"]
    assert Tokenizer(workspace.root / "data/tokenizer.model").vocab_size == vocab_run["vocab_size"]
    assert _changed(vocab_run, "data/extracted/") == set()
    assert _changed(vocab_run, "data/combined/") == set()


def test_smaller_wikipedia_cap_reruns_wikipedia_and_downstream_only(workspace, wikipedia_cap_run):
    run = wikipedia_cap_run
    assert run["ran"] & set(DATA_STAGES) == {"extract_wikipedia", "combine", "build_bpe", "encode"}, run["output"][
        -3000:
    ]
    assert run["stats"]["stopped_at_cap"] == 1
    assert run["cap"] <= run["stats"]["bytes_kept"] < run["before_stats"]["bytes_kept"]
    assert run["stats"]["documents_kept"] < run["before_stats"]["documents_kept"]
    assert "data/extracted/wikipedia.jsonl" in _changed(run, "data/extracted/")
    assert _changed(run, "data/extracted/c4.jsonl") == set()
    assert _changed(run, "data/extracted/dialog/") == set()


def test_whole_pipeline_trains_evaluates_and_exports_both_models(short_pipeline):
    workspace, _ = short_pipeline
    root = workspace.root
    for stage in ("pretrain", "finetune"):
        assert (root / "models" / stage / "model.safetensors").is_file()
        assert json.loads((root / "metrics" / stage / "metrics.json").read_text())["step"] > 0
    metrics = json.loads((root / "metrics/evaluate.json").read_text())
    assert set(metrics) == {"base", "chat"}
    assert all(np.isfinite(value) for model in metrics.values() for value in model.values())
    # Finetuning on dialogues must make the model better at dialogues than the base model.
    assert metrics["chat"]["val/dialog/loss"] < metrics["base"]["val/dialog/loss"]
    for prompt in ("The capital of France is", "What is your name?"):
        assert prompt in (root / "metrics/completions.md").read_text()
    for name in ("base", "chat"):
        files = {path.name for path in (root / "serve/models" / name).iterdir()}
        assert {
            "model.safetensors",
            "config.json",
            "generation_config.json",
            "tokenizer.model",
            "tokenizer_config.json",
            "README.md",
        } <= files


def test_no_tracked_output_holds_a_wall_clock_figure(short_pipeline):
    """Throughput differs with the machine and the run: in a tracked output, it would leave a fresh clone's tree
    modified after `make repro` (the run is otherwise the same bytes on the same machine)."""
    workspace, _ = short_pipeline
    for stage in workspace.stages():
        for path in workspace.digests(workspace.outputs(stage)):
            if path.endswith((".json", ".tsv")):
                text = (workspace.root / path).read_text(encoding="utf-8")
                assert "tokens_per_second" not in text and "mfu" not in text, path


def test_second_repro_of_the_whole_pipeline_runs_nothing(short_pipeline):
    workspace, lock = short_pipeline
    assert stages_that_ran(workspace.dvc("repro")) == set()
    assert workspace.lock() == lock


def test_plots_page_draws_every_declared_chart_with_the_network_off(short_pipeline, tmp_path):
    """`dvc plots show` as a user runs it after `make repro`, then the page in a browser that has no network."""
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.browser import headless_chromium

    workspace, _ = short_pipeline
    node_modules = REPO_ROOT / "node_modules"
    if not (node_modules / "vega-embed").is_dir():
        pytest.skip("the plots page's JavaScript is not installed (make setup runs npm ci)")
    link = workspace.root / "node_modules"
    if not link.exists():
        link.symlink_to(node_modules)  # what `make setup` installs there; git-ignored, so not in the copy
    workspace.dvc("plots", "show")
    page = workspace.root / "dvc_plots" / "index.html"
    html = page.read_text(encoding="utf-8")
    assert "http://" not in html.split("<body>")[0] and "https://" not in html.split("<body>")[0]
    declared = len(yaml.safe_load((workspace.root / "dvc.yaml").read_text(encoding="utf-8"))["plots"])
    browser = headless_chromium(tmp_path / "profile")
    try:
        browser.set_network_conditions(offline=True, latency=0, download_throughput=0, upload_throughput=0)
        browser.get(page.as_uri())
        WebDriverWait(browser, 30).until(
            lambda b: b.execute_script("return document.querySelectorAll('.vega-embed canvas').length") == declared
        )
        titles = browser.execute_script(
            "return Array.from(document.querySelectorAll('.vega-embed')).map(e => e.getAttribute('aria-label') || '')"
        )
        sizes = browser.execute_script(
            "return Array.from(document.querySelectorAll('.vega-embed canvas')).map(c => [c.width, c.height])"
        )
        first_chart = browser.execute_script("return document.querySelector('.vega-embed canvas').toDataURL()")
    finally:
        browser.quit()
    assert len(titles) == declared
    assert all(width > 100 and height > 100 for width, height in sizes)
    # A colour per series: the pretraining losses (training, held-out Wikipedia, held-out C4) in three hues.
    assert len(series_hues(first_chart)) >= 3


def series_hues(data_url):
    """The hues (in 24 buckets of 15 degrees) that at least 40 strongly coloured pixels of a chart have."""
    import base64
    import colorsys
    import io
    from collections import Counter

    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB")
    hues = Counter()
    for red, green, blue in image.getdata():
        hue, saturation, value = colorsys.rgb_to_hsv(red / 255, green / 255, blue / 255)
        if saturation > 0.4 and value > 0.3:
            hues[int(hue * 24) % 24] += 1
    return {hue for hue, count in hues.items() if count >= 40}


def test_a_failed_stage_says_why_in_one_line_and_dvc_checkout_brings_its_outputs_back(failed_run):
    result = failed_run["result"]
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "tokenizer.vocab_size" in errors[0], output[-3000:]
    assert not failed_run["tokenizer_kept"]  # DVC removed the stage's outputs before running it
    assert failed_run["after"] == failed_run["before"]
    assert failed_run["status"] == {}


def test_exp_show_as_the_readme_runs_it_shows_each_sources_bits_per_byte_and_the_changed_param_in_120_columns(
    short_pipeline, tmp_path_factory
):
    """Two experiments in a clone (the shared workspace stays as it is), then the README's `dvc exp show`: the
    first 120 columns hold the experiments, the bits per byte of each held-out source and the one param that
    differs, with no loss, hash or manifest column anywhere, and no param that is the same in both."""
    workspace, _ = short_pipeline
    clone = clone_workspace(workspace, tmp_path_factory, "experiments")
    clone.set_params(SHORT_TRAINING)  # the clone has the params of the repository's commit
    clone.dvc("repro", timeout=900)
    clone.commit("the baseline, as after `make repro` and a commit")
    clone.dvc("exp", "run", "--name", "four-batches", timeout=900)
    clone.dvc("exp", "run", "--name", "two-batches", "-S", "evaluate.eval_batches=2", timeout=900)
    clone.env["COLUMNS"] = "120"  # rich lays the table out for a terminal this wide
    command = (
        "exp",
        "show",
        "--no-pager",
        "--only-changed",
        "--drop",
        EXP_SHOW_DROP,
        "--sort-by",
        "metrics/evaluate.json:base.val/wikipedia/bpb",
    )
    screen = "\n".join(line[:120] for line in clone.dvc(*command).splitlines())
    header = next(line for line in screen.splitlines() if "Experiment" in line).split()
    assert header == [
        "Experiment",
        "base.val/c4/bpb",
        "base.val/wikipedia/bpb",
        "chat.val/dialog/bpb",
        "evaluate.eval_batches",
    ], header
    assert "four-batches" in screen and "two-batches" in screen
    table = clone.dvc(*command, "--md")
    assert "evaluate.eval_batches" in table and "pretrain.lr" not in table
    for hidden in ("loss", "md5", ".dir", "documents", "Created"):
        assert hidden not in table
    # The README's metrics command fits the same terminal; `dvc metrics show` puts every metric in one row.
    assert max(map(len, clone.dvc("metrics", "diff", "--all").splitlines())) <= 120
    # The README's way back to the baseline: the workspace holds the last experiment until then.
    assert clone.run("git", "status", "--porcelain")
    clone.run("git", "checkout", "--", ".")
    clone.dvc("checkout")
    assert clone.run("git", "status", "--porcelain") == "" and clone.status() == {}


EXP_SHOW_DROP = (
    "Created|.*loss|base.val/dialog|chat.val/(c4|wiki)|data/|stages/|models?/|metrics/|serve/"
    r"|(base|chat)\.(arc|blimp|hella|lambada|piqa)"
)  # as README.md writes it
