"""Decoding speed in process, one stream: our decode path against two references, in the same run.

usage (from the repository root): .venv/bin/python -m benchmarks.decode [--tokens 128] [--threads 1 2]

The ryangpt shape (random weights: speed does not depend on them), batch 1, greedy, --tokens new
tokens after an 8-token prompt, for each torch thread count:
- ours: the server's engine (serve/engine.py) in this process, one request, fp32 and int8;
- plain: a Llama-style loop written the plain way, as a reference should be: the same weights through
  F.linear, a preallocated KV cache per layer, no attention mask on one-token steps;
- Hugging Face `generate` (transformers) on the exported folder, fp32, greedy.
Implementations alternate, three runs each; the table gives the median and the range. Then, to check
the figures against the machine: how fast torch reads memory and reads a weight in a one-row product
(the plain reference's step), and the decode kernel alone at 1, 4, 16 and 64 rows (where it
saturates: the most any number of streams can get), at positions 64 and 480. Writes the section
"## Decoding (in process)" of BENCHMARKS.md.
"""

import argparse
import asyncio
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.report import machine_line, write_section
from benchmarks.serve_load import PROMPT, build_export
from model.export import load_export
from model.generate import Sampling
from serve.engine import Engine
from serve.kernel import RowwiseDecoder, rowwise_cache, rowwise_model

COMMAND = ".venv/bin/python -m benchmarks.decode"
REPEATS = 3
KERNEL_ROWS = (1, 4, 16, 64)
KERNEL_POSITIONS = (64, 480)  # a short reply, and a conversation near the end of the context


@torch.inference_mode()
def plain_greedy(model, prompt_ids, tokens):
    """The reference: greedy decoding with one preallocated (1, H, context, D) cache per layer."""
    config = model.config
    shape = (1, config.n_heads, config.context_length, config.head_dim)
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in model.layers]
    ids = torch.tensor([prompt_ids])
    position, out = 0, []
    for _ in range(tokens):
        length = ids.shape[1]
        cos, sin = model.rope_cos[position : position + length], model.rope_sin[position : position + length]
        x = model.embed(ids)
        for block, (keys, values) in zip(model.layers, caches):
            attn = block.attn
            h = F.rms_norm(x, (config.d_model,), block.attn_norm.weight, config.norm_eps)
            q, k, v = (
                F.linear(h, proj.weight).view(1, length, config.n_heads, config.head_dim).transpose(1, 2)
                for proj in (attn.q_proj, attn.k_proj, attn.v_proj)
            )
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            keys[:, :, position : position + length] = k
            values[:, :, position : position + length] = v
            end = position + length
            y = F.scaled_dot_product_attention(q, keys[:, :, :end], values[:, :, :end], is_causal=length > 1)
            x = x + F.linear(y.transpose(1, 2).reshape(1, length, config.d_model), attn.o_proj.weight)
            h = F.rms_norm(x, (config.d_model,), block.mlp_norm.weight, config.norm_eps)
            mlp = block.mlp
            x = x + F.linear(
                F.silu(F.linear(h, mlp.gate_proj.weight)) * F.linear(h, mlp.up_proj.weight), mlp.down_proj.weight
            )
        x = F.rms_norm(x[:, -1:], (config.d_model,), model.norm.weight, config.norm_eps)
        next_id = F.linear(x, model.lm_head.weight).argmax(dim=-1)
        out.append(int(next_id))
        position += length
        ids = next_id
    return out


def engine_greedy(engine, prompt_ids, tokens):
    """One greedy request through the engine, as the server sends it; returns its token ids."""

    async def run():
        generation = engine.submit(prompt_ids, Sampling(tokens, temperature=0.0))
        while (await generation.transport.receive()).finish_reason is None:
            pass
        return generation.new_ids

    return asyncio.run(run())


def kernel_steps(model, precision, rows, position, threads, steps=30):
    """Tokens/s of the decode kernel alone (no sampling, no engine) stepping `rows` sequences together at
    `position`: the ceiling of what the engine and the server can do with that many streams."""
    decoder = RowwiseDecoder(model, rowwise_cache(model.config, rows, model.config.context_length, precision), threads)
    tokens, cache_rows, positions = [5] * rows, list(range(rows)), [position] * rows
    for _ in range(3):
        decoder(tokens, cache_rows, positions)
    start = time.perf_counter()
    for _ in range(steps):
        decoder(tokens, cache_rows, positions)
    return rows * steps / (time.perf_counter() - start)


def rotate(x, cos, sin):
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


def read_bandwidth():
    """GB/s at which torch reads memory on this machine, best of five sums of a 200 MB tensor."""
    data = torch.ones(50_000_000)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best / 1e9


def one_row_product_bandwidth(weight):
    """GB/s at which F.linear reads `weight` multiplying one row, best of 20 (the weight is larger than the caches)."""
    row = torch.randn(1, weight.shape[1])
    best = float("inf")
    for _ in range(20):
        start = time.perf_counter()
        F.linear(row, weight)
        best = min(best, time.perf_counter() - start)
    return weight.numel() * 4 / best / 1e9


def timed(run, tokens):
    start = time.perf_counter()
    out = run()
    elapsed = time.perf_counter() - start
    assert len(out) == tokens, f"generated {len(out)} tokens, not {tokens}"
    return tokens / elapsed, out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        folder, tokenizer = build_export(Path(tmp))
        model, _ = load_export(folder)
        hf = AutoModelForCausalLM.from_pretrained(folder).eval()
        prompt = tokenizer.document_prompt(PROMPT)
        weight_bytes = 4 * sum(p.numel() for name, p in model.named_parameters() if name != "embed.weight")
        engines = {}
        runs = {
            "ours, fp32": lambda: engine_greedy(engines["fp32"], prompt, args.tokens),
            "ours, int8": lambda: engine_greedy(engines["int8"], prompt, args.tokens),
            "plain reference, fp32": lambda: plain_greedy(model, prompt, args.tokens),
            "Hugging Face generate, fp32": lambda: hf.generate(
                torch.tensor([prompt]),
                max_new_tokens=args.tokens,
                min_new_tokens=args.tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )[0, len(prompt) :].tolist(),
        }
        speeds, texts, bandwidth, product, kernel = {}, {}, {}, {}, {}
        for threads in args.threads:
            torch.set_num_threads(threads)  # the plain references' (torch's own operations)
            for engine in engines.values():
                engine.close()
            engines.update(
                {precision: Engine(model, tokenizer, 1, precision, threads) for precision in ("fp32", "int8")}
            )
            bandwidth[threads] = read_bandwidth()
            product[threads] = one_row_product_bandwidth(model.lm_head.weight.detach())
            with torch.inference_mode():
                for run in runs.values():
                    run()  # warm-up
                for _ in range(REPEATS):
                    for name, run in runs.items():
                        speed, texts[name] = timed(run, args.tokens)
                        speeds.setdefault((threads, name), []).append(speed)
                for precision in ("fp32", "int8"):
                    rowwise = rowwise_model(model, precision, threads)
                    for rows in KERNEL_ROWS:
                        for position in KERNEL_POSITIONS:
                            kernel[(threads, precision, position, rows)] = max(
                                kernel_steps(rowwise, precision, rows, position, threads) for _ in range(REPEATS)
                            )
    agree = texts["ours, fp32"] == texts["plain reference, fp32"] == texts["Hugging Face generate, fp32"]
    lines = [
        f"Command: `{COMMAND} --tokens {args.tokens} --threads {' '.join(map(str, args.threads))}`. {machine_line()} "
        f"Nothing else ran.",
        "",
        f"The ryangpt shape (20.1M parameters, random weights), one stream, greedy, {args.tokens} new tokens after an "
        f"{len(prompt)}-token prompt, in process. Median (min to max) of {REPEATS} runs, implementations alternating. "
        f"The three fp32 implementations {'gave the same tokens' if agree else 'did NOT give the same tokens'}.",
        "",
        "| torch threads | implementation | tokens/s | vs plain reference | vs `generate` |",
        "|---:|---|---:|---:|---:|",
    ]
    for threads in args.threads:
        plain = statistics.median(speeds[(threads, "plain reference, fp32")])
        hf_speed = statistics.median(speeds[(threads, "Hugging Face generate, fp32")])
        for name in runs:
            values = speeds[(threads, name)]
            median = statistics.median(values)
            lines.append(
                f"| {threads} | {name} | {median:.0f} ({min(values):.0f} to {max(values):.0f}) | "
                f"{median / plain:.2f}x | {median / hf_speed:.2f}x |"
            )
    ratios = [
        statistics.median(speeds[(threads, "Hugging Face generate, fp32")])
        / statistics.median(speeds[(threads, "plain reference, fp32")])
        for threads in args.threads
    ]
    lines += [
        "",
        f"Sanity check of the references: `generate` runs at {min(ratios):.2f} to {max(ratios):.2f} of the "
        f"plain loop's speed, as expected of its per-step overhead (its logits processors and cache "
        f"objects). The absolute figures follow this machine's memory bandwidth: "
        + ", ".join(f"{bandwidth[threads]:.0f} GB/s with {threads} thread(s)" for threads in args.threads)
        + " (summing a 200 MB tensor); a token reads the fp32 weights but the embedding's, "
        f"{weight_bytes / 1e6:.0f} MB, and torch's own one-row product (F.linear, the plain loop's step, "
        f"on the 16000 x 320 head) reads them at "
        + ", ".join(f"{product[threads]:.1f} GB/s with {threads} thread(s)" for threads in args.threads)
        + ": the plain loop's speed follows from it and its per-step overhead.",
    ]
    lines += [
        "",
        "The decode kernel alone (`RowwiseDecoder`: one call per step, no sampling, no engine), several "
        "sequences decoded together at one position, best of 3 runs of 30 steps: the ceiling for that many "
        "streams (int8 keeps the KV cache in 16-bit floats, fp32 in 32-bit).",
        "",
        "| torch threads | precision | position | "
        + " | ".join(f"{rows} rows (tokens/s)" for rows in KERNEL_ROWS)
        + " | 16 rows / 1 row | 64 rows / 1 row |",
        "|---:|---|---:|" + "---:|" * (len(KERNEL_ROWS) + 2),
    ]
    for threads, precision, position in itertools.product(args.threads, ("fp32", "int8"), KERNEL_POSITIONS):
        figures = {rows: kernel[(threads, precision, position, rows)] for rows in KERNEL_ROWS}
        lines.append(
            f"| {threads} | {precision} | {position} | "
            + " | ".join(f"{value:.0f}" for value in figures.values())
            + f" | {figures[16] / figures[1]:.1f}x | {figures[64] / figures[1]:.1f}x |"
        )
    report = "\n".join(lines)
    print(report)
    write_section("## Decoding (in process)", report)


if __name__ == "__main__":
    main()
