"""Task-score benchmark: the task_scores stage's time on the sample profile, the sample profile's exports on
the real tasks, and the seconds per item at the ryangpt shape, from which the whole suite's time follows.

usage (from the repository root, after `dvc repro`): .venv/bin/python -m benchmarks.task_scores
    [--blimp-limit 100] [--limit 500] [--timing-blimp-limit 10] [--timing-limit 100]

1. `python -m stages.task_scores` on serve/models with params.yaml (the sample profile's own task sets),
   writing into a scratch folder, timed;
2. serve/models on the real offline copies in ../shared/eval (read in place, never copied into the
   repository; its HellaSwag is a reconstruction, not comparable to published HellaSwag figures): a seeded
   sample of --blimp-limit pairs per BLiMP paradigm and of --limit items of every other task;
3. a model of configs/ryangpt.yaml's shape with random weights (the time of a forward pass does not depend
   on them), exported with the sample tokenizer, on --timing-blimp-limit / --timing-limit items of the same
   copies: its seconds per item times each task's size estimate the whole suite. The sample tokenizer's
   2,048 pieces cut text into more tokens than the profile's 16,000 would, so the estimate is high.
Writes the section "## Task scores" of BENCHMARKS.md, with published figures beside ours.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from benchmarks.report import machine_line, write_section
from model.export import export_model
from model.gpt import GPT, GPTConfig
from model.params import TaskSourcesParams, parse_params
from model.task_scores import Suite, load_scorer, load_suite, score_model

REPO = Path(__file__).resolve().parents[1]
EVAL = REPO.parent / "shared" / "eval"
COMMAND = ".venv/bin/python -m benchmarks.task_scores"
SOURCES = TaskSourcesParams(
    blimp=str(EVAL / "nyu-mll__blimp"),
    lambada_openai=str(EVAL / "EleutherAI__lambada_openai"),
    piqa=str(EVAL / "baber__piqa"),
    arc_easy=str(EVAL / "allenai__ai2_arc"),
    hellaswag=str(EVAL / "Rowan__hellaswag"),
)
TITLES = {
    "blimp": "BLiMP",
    "lambada_openai": "LAMBADA",
    "piqa": "PIQA",
    "arc_easy": "ARC-Easy",
    "hellaswag": "HellaSwag",
}
# Published figures (percent) and the scale each was reached at.
PUBLISHED = [
    ("a 5-gram model (the BLiMP paper's n-gram baseline)", {"blimp": "61.2"}),
    ("OPT-125M trained on 10M words (BabyLM)", {"blimp": "62.6"}),
    ("OPT-125M trained on 100M words (BabyLM)", {"blimp": "75.3"}),
    ("a 26M-parameter LLaMA trained on 2 MB of text", {"blimp": "57.2"}),
    ("Pythia-70M after about 2B tokens", {"piqa": "56.0", "arc_easy": "30.9", "lambada_openai": "5.0 (ppl 4,465)"}),
    ("Pythia-70M after 300B tokens", {"piqa": "59.5", "arc_easy": "37.4", "lambada_openai": "18.5 (ppl 142)"}),
    ("GPT-2 124M", {"hellaswag": "30.9"}),
]


def time_the_stage():
    """Seconds of the stage on the sample profile, as `dvc repro` runs it (its outputs go to a scratch folder)."""
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "stages.task_scores",
                "serve/models",
                f"{folder}/task_scores.json",
                f"{folder}/task_scores",
            ],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        return time.perf_counter() - started


def score(export_dirs, suite, limits):
    """{model: {task: figures with their `seconds`}} of each export on each task at its limit."""
    scores = {}
    for name, export_dir in export_dirs.items():
        scorer = load_scorer(export_dir, 16, "cpu")
        scores[name] = {}
        for task in suite.tasks:
            started = time.perf_counter()
            figures = score_model(scorer, Suite([task], suite.manager), limits[task.name], 1337)[task.name]
            scores[name][task.name] = {**figures, "seconds": time.perf_counter() - started}
            print(name, task.name, json.dumps(figures), flush=True)
    return scores


def ryangpt_export(folder):
    """A random-weights model of the ryangpt shape, exported with the sample profile's tokenizer."""
    params = parse_params(yaml.safe_load((REPO / "configs" / "ryangpt.yaml").read_text(encoding="utf-8")))
    torch.manual_seed(0)
    model = GPT(GPTConfig(**params.model.model_dump(), vocab_size=params.tokenizer.vocab_size)).eval()
    export_model(
        model,
        REPO / "data" / "tokenizer.model",
        Path(folder) / "base",
        "base",
        False,
        {"metrics": {}},
        {"temperature": 0.8, "top_k": 50},
    )
    return Path(folder) / "base", model.num_parameters(), params.model.context_length


def percent(figures, metric):
    return f"{100 * figures[metric]:.1f} ± {100 * figures[f'{metric}_stderr']:.1f}"


def report(args, stage_seconds, load_seconds, scores, timing, ryangpt_parameters, ryangpt_context, suite):
    sizes = {task.name: sum(len(items) for items in task.requests.values()) for task in suite.tasks}
    lines = [
        f"Command: `{COMMAND} --blimp-limit {args.blimp_limit} --limit {args.limit} --timing-blimp-limit "
        f"{args.timing_blimp_limit} --timing-limit {args.timing_limit}` (after `dvc repro` of the sample profile; "
        f"reads `../shared/eval` in place). {machine_line()} lm-eval 0.4.13, fp32, batch 16, 0-shot.",
        "",
        f"**The stage on the sample profile** (`dvc repro` runs `python -m stages.task_scores serve/models ...` on "
        f"`data/sample/`'s own task sets, both models): **{stage_seconds:.0f} s**. Those sets only prove that the "
        f"stage runs; their scores mean nothing.",
        "",
        "### The sample profile's models on the real tasks",
        "",
        f"The exports of `dvc repro` (the sample profile: 1.1M parameters, context 128, 200 pretraining steps x 16 "
        f"x 128 = 410k tokens of a 400 KB corpus; `chat` finetuned on dialogues) on `../shared/eval`: a seeded "
        f"sample of {args.blimp_limit} pairs per BLiMP paradigm (all 67) and of {args.limit} items of every other "
        f"task, among "
        f"the items that fit the context (`too long`: left out, of the task's "
        f"{', '.join(f'{sizes[t]:,}' for t in sizes if t != 'blimp')} "
        f"items). Accuracy in percent ± its standard error; chance is 50 for BLiMP and PIQA, 25 for ARC-Easy "
        f"(mostly 4 choices) and HellaSwag, 0 for LAMBADA. Loading the suite (checking the copies and building "
        f"every request of every item) took {load_seconds:.0f} s. HellaSwag here is a reconstruction: its figures "
        f"are not comparable to published ones.",
        "",
        "| model | BLiMP | LAMBADA acc | LAMBADA perplexity | PIQA acc / acc_norm | ARC-Easy acc / acc_norm | "
        "HellaSwag acc / acc_norm |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, tasks in scores.items():
        lambada = tasks["lambada_openai"]
        cells = [percent(tasks["blimp"], "acc"), percent(lambada, "acc"), f"{lambada['perplexity']:,.0f}"]
        cells += [
            f"{percent(tasks[t], 'acc')} / {percent(tasks[t], 'acc_norm')}" for t in ("piqa", "arc_easy", "hellaswag")
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| model | " + " | ".join(f"{TITLES[t]} items (too long)" for t in TITLES) + " |",
        "|---|" + "---:|" * len(TITLES),
    ]
    for name, tasks in scores.items():
        lines.append(
            f"| {name} | " + " | ".join(f"{tasks[t]['items']:,} ({tasks[t]['too_long']:,})" for t in TITLES) + " |"
        )
    fields = scores["base"]["blimp"]["fields"]
    lines += [
        "",
        "BLiMP per linguistic field (the data's `field` column; it labels one paradigm, principle_A_case_2, "
        "`syntax/semantics`):",
        "",
        "| model | " + " | ".join(f"{field} ({values['paradigms']})" for field, values in fields.items()) + " |",
        "|---|" + "---|" * len(fields),
    ]
    for name, tasks in scores.items():
        lines.append(
            f"| {name} | " + " | ".join(percent(tasks["blimp"]["fields"][field], "acc") for field in fields) + " |"
        )
    lines += [
        "",
        "### Published figures, and the scale behind them",
        "",
        "Percent. Our sample models are smaller and have seen less text than any of these: the nearest, the "
        "26M-parameter LLaMA on 2 MB, has 24 times the parameters and 5 times the text of the sample profile "
        "(400 KB). The ryangpt profile (20.1M parameters, 2.62B tokens) is near Pythia-70M's first row in "
        "tokens, with under a third of its parameters; it has not been trained and scored here.",
        "",
        "| model | " + " | ".join(TITLES.values()) + " |",
        "|---|" + "---|" * len(TITLES),
    ]
    for model, figures in PUBLISHED:
        lines.append(f"| {model} | " + " | ".join(figures.get(t, "") for t in TITLES) + " |")
    lines.append(
        "| ours, sample profile, base (1.1M parameters, 410k tokens) | "
        + " | ".join(f"{100 * scores['base'][t]['acc']:.1f}" for t in TITLES)
        + " |"
    )
    total = sum(timing[t]["seconds"] / timing[t]["items"] * sizes[t] for t in TITLES)
    lines += [
        "",
        "### Time at the ryangpt shape",
        "",
        f"A random-weights model of configs/ryangpt.yaml's shape ({ryangpt_parameters / 1e6:.1f}M parameters, "
        f"context {ryangpt_context}) on {args.timing_blimp_limit} pairs per BLiMP paradigm and {args.timing_limit} "
        f"items of every other task; seconds per item times the task's size estimate the whole suite. The sample "
        f"tokenizer (2,048 pieces) makes more tokens of a text than the profile's 16,000 would, so the estimate is "
        f"on the high side.",
        "",
        "| task | items timed | too long | seconds per item | items in the task | estimated seconds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for task in TITLES:
        per_item = timing[task]["seconds"] / timing[task]["items"]
        lines.append(
            f"| {TITLES[task]} | {timing[task]['items']:,} | {timing[task]['too_long']} | {per_item:.3f} | "
            f"{sizes[task]:,} | {per_item * sizes[task]:,.0f} |"
        )
    lines += [
        "",
        f"The whole suite for one model: about **{total / 60:.0f} min** on this CPU, so about "
        f"**{2 * total / 3600:.1f} h** for the stage's two models, plus loading the suite "
        f"({load_seconds:.0f} s here). The RyanGPT profiles score everything (`limit: 0`); on a CPU, "
        f"`-S task_scores.limit=500` scores a seeded sample of 500 items per task (per BLiMP paradigm) "
        f"instead, or run it where `device: auto` finds a GPU.",
    ]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blimp-limit", type=int, default=100, help="pairs per BLiMP paradigm, sample models")
    parser.add_argument("--limit", type=int, default=500, help="items of every other task, sample models")
    parser.add_argument("--timing-blimp-limit", type=int, default=10, help="pairs per BLiMP paradigm, ryangpt shape")
    parser.add_argument("--timing-limit", type=int, default=100, help="items of every other task, ryangpt shape")
    args = parser.parse_args()
    if not EVAL.is_dir():
        raise SystemExit(f"{EVAL} is missing: this benchmark reads the offline task copies in ../shared/eval")
    stage_seconds = time_the_stage()
    started = time.perf_counter()
    suite = load_suite(SOURCES)
    load_seconds = time.perf_counter() - started
    limits = {task: args.blimp_limit if task == "blimp" else args.limit for task in TITLES}
    scores = score({name: REPO / "serve" / "models" / name for name in ("base", "chat")}, suite, limits)
    with tempfile.TemporaryDirectory() as folder:
        export_dir, parameters, context = ryangpt_export(folder)
        timing_limits = {task: args.timing_blimp_limit if task == "blimp" else args.timing_limit for task in TITLES}
        timing = score({"ryangpt shape": export_dir}, suite, timing_limits)["ryangpt shape"]
    write_section(
        "## Task scores", report(args, stage_seconds, load_seconds, scores, timing, parameters, context, suite)
    )


if __name__ == "__main__":
    main()
