"""Training throughput of the ryangpt model shape: our model against a straightforward reference.

usage (from the repository root): .venv/bin/python -m benchmarks.train_throughput [--batch 4] [--steps 6]

Both models have the same shape (configs/ryangpt.yaml: 6 x 320, 5 heads, d_ff 1280, vocab 16,000,
untied head, context 512) and train with the same AdamW step on the same random batches, in fp32
on this CPU. The reference is written the way a hobby project writes it: attention as explicit
matrix products with a materialised causal mask and softmax, RMSNorm by hand, and complex-number
rotary embeddings. Writes the section "## Training throughput (CPU)" of BENCHMARKS.md.
"""

import argparse
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

REPO = Path(__file__).resolve().parents[1]

from benchmarks.report import machine_line, write_section  # noqa: E402
from model.gpt import GPT, GPTConfig  # noqa: E402
from model.params import parse_params  # noqa: E402

COMMAND = ".venv/bin/python -m benchmarks.train_throughput"
REPEATS = 3


class ReferenceRMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class ReferenceBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.attn_norm = ReferenceRMSNorm(config.d_model, config.norm_eps)
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(config.d_model, config.d_model, bias=False) for _ in range(4))
        self.mlp_norm = ReferenceRMSNorm(config.d_model, config.norm_eps)
        self.w1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.w3 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.w2 = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x, freqs):
        batch, length, _ = x.shape
        heads, head_dim = self.config.n_heads, self.config.head_dim
        h = self.attn_norm(x)
        q, k, v = (w(h).view(batch, length, heads, head_dim) for w in (self.wq, self.wk, self.wv))
        q = torch.view_as_real(torch.view_as_complex(q.reshape(batch, length, heads, -1, 2)) * freqs).flatten(3)
        k = torch.view_as_real(torch.view_as_complex(k.reshape(batch, length, heads, -1, 2)) * freqs).flatten(3)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim)
        mask = torch.triu(torch.full((length, length), float("-inf")), diagonal=1)
        attention = F.softmax(scores + mask, dim=-1) @ v
        x = x + self.wo(attention.transpose(1, 2).reshape(batch, length, -1))
        h = self.mlp_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class ReferenceGPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(ReferenceBlock(config) for _ in range(config.n_layers))
        self.norm = ReferenceRMSNorm(config.d_model, config.norm_eps)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, config.head_dim, 2).float() / config.head_dim)
        angles = torch.outer(torch.arange(config.context_length).float(), inv_freq)
        self.register_buffer("freqs", torch.polar(torch.ones_like(angles), angles)[:, None, :])

    def forward(self, tokens, targets):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, self.freqs[: tokens.shape[1]])
        logits = self.head(self.norm(x))
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def tokens_per_second(model, config, batch, steps):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    data = torch.randint(0, config.vocab_size, (steps + 1, batch, config.context_length + 1), generator=generator)

    def step(window):
        _, loss = model(window[:, :-1], window[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(data[0])  # warm-up: allocations, optimizer state
    start = time.perf_counter()
    for window in data[1:]:
        step(window)
    return steps * batch * config.context_length / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4, help="sequences of 512 tokens per step")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per measurement")
    args = parser.parse_args()
    params = parse_params(yaml.safe_load((REPO / "configs" / "ryangpt.yaml").read_text()))
    config = GPTConfig(**params.model.model_dump(), vocab_size=params.tokenizer.vocab_size)
    results = {"ours (model/gpt.py)": [], "reference": []}
    for _ in range(REPEATS):  # interleaved, so both see the same machine load
        torch.manual_seed(0)
        results["ours (model/gpt.py)"].append(tokens_per_second(GPT(config), config, args.batch, args.steps))
        torch.manual_seed(0)
        results["reference"].append(tokens_per_second(ReferenceGPT(config), config, args.batch, args.steps))
    medians = {name: statistics.median(values) for name, values in results.items()}
    ours, reference = medians.values()
    schedule_tokens = (
        params.pretrain.steps * params.pretrain.batch_size * params.pretrain.grad_accum * config.context_length
    )
    lines = [
        f"Command: `{COMMAND} --batch {args.batch} --steps {args.steps}`. {machine_line()} "
        f"{torch.get_num_threads()} torch threads, fp32.",
        "",
        f"Model: the ryangpt shape, {GPT(config).num_parameters() / 1e6:.1f}M parameters; one step = forward, "
        f"backward and AdamW on {args.batch} x {config.context_length} tokens. Medians of {REPEATS} interleaved "
        f"measurements of {args.steps} steps.",
        "",
        "| implementation | tokens/s | runs |",
        "|---|---:|---|",
    ]
    lines += [
        f"| {name} | {medians[name]:.0f} | {', '.join(f'{v:.0f}' for v in values)} |"
        for name, values in results.items()
    ]
    lines += [
        "",
        f"Speed-up over the reference: **{ours / reference:.2f}x**. At {ours:.0f} tokens/s the ryangpt schedule "
        f"({schedule_tokens / 1e9:.2f}B tokens) would take {schedule_tokens / ours / 86400:.0f} days on this CPU: "
        f"it is a GPU job (section GPU); the sample profile is what CPUs run.",
    ]
    report = "\n".join(lines)
    print(report)
    write_section("## Training throughput (CPU)", report)


if __name__ == "__main__":
    main()
