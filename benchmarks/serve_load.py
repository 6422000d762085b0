"""Serving benchmark: the HTTP server under 1, 4, 16 and 64 concurrent streaming clients.

usage (from the repository root): .venv/bin/python -m benchmarks.serve_load [--tokens 128] [--threads 1 2]

Builds a model of the ryangpt shape (random weights: speed does not depend on them) with a 16k
tokenizer trained on ../shared/corpus, exports it like the pipeline does, starts `python -m serve`
(its default settings) on a loopback port for each precision, and runs the clients (every request
generates exactly --tokens tokens: min_tokens = max_tokens). Then 15 streams decode while a 16th
request brings a prompt that fills the context: the gaps between the 15 streams' chunks show what
one long prefill costs the others. In the same run, the reference: Hugging Face `generate` on the
same exported folder, in this process, before the servers start and after they stop. Writes the
section "## Serving (load)" of BENCHMARKS.md.
"""

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]

from benchmarks.report import machine_line, percentile, running_server, write_section  # noqa: E402
from model.corpus import clean_c4, clean_wikipedia, extract_documents  # noqa: E402
from model.export import export_model  # noqa: E402
from model.gpt import GPT, GPTConfig  # noqa: E402
from model.params import parse_params  # noqa: E402
from model.sources import stream_records  # noqa: E402
from model.tokenizer import Tokenizer, bpe_lines, train_bpe  # noqa: E402

CORPUS = REPO.parent / "shared" / "corpus"
CLIENT_COUNTS = (1, 4, 16, 64)
REQUESTS_PER_CLIENT = 2
PROMPT = "The history of the city began when"
COMMAND = ".venv/bin/python -m benchmarks.serve_load"


def build_export(folder):
    """A ryangpt-shaped model (configs/ryangpt.yaml) exported to folder/base; returns the folder."""
    params = parse_params(yaml.safe_load((REPO / "configs" / "ryangpt.yaml").read_text()))
    texts = []
    for source, options, clean in (
        ("wikipedia", {"data_dir": "20231101.en"}, clean_wikipedia),
        ("c4", {"data_files": "en/c4-train.*.json.gz"}, clean_c4),
    ):
        records, _ = stream_records(str(CORPUS / source), source, **options)
        texts += [doc["text"] for doc in extract_documents(records, clean, 10**9, 200, Counter())]
    tokenizer_path = folder / "tokenizer.model"
    tokenizer_path.write_bytes(train_bpe(bpe_lines(texts), params.tokenizer.vocab_size, seed=0))
    torch.manual_seed(0)
    model = GPT(GPTConfig(**params.model.model_dump(), vocab_size=params.tokenizer.vocab_size))
    export_model(model, tokenizer_path, folder / "models" / "base", "base", False, {}, {"temperature": 0.8})
    return folder / "models" / "base", Tokenizer(tokenizer_path)


def streamed_body(tokens, seed):
    """A streamed completion of exactly `tokens` new tokens."""
    return {
        "model": "base",
        "prompt": PROMPT,
        "max_tokens": tokens,
        "min_tokens": tokens,
        "temperature": 0.8,
        "seed": seed,
        "stream": True,
    }


async def one_request(client, url, tokens, seed):
    body = streamed_body(tokens, seed)
    start = time.perf_counter()
    first = None
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data:") and first is None:
                first = time.perf_counter() - start
    return first, time.perf_counter() - start


async def load_round(url, clients, tokens):
    async with httpx.AsyncClient(timeout=600) as client:

        async def client_loop(index):
            return [await one_request(client, url, tokens, index * 100 + i) for i in range(REQUESTS_PER_CLIENT)]

        start = time.perf_counter()
        results = await asyncio.gather(*(client_loop(i) for i in range(clients)))
        wall = time.perf_counter() - start
    samples = [sample for per_client in results for sample in per_client]
    latencies = sorted(latency for _, latency in samples)
    first_tokens = sorted(first for first, _ in samples)
    return {
        "clients": clients,
        "p50": statistics.median(latencies),
        "p99": percentile(latencies, 0.99),
        "ttft": statistics.median(first_tokens),
        "tokens_per_s": len(samples) * tokens / wall,
    }


async def prefill_gaps(url, long_prompt, streams=15, tokens=300):
    """(median gap between chunks of `streams` decoding streams, p99 gap while a context-length prompt is
    prefilled beside them, that request's time to its first token)."""
    arrivals = [[] for _ in range(streams)]
    started = asyncio.Event()

    async def stream(client, index):
        body = streamed_body(tokens, index)
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    arrivals[index].append(time.perf_counter())
                    if all(len(times) > 5 for times in arrivals):
                        started.set()

    async with httpx.AsyncClient(timeout=600) as client:
        decoding = asyncio.gather(*(stream(client, i) for i in range(streams)))
        await started.wait()
        await asyncio.sleep(0.5)
        sent = time.perf_counter()
        reply = await client.post(
            url + "/v1/completions", json={"model": "base", "prompt": long_prompt, "max_tokens": 1, "temperature": 0}
        )
        reply.raise_for_status()
        answered = time.perf_counter()
        await decoding
    gaps = [(later, later - earlier) for times in arrivals for earlier, later in zip(times, times[1:])]
    during = [gap for at, gap in gaps if sent <= at <= answered + 0.05]
    before = [gap for at, gap in gaps if at < sent]
    return statistics.median(before), percentile(during, 0.99), answered - sent


def serve_and_measure(models_dir, precision, threads, tokens, long_prompt):
    options = ("--max-batch", str(max(CLIENT_COUNTS)), "--precision", precision, "--threads", str(threads))
    with running_server(models_dir, *options) as (url, _):
        asyncio.run(load_round(url, 1, 8))  # warm-up
        rounds = [asyncio.run(load_round(url, clients, tokens)) for clients in CLIENT_COUNTS]
        return rounds, asyncio.run(prefill_gaps(url, long_prompt))


def hf_generate(folder, tokenizer, tokens):
    """Reference: transformers' generate on the same export, one stream, greedy, fp32, torch's default threads."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompt = torch.tensor([tokenizer.document_prompt(PROMPT)])
    speeds = []
    with torch.inference_mode():
        model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        for _ in range(3):
            start = time.perf_counter()
            model.generate(
                prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, eos_token_id=None, pad_token_id=0
            )
            speeds.append(tokens / (time.perf_counter() - start))
    return statistics.median(speeds)


def context_filling_prompt(tokenizer, context_length):
    """Corpus text cut to context_length - 1 tokens (one token of room for the reply)."""
    records, _ = stream_records(str(CORPUS / "wikipedia"), "wikipedia", data_dir="20231101.en")
    text = ""
    for record in records:
        text += record["text"] + " "
        if len(tokenizer.document_prompt(text)) >= context_length:
            break
    ids = tokenizer.document_prompt(text)[1 : context_length - 1]
    return tokenizer.decode(ids)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128, help="tokens generated per request")
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1, 2], help="the server's --threads (its default is 1)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder, tokenizer = build_export(Path(tmp))
        long_prompt = context_filling_prompt(tokenizer, 512)
        load_before = os.getloadavg()[0]
        reference_before = hf_generate(folder, tokenizer, args.tokens)
        measured = {
            (precision, threads): serve_and_measure(folder.parent, precision, threads, args.tokens, long_prompt)
            for threads in args.threads
            for precision in ("int8", "fp32")
        }
        reference = hf_generate(folder, tokenizer, args.tokens)
        load_after = os.getloadavg()[0]
    rounds = {key: results for key, (results, _) in measured.items()}
    lines = [
        f"Command: `{COMMAND} --tokens {args.tokens} --threads {' '.join(map(str, args.threads))}`. {machine_line()} "
        f"Load average (1 min) before / after: "
        f"{load_before:.2f} / {load_after:.2f}.",
        "",
        f"Model: the ryangpt shape (6 x 320, 5 heads, d_ff 1280, vocab 16,000, untied head: 20.1M parameters), "
        f"random weights, exported to the Hugging Face folder the server hosts. Each client streams "
        f"{REQUESTS_PER_CLIENT} requests one after the other, each exactly {args.tokens} new tokens "
        f"(`min_tokens` = `max_tokens`), temperature 0.8; `--max-batch {max(CLIENT_COUNTS)}`.",
        "",
        "| server `--threads` | precision | clients | tokens/s (all clients) | per stream | p50 latency (s) | "
        "p99 latency (s) | time to first token (s) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (precision, threads), results in rounds.items():
        for row in results:
            lines.append(
                f"| {threads} | {precision} | {row['clients']} | {row['tokens_per_s']:.0f} | "
                f"{row['tokens_per_s'] / row['clients']:.0f} | {row['p50']:.2f} | {row['p99']:.2f} | "
                f"{row['ttft']:.3f} |"
            )
    single = {key: results[0]["tokens_per_s"] for key, results in rounds.items()}
    at16 = {key: next(r for r in results if r["clients"] == 16)["tokens_per_s"] for key, results in rounds.items()}
    lines += [
        "",
        f"Reference in the same run: Hugging Face `generate` (transformers, fp32, greedy, one stream, in this "
        f"process, median of 3) on the same folder: **{reference_before:.0f} tokens/s** before the servers ran, "
        f"{reference:.0f} after.",
        "",
        "A long prompt beside 15 decoding streams (prompts are prefilled 32 tokens per step between decode steps):",
        "",
        "| server `--threads` | precision | median gap between chunks before (s) | p99 gap during the 511-token "
        "prefill (s) | that request's reply time (s) |",
        "|---:|---|---:|---:|---:|",
    ]
    for (precision, threads), (_, (before, during, reply)) in measured.items():
        lines.append(f"| {threads} | {precision} | {before:.3f} | {during:.3f} | {reply:.2f} |")
    lines.append("")
    for threads in args.threads:
        int8, fp32 = ("int8", threads), ("fp32", threads)
        lines.append(
            f"Goals, server `--threads {threads}`: the default precision (int8) over HTTP with streaming at "
            f"least 2x `generate`: {single[int8] / reference_before:.2f}x (fp32 "
            f"{single[fp32] / reference_before:.2f}x); 16 streams at least 5x one stream: int8 "
            f"{at16[int8] / single[int8]:.1f}x, fp32 {at16[fp32] / single[fp32]:.1f}x."
        )
    report = "\n".join(lines)
    print(report)
    write_section("## Serving (load)", report)


if __name__ == "__main__":
    main()
