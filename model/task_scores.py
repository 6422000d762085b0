"""Task scores: lm-evaluation-harness's stock tasks on an exported model (the task_scores stage).

The suite is BLiMP (every paradigm its source holds), LAMBADA (OpenAI's), PIQA, ARC-Easy and HellaSwag,
scored by lm-eval 0.4.13 itself: its task definitions, unchanged but for where their data is read, and its
`hf` model on the exported folder, so the prompts and metrics are those of published tables. Each task's data
comes from a source as the corpora's do (model/sources.py): a local folder in the layout of the hub dataset
the stock task reads, or a hub pin; it is handed to the stock task as its `dataset_path`.

Two choices are made here once, for every path that scores our models with lm-eval:
- `scoring_tokenizer`: every scored text starts with `<|endoftext|>`, as the model saw it in training.
- `fits_context`: an item whose prompt and continuation do not fit in the model's context is left out
  (lm-eval would silently cut the prompt's start, or stop on a continuation longer than the context);
  the metrics count the items scored and the items left out.
"""

import functools
import random
from dataclasses import dataclass
from pathlib import Path

import datasets
import lm_eval
import torch
import transformers
from lm_eval.api.metrics import aggregate_subtask_metrics, unweighted_mean_stderr
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from model.errors import PipelineError
from model.params import TaskSourcesParams
from model.sources import resolve
from model.special_tokens import END_OF_TEXT

SUITE = tuple(TaskSourcesParams.model_fields)
# LAMBADA's perplexity is the one metric of the suite whose standard error lm-eval bootstraps: 10,000
# resamples (its default is 100,000, ten times the time) give that error to about 1% (1 / sqrt(2 x 10,000)).
BOOTSTRAP_ITERS = 10_000


class TaskScoresError(PipelineError, RuntimeError):
    """A task that cannot be scored: its source lacks what the stock task reads, or lm-eval failed on it."""


def scoring_tokenizer(export_dir):
    """The export's tokenizer, prepending `<|endoftext|>` to every text lm-eval encodes.

    The model was trained on documents that each start with `<|endoftext|>` (model/encoding.py), and the
    server prepends it to every document. The base export's tokenizer adds it already; the chat export's adds
    nothing (a chat prompt starts with its first turn). Scoring a text without it scores the model on an input
    it never saw in training, so both models are scored with it: lm-eval's `hf` model then prepends it to every
    context (and uses it alone as the context of BLiMP's empty one).
    """
    return transformers.AutoTokenizer.from_pretrained(export_dir, bos_token=END_OF_TEXT, add_bos_token=True)


def fits_context(context, continuation, encode, context_length):
    """Whether lm-eval scores `continuation` after the whole `context`. The model reads `<|endoftext|>`, the
    context and the continuation but its last token, so the two texts together may be `context_length` tokens
    at most.
    `encode`: text -> token ids, without special tokens."""
    return len(encode(context + continuation)) <= context_length


@dataclass
class Suite:
    tasks: list  # SuiteTask, in SUITE's order
    manager: TaskManager  # lm-eval's index of its stock tasks, which the suite's tasks override


@dataclass
class SuiteTask:
    """One task of the suite, loaded: what lm-eval runs, and every request of every item, to choose from."""

    name: str  # the suite's name (TaskSourcesParams), lm-eval's task or group name
    source: str
    spec: object  # the lm-eval Group holding the stock task(s), their data read from the source
    requests: dict  # lm-eval leaf task name -> [[(context, continuation), ...] per item, in the source's order]
    paradigm_fields: dict  # BLiMP: leaf task name -> the paradigm's linguistic field (the data's `field` column)


def _root_cause(error):
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else 'no message'}"


def _source_error(name, source, message):
    return TaskScoresError(f"task_scores.tasks.{name}: '{source}' {message}")


def _config_names(name, source, path, revision):
    try:
        return datasets.get_dataset_config_names(path, revision=revision)
    except Exception as error:
        raise _source_error(name, source, f"cannot be read as a dataset ({_root_cause(error)})") from error


def _stock_leaves(name, source, configs, manager):
    """lm-eval leaf task name -> its stock config, of the suite's task `name`: for BLiMP's group, the paradigms
    the source holds (a copy may hold a few; the hub holds all 67), otherwise the task itself."""
    entry = manager.task_index[name]
    if not isinstance(entry.cfg.get("task"), list):
        return {name: entry.cfg}
    paradigms = {manager.task_index[leaf].cfg["dataset_name"]: leaf for leaf in entry.cfg["task"]}
    unknown = sorted(set(configs) - set(paradigms))
    if unknown:
        raise _source_error(name, source, f"has configs that are not lm-eval {name} paradigms: {', '.join(unknown)}")
    return {paradigms[config]: manager.task_index[paradigms[config]].cfg for config in sorted(configs)}


def _data_overrides(name, source, path, revision, configs, leaves):
    """lm-eval config overrides that read each stock task of `leaves` from the source; checks that the source
    has the config and the split each one scores."""
    overrides = []
    for leaf, stock in leaves.items():
        config = stock.get("dataset_name") or "default"
        if config not in configs:
            raise _source_error(
                name, source, f"has no config '{config}' (lm-eval's {leaf} reads it); its configs: {', '.join(configs)}"
            )
        splits = datasets.get_dataset_split_names(path, config, revision=revision)
        scored = stock.get("test_split") or stock["validation_split"]
        if scored not in splits:
            raise _source_error(
                name,
                source,
                f"has no split '{scored}' in config '{config}' (lm-eval's {leaf} "
                f"scores it); its splits: {', '.join(splits)}",
            )
        override = {"task": leaf, "dataset_path": path if revision else str(Path(path).resolve())}
        if revision:
            override["dataset_kwargs"] = {"revision": revision}
        # A stock task loads its training split even at 0 shots; a copy without one (as the offline HellaSwag
        # and PIQA) scores the same 0-shot prompts without it.
        if stock.get("training_split") and stock["training_split"] not in splits:
            override["training_split"] = None
        overrides.append(override)
    return overrides


def _build_requests(task):
    """Every request lm-eval makes for every item of `task` at 0 shots: [[(context, continuation), ...], ...]."""
    task.set_config(key="num_fewshot", value=0)
    task.build_all_requests()
    items = {}
    for instance in task.instances:
        items.setdefault(instance.doc_id, []).append(instance.args)
    return [items[doc_id] for doc_id in sorted(items)]


@functools.cache
def stock_tasks():
    """lm-eval's index of its stock tasks (8 s to build on 2 cores), once per process."""
    return TaskManager()


def load_suite(sources):
    """Every task of the suite with its data from `sources` (TaskSourcesParams), checked, loaded and with all
    its requests built by lm-eval: a missing config or split, or a task lm-eval cannot build, fails here,
    before any model runs."""
    return Suite([load_task(name, getattr(sources, name)) for name in SUITE], stock_tasks())


def load_task(name, source):
    """The suite's task `name` with its data from `source`, as `load_suite` loads each one.

    It is loaded as an lm-eval group holding the stock task(s), each with the overrides that read its data from
    the source, which lm-eval merges over the stock config: what a group YAML in an include folder would say,
    given as a mapping. Score it with `tasks=[task.spec], task_manager=stock_tasks()`."""
    manager = stock_tasks()
    path, revision = resolve(source, f"task_scores.tasks.{name}")
    configs = _config_names(name, source, path, revision)
    leaves = _stock_leaves(name, source, configs, manager)
    group = {"group": f"task_scores_{name}", "task": _data_overrides(name, source, path, revision, configs, leaves)}
    try:
        spec = manager.load([group])["groups"][group["group"]]
        tasks = {task.task_name: task for task in spec.get_all_tasks()}
        requests = {leaf: _build_requests(task) for leaf, task in tasks.items()}
        paradigm_fields = {leaf: task.eval_docs[0]["field"] for leaf, task in tasks.items()} if name == "blimp" else {}
    except Exception as error:
        raise _source_error(
            name, source, f"failed in lm-eval while loading its {name} task ({_root_cause(error)})"
        ) from error
    return SuiteTask(name, source, spec, requests, paradigm_fields)


def choose_items(items, encode, context_length, limit, seed, task_name):
    """(indices of the items to score, how many do not fit): every item whose requests all fit the context,
    or a sample of `limit` of them drawn with (seed, task_name), in the source's order."""
    fitting = [
        index
        for index, requests in enumerate(items)
        if all(fits_context(context, continuation, encode, context_length) for context, continuation in requests)
    ]
    chosen = (
        fitting if limit == 0 or len(fitting) <= limit else random.Random(f"{seed}:{task_name}").sample(fitting, limit)
    )
    return sorted(chosen), len(items) - len(fitting)


def resolve_device(device):
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def check_export(export_dir):
    if not (Path(export_dir) / "config.json").is_file():
        raise TaskScoresError(
            f"'{export_dir}' is not an exported model (it has no config.json): run the export stage first"
        )


def load_scorer(export_dir, batch_size, device):
    """lm-eval's `hf` model on an exported folder, in fp32, with the stage's tokenizer."""
    return HFLM(
        pretrained=str(export_dir),
        tokenizer=scoring_tokenizer(export_dir),
        add_bos_token=True,
        batch_size=batch_size,
        device=resolve_device(device),
        dtype="float32",
    )


def score_model(scorer, suite, limit, seed):
    """{task: its figures} of one model on every task of the suite (see `_task_figures`)."""

    def encode(text):
        return scorer.tokenizer.encode(text, add_special_tokens=False)

    scores = {}
    for task in suite.tasks:
        samples, too_long = {}, 0
        for leaf, items in task.requests.items():
            samples[leaf], left_out = choose_items(items, encode, scorer.max_length, limit, seed, leaf)
            too_long += left_out
            if not samples[leaf]:
                raise _source_error(
                    task.name,
                    task.source,
                    f"has no item of lm-eval's {leaf} that fits the model's context of {scorer.max_length} tokens",
                )
        try:
            results = lm_eval.simple_evaluate(
                model=scorer,
                tasks=[task.spec],
                task_manager=suite.manager,
                samples=samples,
                bootstrap_iters=BOOTSTRAP_ITERS,
                log_samples=False,
            )
        except Exception as error:
            raise _source_error(
                task.name, task.source, f"failed in lm-eval while scoring its {task.name} task ({_root_cause(error)})"
            ) from error
        scores[task.name] = _task_figures(task, results, too_long)
    return scores


def _metrics(result):
    """lm-eval's figures of one task or group ("acc,none": ...) as {"acc": ..., "acc_stderr": ...}."""
    return {
        key.split(",")[0]: float(value)
        for key, value in result.items()
        if key.endswith(",none") and isinstance(value, (int, float))
    }


def _mean_over_paradigms(paradigms):
    """BLiMP's figure over paradigms, as lm-eval's stock blimp group aggregates (_blimp.yaml): the unweighted
    mean of their accuracies, with the standard error of that mean."""
    return {
        "acc": float(
            aggregate_subtask_metrics([m["acc"] for m in paradigms], [1] * len(paradigms), weight_by_size=False)
        ),
        "acc_stderr": float(unweighted_mean_stderr([m["acc_stderr"] for m in paradigms])),
        "paradigms": len(paradigms),
    }


def _task_figures(task, results, too_long):
    """Every metric of the stock task with its standard error, the items scored and those left out as too
    long; for BLiMP the mean over paradigms, overall and per linguistic field."""
    leaves = list(task.requests)
    counts = {"items": sum(results["n-samples"][leaf]["effective"] for leaf in leaves), "too_long": too_long}
    if task.name != "blimp":
        return {**_metrics(results["results"][task.name]), **counts}
    paradigms = {leaf: _metrics(results["results"][leaf]) for leaf in leaves}
    by_field = {}
    for leaf, figures in paradigms.items():
        by_field.setdefault(task.paradigm_fields[leaf], []).append(figures)
    return {
        **_mean_over_paradigms(list(paradigms.values())),
        **counts,
        "fields": {field: _mean_over_paradigms(figures) for field, figures in by_field.items()},
    }


def plot_rows(scores):
    """One row per task for the stage's bar chart: the accuracy of every task (BLiMP: over its paradigms)."""
    return [{"task": task, "acc": figures["acc"]} for task, figures in scores.items()]
