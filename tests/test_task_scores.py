"""The task_scores stage: real lm-eval on tiny exported models and the bundled sample task sets; clear errors
for sources that lack what a stock task reads, with no metrics file written."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lm_eval
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from model.params import TaskSourcesParams
from model.special_tokens import END_OF_TEXT_ID
from model.task_scores import (
    SUITE,
    TaskScoresError,
    check_export,
    choose_items,
    fits_context,
    load_scorer,
    load_suite,
    load_task,
    score_model,
    scoring_tokenizer,
    stock_tasks,
)
from stages.task_scores import main
from tests.paths import REPO_ROOT
from tests.server import RunningServer

SAMPLE_SOURCES = {
    "blimp": "blimp",
    "lambada_openai": "lambada_openai",
    "piqa": "piqa",
    "arc_easy": "ai2_arc",
    "hellaswag": "hellaswag",
}
# What the bundled sets hold: items per task, and BLiMP's paradigms per linguistic field.
SAMPLE_ITEMS = {"blimp": 12, "lambada_openai": 6, "piqa": 6, "arc_easy": 6, "hellaswag": 6}
SAMPLE_FIELDS = {"morphology": 2, "semantics": 1}


def sample_source(task):
    return str(REPO_ROOT / "data" / "sample" / SAMPLE_SOURCES[task])


@pytest.fixture(scope="module")
def models(tiny_exports):
    return tiny_exports()


def write_params(folder, **sources):
    """The repo's params.yaml in `folder`, with absolute task sources: the bundled sample's, unless given."""
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))
    raw["task_scores"]["tasks"] = {task: sources.get(task, sample_source(task)) for task in SUITE}
    (Path(folder) / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")


def run_in(folder, models, monkeypatch):
    """Runs the stage in `folder` (where its params.yaml is); returns (metrics path, plots folder)."""
    monkeypatch.chdir(folder)
    main(str(models), "metrics/task_scores.json", "metrics/task_scores")
    return Path(folder) / "metrics" / "task_scores.json", Path(folder) / "metrics" / "task_scores"


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, models):
    folder = tmp_path_factory.mktemp("stage")
    write_params(folder)
    with pytest.MonkeyPatch.context() as monkeypatch:
        metrics, plots = run_in(folder, models, monkeypatch)
    return metrics, plots


def test_the_stage_scores_every_task_of_both_exports(first_run):
    metrics, plots = first_run
    scores = json.loads(metrics.read_text(encoding="utf-8"))
    assert sorted(scores) == ["base", "chat"]
    for model, tasks in scores.items():
        assert sorted(tasks) == sorted(SUITE)
        for task, figures in tasks.items():
            assert figures["items"] == SAMPLE_ITEMS[task] and figures["too_long"] == 0, (model, task)
            accuracies = [value for key, value in figures.items() if key in ("acc", "acc_norm")]
            assert accuracies and all(0 <= value <= 1 for value in accuracies), (model, task)
            assert all(figures[f"{key}_stderr"] >= 0 for key in ("acc", "acc_norm") if key in figures)
        assert "acc_norm" in tasks["piqa"] and "acc_norm" not in tasks["blimp"]
        assert tasks["lambada_openai"]["perplexity"] > 1
        blimp = tasks["blimp"]
        assert blimp["paradigms"] == 3
        assert {field: values["paradigms"] for field, values in blimp["fields"].items()} == SAMPLE_FIELDS
        # The mean over paradigms is the mean of the fields' means weighted by their paradigms.
        weighted = sum(values["acc"] * values["paradigms"] for values in blimp["fields"].values()) / 3
        assert blimp["acc"] == pytest.approx(weighted)
        rows = json.loads((plots / f"{model}.json").read_text(encoding="utf-8"))
        assert rows == [{"task": task, "acc": tasks[task]["acc"]} for task in SUITE]


def test_a_rerun_writes_byte_identical_files(first_run, models, tmp_path, monkeypatch):
    metrics, plots = first_run
    write_params(tmp_path)
    again, again_plots = run_in(tmp_path, models, monkeypatch)
    assert again.read_bytes() == metrics.read_bytes()
    for name in ("base.json", "chat.json"):
        assert (again_plots / name).read_bytes() == (plots / name).read_bytes()


def test_every_scored_text_starts_with_end_of_text(models):
    tokenizer = scoring_tokenizer(models / "base")
    assert tokenizer.encode("Question: why?")[0] == END_OF_TEXT_ID
    scorer = load_scorer(models / "base", 4, "cpu")
    assert scorer.prefix_token_id == END_OF_TEXT_ID  # the context of BLiMP's sentences, which have no prompt
    assert scorer.tok_encode("Question: why?")[0] == END_OF_TEXT_ID


def test_an_item_fits_when_its_text_fills_the_context_at_most():
    def encode(text):
        return text.split()

    assert fits_context("a b", " c", encode, 3)
    assert not fits_context("a b", " c d", encode, 3)


def test_the_items_scored_are_those_that_fit_or_a_seeded_sample_of_them():
    items = [[("x " * n, " y")] for n in (1, 9, 2, 3, 9, 4, 5, 6)]  # two items of 10 words do not fit in 8

    def encode(text):
        return text.split()

    assert choose_items(items, encode, 8, 0, 1, "task") == ([0, 2, 3, 5, 6, 7], 2)
    sample, too_long = choose_items(items, encode, 8, 3, 1, "task")
    assert too_long == 2 and len(sample) == 3 and sample == sorted(sample) and set(sample) <= {0, 2, 3, 5, 6, 7}
    assert choose_items(items, encode, 8, 3, 1, "task") == (sample, too_long)
    others = {tuple(choose_items(items, encode, 8, 3, seed, "task")[0]) for seed in range(10)}
    assert len(others) > 1  # the seed draws the sample


def _sources(**overrides):
    return TaskSourcesParams(**{task: overrides.get(task, sample_source(task)) for task in SUITE})


def test_a_task_with_no_item_that_fits_the_context_is_an_error(tiny_exports):
    scorer = load_scorer(tiny_exports(16) / "base", 4, "cpu")
    with pytest.raises(
        TaskScoresError,
        match="task_scores.tasks.lambada_openai: '.*' has no item of lm-eval's "
        "lambada_openai that fits the model's context of 16 tokens",
    ):
        score_model(scorer, load_suite(_sources()), 0, 1)


def _copy(task, folder):
    return Path(shutil.copytree(sample_source(task), Path(folder) / SAMPLE_SOURCES[task]))


def test_a_source_without_the_config_the_task_reads_is_named(tmp_path):
    folder = _copy("arc_easy", tmp_path)
    (folder / "ARC-Easy").rename(folder / "ARC-Challenge")
    readme = folder / "README.md"
    readme.write_text(readme.read_text().replace("ARC-Easy", "ARC-Challenge"))
    with pytest.raises(TaskScoresError) as error:
        load_suite(_sources(arc_easy=str(folder)))
    assert str(error.value) == (
        f"task_scores.tasks.arc_easy: '{folder}' has no config 'ARC-Easy' (lm-eval's arc_easy "
        f"reads it); its configs: ARC-Challenge"
    )


def test_a_source_without_the_split_the_task_scores_is_named(tmp_path):
    folder = _copy("lambada_openai", tmp_path)
    readme = folder / "README.md"
    readme.write_text(readme.read_text().replace("split: test", "split: validation"))
    with pytest.raises(TaskScoresError) as error:
        load_suite(_sources(lambada_openai=str(folder)))
    assert str(error.value) == (
        f"task_scores.tasks.lambada_openai: '{folder}' has no split 'test' in config 'default' "
        f"(lm-eval's lambada_openai scores it); its splits: validation"
    )


def test_a_config_that_is_no_blimp_paradigm_is_named(tmp_path):
    folder = _copy("blimp", tmp_path)
    (folder / "determiner_noun_agreement_1").rename(folder / "noun_agreement")
    readme = folder / "README.md"
    readme.write_text(readme.read_text().replace("determiner_noun_agreement_1", "noun_agreement"))
    with pytest.raises(
        TaskScoresError,
        match=f"task_scores.tasks.blimp: '{folder}' has configs that are not lm-eval blimp paradigms: noun_agreement",
    ):
        load_suite(_sources(blimp=str(folder)))


def test_a_task_that_fails_inside_lm_eval_is_named_with_its_source(tmp_path):
    folder = tmp_path / "piqa"
    folder.mkdir()
    table = pa.table({"question": ["Q?"], "sol1": ["a"], "sol2": ["b"], "label": [0]})  # `goal` is missing
    pq.write_table(table, folder / "piqa_validation.parquet")
    with pytest.raises(
        TaskScoresError,
        match=f"task_scores.tasks.piqa: '{folder}' failed in lm-eval while loading its piqa task \\(.*goal",
    ):
        load_suite(_sources(piqa=str(folder)))


def test_a_missing_export_is_named(tmp_path):
    with pytest.raises(TaskScoresError, match=f"'{tmp_path / 'base'}' is not an exported model"):
        check_export(tmp_path / "base")


def test_the_stage_reports_a_missing_source_in_one_line_and_writes_no_metrics(models, tmp_path):
    missing = tmp_path / "no-such-folder"
    write_params(tmp_path, hellaswag=str(missing))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.task_scores",
            str(models),
            "metrics/task_scores.json",
            "metrics/task_scores",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: task_scores.tasks.hellaswag: local folder '{missing}' does not exist")
    )
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "metrics").exists()


def test_a_failure_on_the_second_model_writes_no_file(tiny_exports, tmp_path, monkeypatch):
    """base scores, then chat (a context too short for any LAMBADA passage) fails: neither output appears."""
    models = tmp_path / "models"
    shutil.copytree(tiny_exports() / "base", models / "base")
    shutil.copytree(tiny_exports(16) / "chat", models / "chat")
    write_params(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TaskScoresError, match="lambada_openai"):
        main(str(models), "metrics/task_scores.json", "metrics/task_scores")
    assert not (tmp_path / "metrics").exists()


# --- lm-eval through the server ------------------------------------------------------------------


def _per_item_loglikelihoods(results):
    """{(leaf task, item): [(log-likelihood, is greedy) of each of its requests]} of lm-eval's logged samples."""
    return {
        (leaf, sample["doc_id"]): [tuple(response) for response in sample["filtered_resps"]]
        for leaf, samples in results["samples"].items()
        for sample in samples
    }


@pytest.mark.parametrize("task", ["blimp", "arc_easy"])  # BLiMP's items have no context: lm-eval's prefix token
def test_lm_eval_scores_the_server_as_its_hf_model_scores_the_export(models, task):
    """lm-eval's `local-completions` model against `python -m serve` (fp32), with the tokenizer backend it
    detects by itself (ours: /tokenizer_info, /tokenize), gives every item the log-likelihoods, and every task
    the accuracy, that lm-eval's `hf` model gives on the same export, fed the same tokens."""
    with RunningServer(models, precision="fp32") as server:
        served = lm_eval.simple_evaluate(
            model="local-completions",
            tasks=[load_task(task, sample_source(task)).spec],
            task_manager=stock_tasks(),
            model_args={"model": "base", "base_url": f"{server.url}/v1/completions", "max_length": 128},
            log_samples=True,
        )
    # lm-eval sends a server the token ids of a context as they are; its hf model adds the base tokenizer's
    # <|endoftext|> unless told not to.
    exported = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(models / "base"), "dtype": "float32", "device": "cpu", "add_bos_token": False},
        tasks=[load_task(task, sample_source(task)).spec],
        task_manager=stock_tasks(),
        log_samples=True,
    )
    ours, theirs = _per_item_loglikelihoods(served), _per_item_loglikelihoods(exported)
    assert ours.keys() == theirs.keys() and len(ours) == SAMPLE_ITEMS[task]
    for item, responses in theirs.items():
        assert [greedy for _, greedy in ours[item]] == [greedy for _, greedy in responses], item
        assert [ll for ll, _ in ours[item]] == pytest.approx([ll for ll, _ in responses], abs=1e-3), item
    assert {leaf: result["acc,none"] for leaf, result in served["results"].items() if "acc,none" in result} == {
        leaf: result["acc,none"] for leaf, result in exported["results"].items() if "acc,none" in result
    }
