"""Greedy agreement: which runtimes and precisions give the same greedy tokens as our server, on the models
`dvc repro` made.

usage (from the repository root, after `dvc repro` and `make llamacpp`):
    .venv/bin/python -m benchmarks.greedy_agreement [--tokens 30]

For each base prompt (a document) and chat message (one user turn) of the evaluate stage, the greedy
continuation of --tokens tokens (or up to the reply's end) from: our engine at `--precision fp32` and at
`int8` (the server's decoding, without HTTP), transformers' `generate` on the export (fp32), and llama.cpp
(llama-cpp-python) on the f16 and q8_0 GGUF files. Each is compared with our fp32 engine, token by token.
Writes the section "## Greedy agreement" of BENCHMARKS.md.
"""

import argparse
from pathlib import Path

import torch
import transformers

from benchmarks.decode import engine_greedy
from benchmarks.report import machine_line, write_section
from model.completions import BASE_PROMPTS, CHAT_PROMPTS
from model.export import load_export
from model.tokenizer import Tokenizer
from serve.engine import Engine

REPO = Path(__file__).resolve().parents[1]
COMMAND = ".venv/bin/python -m benchmarks.greedy_agreement"
PROMPTS = {"base": ["Once upon a time", *BASE_PROMPTS], "chat": ["Hi, how are you?", *CHAT_PROMPTS]}


def until_end(ids, end_ids):
    """`ids` up to and without the first end token."""
    for index, token in enumerate(ids):
        if token in end_ids:
            return ids[:index]
    return ids


def transformers_greedy(hf_model, prompt_ids, tokens):
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt_ids]), max_new_tokens=tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt_ids) :].tolist()


def llama_cpp_greedy(llm, prompt_ids, tokens):
    new = []
    for token in llm.generate(prompt_ids, top_k=1, temp=0.0, reset=True):
        new.append(token)
        if len(new) == tokens or llm.token_eos() == token:
            break
    return new


def runtimes(name):
    """{label: greedy(prompt_ids, tokens)} of each runtime on model `name`, each loaded once; our fp32 first."""
    from llama_cpp import Llama

    folder = REPO / "serve" / "models" / name
    model, _ = load_export(folder)
    tokenizer = Tokenizer(folder / "tokenizer.model")
    engines = {precision: Engine(model, tokenizer, 1, precision) for precision in ("fp32", "int8")}
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    gguf = {
        outtype: Llama(
            model_path=str(REPO / "serve" / "gguf" / f"{name}-{outtype}.gguf"),
            n_ctx=0,
            n_threads=1,
            seed=0,
            verbose=False,
        )
        for outtype in ("f16", "q8_0")
    }
    greedy = {
        "ours, fp32": lambda ids, tokens: engine_greedy(engines["fp32"], ids, tokens),
        "ours, int8": lambda ids, tokens: engine_greedy(engines["int8"], ids, tokens),
        "transformers, fp32": lambda ids, tokens: transformers_greedy(hf_model, ids, tokens),
        **{
            f"llama.cpp, {outtype}": (lambda ids, tokens, llm=llm: llama_cpp_greedy(llm, ids, tokens))
            for outtype, llm in gguf.items()
        },
    }
    return tokenizer, engines, greedy


def first_difference(reference, other):
    """The first step where the two differ: None for the same tokens, the shorter one's length where one is the
    other's beginning."""
    for index, (a, b) in enumerate(zip(reference, other)):
        if a != b:
            return index
    return None if len(reference) == len(other) else min(len(reference), len(other))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=30)
    args = parser.parse_args()
    rows = []
    for name, prompts in PROMPTS.items():
        tokenizer, engines, greedy = runtimes(name)
        end_ids = tokenizer.reply_end_ids if name == "chat" else tokenizer.document_end_ids
        for prompt in prompts:
            prompt_ids = tokenizer.chat_prompt([prompt]) if name == "chat" else tokenizer.document_prompt(prompt)
            runs = {label: until_end(run(prompt_ids, args.tokens), end_ids) for label, run in greedy.items()}
            reference = runs.pop("ours, fp32")
            differences = {label: first_difference(reference, ids) for label, ids in runs.items()}
            rows.append((name, prompt, differences))
            print(name, repr(prompt), differences, flush=True)
        for engine in engines.values():
            engine.close()
    labels = list(rows[0][2])
    lines = [
        f"Command: `{COMMAND} --tokens {args.tokens}` (after `dvc repro` of the sample profile and `make llamacpp`). "
        f"{machine_line()}",
        "",
        f"Greedy continuations of {args.tokens} tokens (or to the reply's end) of the sample profile's models, each "
        "set against our server's engine at `--precision fp32`: `same` where every token is the same, else the "
        "first step that differs (0 is the first new token).",
        "",
        "| model | prompt | " + " | ".join(labels) + " |",
        "|---|---|" + "---|" * len(labels),
    ]
    for name, prompt, differences in rows:
        cells = ["same" if differences[label] is None else f"step {differences[label]}" for label in labels]
        lines.append(f"| {name} | {prompt} | " + " | ".join(cells) + " |")
    totals = [sum(differences[label] is None for _, _, differences in rows) for label in labels]
    lines.append("| all | | " + " | ".join(f"{total} of {len(rows)} same" for total in totals) + " |")
    report = "\n".join(lines)
    print(report)
    write_section("## Greedy agreement", report)


if __name__ == "__main__":
    main()
