"""Recipe benchmark: the new default (Muon + warmup-stable-decay) against the reference's AdamW-cosine
and against AdamW with a tuned learning rate, on real text, at equal tokens.

usage (from the repository root): .venv/bin/python benchmarks/recipe.py [--work DIR] [--jobs 2]

Everything runs through the project's own stage scripts in a scratch folder (default
/tmp/recipe-benchmark; finished runs are kept there and reused when the script is run again):
1. extract_wikipedia, extract_c4, extract_dialog, combine, build_bpe and encode turn the real
   Wikipedia and C4 slices of ../shared/corpus (read in place, never copied into the repository)
   into token arrays with an 8k BPE. The dialog stage reads the bundled sample dialogues, since
   ../shared holds no DailyDialog test split; dialogues play no part in pretraining.
2. stages.pretrain trains each arm from its own params.yaml (the sample profile's file with the
   arm's overrides), evaluating held-out bits per byte per source with the project's evaluator.
   Every arm with seed s sees the same batches in the same order (data order is a pure function
   of seed and step).
Runs go --jobs at a time with 2 / jobs torch threads each, so the machine's cores are all used
and never shared between two runs. Writes the section "## Training recipe (real text)" of
BENCHMARKS.md.

Arms at the main size (6 layers, width 128, context 256, vocab 8k, untied head: 3.7M parameters),
STEPS x 16 x 256 training tokens each. (A 10M-parameter model, 1.5M tokens a run, trains at about
700 tokens/s on the 2-core AVX2 machine this was written on, 35 minutes a run: too slow for the
twelve runs below. The smaller size keeps every arm and both seeds.)
- reference: the RyanGPT recipe (configs/ryangpt.yaml's pretrain section: AdamW (0.9, 0.99),
  cosine 6e-4 -> 6e-5, its init) with warmup at its 2.5% of the steps;
- AdamW lr sweep: the same at 2e-3, 6e-3 and 2e-2 (seed 0), then the best learning rate at seed 1;
- default: params.yaml's pretrain section (the new recipe), unchanged;
- default at 2/3 and 1/2 of the tokens: when does the new recipe reach tuned AdamW's final figure.
A second size (6 layers, width 64) repeats reference, sweep and default with one seed, to show
that the default needs no retuning when the width changes.
3. The reference, tuned AdamW and the default at the main size, seed 0, are exported (model/export.py) and
   scored on lm-evaluation-harness's stock tasks with the task_scores stage's code, on the real task copies
   in ../shared/eval (benchmarks/task_scores.py: --blimp-limit pairs per BLiMP paradigm, --limit items of
   the other tasks); section "## Training recipe: task scores". With --task-arms-only, only those three runs
   are trained (or reused), and only that section is written.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml
from safetensors import safe_open

from benchmarks.report import machine_line, write_section
from model.export import export_model
from model.gpt import GPT, GPTConfig, load_model

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "corpus"
COMMAND = ".venv/bin/python -m benchmarks.recipe"
HEADING = "## Training recipe (real text)"
TASK_HEADING = "## Training recipe: task scores"
MEASURED_TUNED_LR = 6e-3  # the sweep's best at seed 0 (BENCHMARKS.md), for --task-arms-only
SOURCES = ("wikipedia", "c4")

CONTEXT = 256
BATCH = 16
STEPS = 160  # of 16 x 256 tokens: 655k tokens, 0.76 passes over the training split
EVAL_POINTS = 8  # evaluations per run, for the learning curves
EVAL_BATCHES = 8  # of BATCH windows of CONTEXT tokens per held-out source
SEEDS = (0, 1)
SWEEP_LRS = (6e-4, 2e-3, 6e-3, 2e-2)  # 2e-2 so that the best is not the sweep's largest
MAIN_MODEL = {
    "n_layers": 6,
    "d_model": 128,
    "n_heads": 2,
    "d_ff": 512,
    "context_length": CONTEXT,
    "tie_embeddings": False,
}
SMALL_MODEL = {**MAIN_MODEL, "d_model": 64, "n_heads": 1, "d_ff": 256}

DATA_PARAMS = {
    "wikipedia": {"source": str(CORPUS / "wikipedia"), "data_dir": "20231101.en"},
    "c4": {"source": str(CORPUS / "c4"), "data_files": "en/c4-train.*.json.gz"},
    "dialog": {"source": str(REPO / "data" / "sample" / "dailydialog")},
    "tokenizer": {"vocab_size": 8192},
}
DATA_STAGES = [
    ["stages.extract_wikipedia", "data/extracted/wikipedia.jsonl", "metrics/extract_wikipedia.json"],
    ["stages.extract_c4", "data/extracted/c4.jsonl", "metrics/extract_c4.json"],
    ["stages.extract_dialog", "data/extracted/dialog", "metrics/extract_dialog.json"],
    [
        "stages.combine",
        "data/extracted/wikipedia.jsonl",
        "data/extracted/c4.jsonl",
        "data/combined",
        "metrics/combine.json",
    ],
    ["stages.build_bpe", "data/combined", "data/extracted/dialog", "data/tokenizer.model"],
    ["stages.encode", "data/tokenizer.model", "data/combined", "data/extracted/dialog", "data/tokens"],
]


def base_params():
    return yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))


def merged(params, overrides):
    params = json.loads(json.dumps(params))
    for section, values in overrides.items():
        if isinstance(values, dict):
            params[section].update(values)
        else:
            params[section] = values
    return params


def run_stage(folder, args, threads):
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "DVC_NO_ANALYTICS": "1",
        "TQDM_DISABLE": "1",
        "OMP_NUM_THREADS": str(threads),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
    }
    result = subprocess.run([sys.executable, "-m", *args], cwd=folder, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{args[0]} failed in {folder}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")


def prepare_data(work):
    """The token arrays of the real slices, made by the pipeline's own data stages."""
    data = work / "data"
    if (data / "tokens" / "meta.json").exists():
        return data / "tokens"
    if not (CORPUS / "wikipedia").is_dir():
        raise SystemExit(f"{CORPUS} is missing: this benchmark reads the real-text slices in ../shared/corpus")
    work.mkdir(parents=True, exist_ok=True)
    (work / "params.yaml").write_text(yaml.safe_dump(merged(base_params(), DATA_PARAMS)), encoding="utf-8")
    for stage in DATA_STAGES:
        print(f"data: {stage[0]}", flush=True)
        run_stage(work, stage, threads=os.cpu_count())
    return data / "tokens"


# --- arms ----------------------------------------------------------------------------------------


def reference_train(lr):
    """The RyanGPT profile's pretrain recipe at this benchmark's budget: warmup is its 2.5% of the steps."""
    reference = yaml.safe_load((REPO / "configs" / "ryangpt.yaml").read_text(encoding="utf-8"))["pretrain"]
    return {**reference, "lr": lr, "min_lr": lr / 10, "warmup_steps": max(1, round(0.025 * STEPS))}


def run_spec(name, seed, model, train, steps=STEPS):
    eval_every = max(1, steps // EVAL_POINTS)
    schedule = {
        "steps": steps,
        "batch_size": BATCH,
        "grad_accum": 1,
        "log_every": eval_every,
        "eval_every": eval_every,
        "eval_batches": EVAL_BATCHES,
        "device": "cpu",
    }
    return {
        "name": name,
        "seed": seed,
        "model": model,
        "train": {**train, **schedule},
        "checkpoint_every": eval_every * EVAL_POINTS,
    }


def run_arm(work, tokens, spec, threads):
    """Trains one arm with stages.pretrain; returns its history (one row per evaluation)."""
    folder = work / "runs" / f"{spec['name']}-seed{spec['seed']}"
    result_file = folder / "history.json"
    if result_file.exists():
        return json.loads(result_file.read_text(encoding="utf-8"))
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    train = {**base_params()["pretrain"], **spec["train"]}
    params = merged(
        base_params(),
        {
            "seed": spec["seed"],
            "model": spec["model"],
            "pretrain": train,
            "checkpoint_every": {"pretrain": spec["checkpoint_every"]},
            **DATA_PARAMS,
        },
    )
    (folder / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    started = time.perf_counter()
    run_stage(folder, ["stages.pretrain", str(tokens), "checkpoint.safetensors", "model", "live"], threads)
    with safe_open(folder / "checkpoint.safetensors", framework="pt") as f:
        history = json.loads(f.metadata()["history"])
    history = [row for row in history if f"val/{SOURCES[0]}/bpb" in row]
    for row in history:
        row["seconds"] = time.perf_counter() - started
    result_file.write_text(json.dumps(history, sort_keys=True), encoding="utf-8")
    print(
        f"{folder.name}: "
        + ", ".join(f"{s} {history[-1][f'val/{s}/bpb']:.4f}" for s in SOURCES)
        + f" bpb in {time.perf_counter() - started:.0f} s",
        flush=True,
    )
    return history


def run_all(work, tokens, specs, jobs):
    threads = max(1, (os.cpu_count() or 2) // jobs)
    with ThreadPoolExecutor(jobs) as pool:
        histories = list(pool.map(lambda spec: run_arm(work, tokens, spec, threads), specs))
    return {(spec["name"], spec["seed"]): history for spec, history in zip(specs, histories)}


# --- the report ----------------------------------------------------------------------------------


def final(history, source):
    return history[-1][f"val/{source}/bpb"]


def summary(results, name, source):
    """(mean, spread) of an arm's final bits per byte over its seeds; spread is max - min."""
    values = [final(h, source) for (arm, _), h in results.items() if arm == name]
    return statistics.fmean(values), (max(values) - min(values) if len(values) > 1 else float("nan"))


def best_lr(results, prefix, seed=0):
    """The sweep's learning rate with the lowest mean final bits per byte over both sources, at `seed`."""
    return min(
        SWEEP_LRS, key=lambda lr: statistics.fmean(final(results[(f"{prefix}adamw-{lr:g}", seed)], s) for s in SOURCES)
    )


def n_parameters(model, meta):
    config = GPTConfig(vocab_size=meta["vocab_size"], rope_theta=1e4, norm_eps=1e-5, **model)
    return GPT(config).num_parameters()


def report(results, tuned_lr, small_tuned_lr, meta, seconds):
    lines = [
        f"Command: `{COMMAND}`. {machine_line()} Runs went two at a time, one torch thread each, "
        f"{seconds / 60:.0f} min of runs in all. The figures are bits per byte at equal tokens, which do not "
        f"depend on what else runs on the machine. Scale: a 10M-parameter model trains at about 700 "
        f"tokens/s on this CPU, so 1.5M tokens a run would have taken 35 min a run; this benchmark uses a "
        f"3.7M-parameter model and 0.66M tokens a run (about 0.2 tokens per parameter, as 1.5M would be for "
        f"the 10M model) to keep every arm and both seeds.",
        "",
        f"Data: the real Wikipedia and C4 slices of `../shared/corpus` through the pipeline's own stages "
        f"(8,192-token BPE; {meta['splits']['train']['tokens']:,} training tokens, held out "
        + ", ".join(f"{s} {meta['splits'][f'val_{s}']['tokens']:,}" for s in SOURCES)
        + f" tokens). Model: 6 layers x 128, 2 heads, d_ff 512, context {CONTEXT}, untied head "
        f"({n_parameters(MAIN_MODEL, meta) / 1e6:.1f}M parameters). Every run: {STEPS} steps x {BATCH} x {CONTEXT} "
        f"= {STEPS * BATCH * CONTEXT / 1e6:.2f}M "
        f"tokens, batches in the same order for every arm of a seed. Figures: held-out bits per byte from "
        f"`heldout_evaluator` ({EVAL_BATCHES} batches of {BATCH} windows per source) at the last step; mean "
        f"of seeds {', '.join(map(str, SEEDS))} ± half their spread (max - min).",
        "",
        "| arm | Wikipedia bpb | C4 bpb | vs tuned AdamW (wiki / C4) |",
        "|---|---|---|---|",
    ]
    tuned = {s: summary(results, f"adamw-{tuned_lr:g}", s)[0] for s in SOURCES}
    rows = [
        ("reference", "reference recipe (AdamW, cosine 6e-4 -> 6e-5)"),
        (f"adamw-{tuned_lr:g}", f"tuned AdamW (lr {tuned_lr:g}, best of {', '.join(f'{lr:g}' for lr in SWEEP_LRS)})"),
        ("default", "**new default** (Muon + AdamW, WSD)"),
        ("default-2of3", "new default, 2/3 of the tokens"),
        ("default-1of2", "new default, 1/2 of the tokens"),
    ]
    for name, label in rows:
        cells = []
        for source in SOURCES:
            mean, spread = summary(results, name, source)
            cells.append(f"{mean:.4f} ± {spread / 2:.4f}")
        change = " / ".join(f"{100 * (summary(results, name, s)[0] / tuned[s] - 1):+.1f}%" for s in SOURCES)
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {change} |")
    lines += [
        "",
        "The learning-rate sweep (seed 0, final bits per byte):",
        "",
        "| AdamW lr | Wikipedia | C4 |",
        "|---|---|---|",
    ]
    for lr in SWEEP_LRS:
        history = results[(f"adamw-{lr:g}", 0)]
        lines.append(f"| {lr:g} | {final(history, 'wikipedia'):.4f} | {final(history, 'c4'):.4f} |")
    lines += [
        "",
        "Learning curves (held-out Wikipedia bits per byte, seed 0):",
        "",
        "| tokens (M) | reference | tuned AdamW | new default |",
        "|---|---|---|---|",
    ]
    curves = [results[("reference", 0)], results[(f"adamw-{tuned_lr:g}", 0)], results[("default", 0)]]
    for rows_at in zip(*curves):
        tokens_m = rows_at[0]["train/tokens"] / 1e6
        lines.append(f"| {tokens_m:.2f} | " + " | ".join(f"{row['val/wikipedia/bpb']:.4f}" for row in rows_at) + " |")
    lines += ["", "Targets (both sources; the seed spread is max - min over the two seeds):", ""]
    for source in SOURCES:
        default_mean, default_spread = summary(results, "default", source)
        tuned_mean, tuned_spread = summary(results, f"adamw-{tuned_lr:g}", source)
        gap = 100 * (1 - default_mean / tuned_mean)
        noise = max(default_spread, tuned_spread)
        reached = {label: summary(results, f"default-{label}", source)[0] <= tuned_mean for label in ("2of3", "1of2")}
        lines.append(
            f"- {source}: {gap:.1f}% lower than tuned AdamW at equal tokens (goal 3%); the gap is "
            f"{tuned_mean - default_mean:.4f} bpb against a seed spread of {noise:.4f}. Tuned AdamW's final "
            f"{tuned_mean:.4f} is {'reached' if reached['2of3'] else 'not reached'} with 2/3 of its tokens "
            f"and {'reached' if reached['1of2'] else 'not reached'} with 1/2."
        )
    lines += [
        "",
        f"Second size, no retuning (6 layers x 64, d_ff 256, 1 head, "
        f"{n_parameters(SMALL_MODEL, meta) / 1e6:.1f}M parameters; seed 0):",
        "",
        "| arm | Wikipedia bpb | C4 bpb |",
        "|---|---|---|",
    ]
    for name in ["small-reference", *(f"small-adamw-{lr:g}" for lr in SWEEP_LRS[1:]), "small-default"]:
        history = results[(name, 0)]
        marker = " (best AdamW)" if name == f"small-adamw-{small_tuned_lr:g}" else ""
        lines.append(f"| {name}{marker} | {final(history, 'wikipedia'):.4f} | {final(history, 'c4'):.4f} |")
    return "\n".join(lines)


def score_arms(work, tokens, arms, blimp_limit, limit):
    """{arm label: {task: figures}} of each arm's seed-0 model on the real task copies (task_scores stage code)."""
    from benchmarks.task_scores import SOURCES, score
    from model.task_scores import load_suite

    suite = load_suite(SOURCES)
    limits = {task.name: blimp_limit if task.name == "blimp" else limit for task in suite.tasks}
    exports = {}
    for label, name in arms.items():
        folder = work / "runs" / f"{name}-seed0"
        exports[label] = folder / "export"
        if not (exports[label] / "config.json").exists():
            export_model(
                load_model(folder / "model"),
                tokens.parent / "tokenizer.model",
                exports[label],
                name,
                False,
                {"metrics": {}},
                {"temperature": 0.8, "top_k": 50},
            )
    return score(exports, suite, limits)


def task_report(results, scores, arms, blimp_limit, limit, meta):
    from benchmarks.task_scores import PUBLISHED, TITLES, percent

    lines = [
        f"Command: `{COMMAND} --task-arms-only --blimp-limit {blimp_limit} --limit {limit}`. {machine_line()} "
        f"The models of the table above (3.7M parameters, {STEPS * BATCH * CONTEXT / 1e6:.2f}M tokens of real "
        f"Wikipedia and C4, 8,192-token BPE, context {CONTEXT}), seed 0, exported and scored by the task_scores "
        f"stage's code (lm-eval 0.4.13's stock tasks, fp32, 0-shot, `<|endoftext|>` before each text) on "
        f"`../shared/eval`: a seeded sample of {blimp_limit} pairs per BLiMP paradigm (all 67) and of {limit} items "
        f"of every other task, among those that fit the context of {CONTEXT} tokens. Accuracy in percent ± its "
        f"standard error (lm-eval's, over items; the seed spread of the bits per byte is in the table above). "
        f"Chance: 50 for BLiMP and PIQA, about 25 for ARC-Easy and HellaSwag. HellaSwag here is a "
        f"reconstruction, not comparable to published figures.",
        "",
        "| arm | Wikipedia / C4 bpb | BLiMP | LAMBADA acc (perplexity) | PIQA acc / acc_norm | "
        "ARC-Easy acc / acc_norm | HellaSwag acc / acc_norm |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, name in arms.items():
        tasks, history = scores[label], results[(name, 0)]
        lambada = tasks["lambada_openai"]
        cells = [
            f"{final(history, 'wikipedia'):.4f} / {final(history, 'c4'):.4f}",
            percent(tasks["blimp"], "acc"),
            f"{percent(lambada, 'acc')} ({lambada['perplexity']:,.0f})",
        ]
        cells += [
            f"{percent(tasks[t], 'acc')} / {percent(tasks[t], 'acc_norm')}" for t in ("piqa", "arc_easy", "hellaswag")
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Items scored (left out as too long for the context):",
        "",
        "| arm | " + " | ".join(TITLES.values()) + " |",
        "|---|" + "---:|" * len(TITLES),
    ]
    for label in arms:
        lines.append(
            f"| {label} | "
            + " | ".join(f"{scores[label][t]['items']:,} ({scores[label][t]['too_long']:,})" for t in TITLES)
            + " |"
        )
    lines += [
        "",
        "Published figures (percent), with the scale behind them: every one of these models is larger, "
        "or has seen far more text, than these 3.7M-parameter models trained on "
        f"{STEPS * BATCH * CONTEXT / 1e6:.2f}M tokens.",
        "",
        "| model | " + " | ".join(TITLES.values()) + " |",
        "|---|" + "---|" * len(TITLES),
    ]
    for model, figures in PUBLISHED:
        lines.append(f"| {model} | " + " | ".join(figures.get(t, "") for t in TITLES) + " |")
    for label in arms:
        lines.append(f"| ours: {label} | " + " | ".join(f"{100 * scores[label][t]['acc']:.1f}" for t in TITLES) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/recipe-benchmark"))
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (the cores are split between them)")
    parser.add_argument(
        "--task-arms-only",
        action="store_true",
        help="train only the three scored arms (seed 0) and write only the task-score section",
    )
    parser.add_argument("--blimp-limit", type=int, default=100, help="task scores: pairs per BLiMP paradigm")
    parser.add_argument("--limit", type=int, default=500, help="task scores: items of every other task")
    args = parser.parse_args()
    tokens = prepare_data(args.work)
    default = base_params()["pretrain"]
    meta = json.loads((tokens / "meta.json").read_text(encoding="utf-8"))

    def write_task_scores(results, tuned_lr):
        arms = {
            "reference recipe": "reference",
            f"tuned AdamW (lr {tuned_lr:g})": f"adamw-{tuned_lr:g}",
            "new default (Muon, WSD)": "default",
        }
        scores = score_arms(args.work, tokens, arms, args.blimp_limit, args.limit)
        body = task_report(results, scores, arms, args.blimp_limit, args.limit, meta)
        print(body)
        write_section(TASK_HEADING, body)

    if args.task_arms_only:
        specs = [
            run_spec("reference", 0, MAIN_MODEL, reference_train(6e-4)),
            run_spec(f"adamw-{MEASURED_TUNED_LR:g}", 0, MAIN_MODEL, reference_train(MEASURED_TUNED_LR)),
            run_spec("default", 0, MAIN_MODEL, default),
        ]
        write_task_scores(run_all(args.work, tokens, specs, args.jobs), MEASURED_TUNED_LR)
        return

    def sweep(prefix, model, seeds):
        return [
            run_spec(f"{prefix}adamw-{lr:g}", seed, model, reference_train(lr))
            for lr in SWEEP_LRS[1:]
            for seed in seeds
        ]

    first = [run_spec("reference", seed, MAIN_MODEL, reference_train(6e-4)) for seed in SEEDS]
    first += sweep("", MAIN_MODEL, [0]) + [run_spec("default", seed, MAIN_MODEL, default) for seed in SEEDS]
    first += [run_spec("small-reference", 0, SMALL_MODEL, reference_train(6e-4))] + sweep("small-", SMALL_MODEL, [0])
    first += [run_spec("small-default", 0, SMALL_MODEL, default)]
    first += [
        run_spec(f"default-{label}", seed, MAIN_MODEL, default, steps=round(STEPS * fraction))
        for label, fraction in (("2of3", 2 / 3), ("1of2", 1 / 2))
        for seed in SEEDS
    ]
    results = run_all(args.work, tokens, first, args.jobs)
    # The reference is the sweep's 6e-4 arm.
    for prefix in ("", "small-"):
        for seed in SEEDS:
            if (f"{prefix}reference", seed) in results:
                results[(f"{prefix}adamw-{6e-4:g}", seed)] = results[(f"{prefix}reference", seed)]
    tuned_lr, small_tuned_lr = best_lr(results, ""), best_lr(results, "small-")
    if (f"adamw-{tuned_lr:g}", SEEDS[1]) not in results:
        second = run_spec(f"adamw-{tuned_lr:g}", SEEDS[1], MAIN_MODEL, reference_train(tuned_lr))
        results.update(run_all(args.work, tokens, [second], 1))
    run_seconds = sum(
        history[-1]["seconds"] for (name, _), history in results.items() if not name.endswith(f"adamw-{6e-4:g}")
    )  # the reference, listed twice
    body = report(results, tuned_lr, small_tuned_lr, meta, run_seconds)
    print(body)
    write_section(HEADING, body)
    write_task_scores(results, tuned_lr)


if __name__ == "__main__":
    main()
