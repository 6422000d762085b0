"""GPU training throughput of the ryangpt shape, bf16 + torch.compile, for both recipes.

usage (from the repository root, on a CUDA machine): .venv/bin/python -m benchmarks.gpu_train [--steps 300]

Runs the project's own training loop (`model.training.train`) on random token batches of the
profile's shape (configs/ryangpt.yaml: 6 x 320, untied head, context 512, 32 x 2 sequences a
step) with configs/ryangpt.yaml's AdamW recipe and configs/ryangpt-fast.yaml's Muon recipe, and
reports tokens/s and model FLOPs utilisation over the steps after the first log window (which
holds the compilation). The goal: 2.9M tokens/s on one H100 or H200, the reference's 2.62B tokens
in under 15 minutes. Writes the section "## Training throughput (GPU)" of BENCHMARKS.md.
"""

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

from benchmarks.report import machine_line, write_section
from model.gpt import GPT, GPTConfig
from model.params import parse_params
from model.profiles import profile_text
from model.training import RunPaths, train

REPO = Path(__file__).resolve().parents[1]
COMMAND = ".venv/bin/python -m benchmarks.gpu_train"
REFERENCE_TOKENS = 2_621_440_000


def measure(profile, steps, log_every):
    params = parse_params(yaml.safe_load(profile_text(REPO / "configs" / profile)))
    train_params = params.pretrain.model_copy(
        update=dict(
            steps=steps,
            log_every=log_every,
            eval_every=steps,
            warmup_steps=min(params.pretrain.warmup_steps, steps // 10),
            device="cuda",
        )
    )
    config = GPTConfig(**params.model.model_dump(), vocab_size=params.tokenizer.vocab_size)
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights(train_params.init)
    generator = torch.Generator().manual_seed(0)
    shape = (train_params.batch_size, config.context_length + 1)

    def sample_batch(step, micro):
        windows = torch.randint(0, config.vocab_size, shape, generator=generator)
        return windows[:, :-1], windows[:, 1:]

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        train(
            model,
            train_params,
            sample_batch=sample_batch,
            evaluate=lambda m: {},
            paths=RunPaths(scratch / "checkpoint.safetensors", scratch / "live", scratch / "model"),
            identity={"benchmark": profile},
            unique_tokens=REFERENCE_TOKENS,
            checkpoint_every=steps,
            desc=profile,
        )
        with safe_open(scratch / "checkpoint.safetensors", framework="pt") as f:
            rows = json.loads(f.metadata()["history"])[1:]  # the first window holds compilation
    return (
        statistics.median(row["train/tokens_per_second"] for row in rows),
        statistics.median(row.get("train/mfu", float("nan")) for row in rows),
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--log-every", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_train.py needs a CUDA GPU")
    lines = [
        f"Command: `{COMMAND} --steps {args.steps}`. {machine_line()} GPU: {torch.cuda.get_device_name()}.",
        "",
        "| recipe | tokens/s | MFU | the reference's 2.62B tokens in |",
        "|---|---|---|---|",
    ]
    for profile, label in (("ryangpt.yaml", "reference (AdamW, fused)"), ("ryangpt-fast.yaml", "new (Muon + AdamW)")):
        tokens_per_second, mfu = measure(profile, args.steps, args.log_every)
        minutes = REFERENCE_TOKENS / tokens_per_second / 60
        lines.append(f"| {label} | {tokens_per_second / 1e6:.2f}M | {100 * mfu:.1f}% | {minutes:.1f} min |")
        print(lines[-1], flush=True)
    write_section("## Training throughput (GPU)", "\n".join(lines))


if __name__ == "__main__":
    main()
