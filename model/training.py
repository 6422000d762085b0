"""The training loop shared by pretraining and finetuning.

Muon on the hidden matrices with AdamW on the rest, or AdamW on everything; a warmup-stable-decay
or a cosine schedule; gradient accumulation and clipping; bf16 autocast, torch.compile and fused
AdamW on CUDA; DistributedDataParallel under torchrun (gloo on CPU).
Data order is a pure function of (seed, step, micro-batch), so a run resumed from a checkpoint
sees exactly the batches an uninterrupted run would, and on CPU ends bit-identical to it.
"""

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from dvclive import Live
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from model.errors import PipelineError
from model.files import atomic_output
from model.gpt import IGNORE_INDEX, save_model

# Dense bf16 peak of the GPUs we know, for model FLOPs utilisation.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "RTX 3060": 51e12}
# Figures of a logged window that measure the machine, not the training (see _log_row).
WALL_CLOCK_FIGURES = ("train/tokens_per_second", "train/mfu")


class TrainingError(PipelineError, RuntimeError):
    """Training cannot start or go on; the message says why and what to change."""


# --- schedule, runtime, checkpoints --------------------------------------------------------------


def lr_multiplier(step, params):
    """The schedule's factor on every parameter group's peak learning rate at `step` (0-based).

    Both schedules warm up linearly over warmup_steps and end at min_lr / lr. cosine decays from
    the end of warmup; wsd holds the peak, then decays linearly over the last decay_fraction of
    the steps (a long stable phase is what lets the short final decay reach a lower loss).
    """
    floor = params.min_lr / params.lr
    if step < params.warmup_steps:
        return (step + 1) / params.warmup_steps
    if params.schedule == "cosine":
        progress = (step - params.warmup_steps) / max(1, params.steps - params.warmup_steps)
        return floor + 0.5 * (1 + math.cos(math.pi * progress)) * (1 - floor)
    decay_steps = max(1, round(params.decay_fraction * params.steps))
    progress = max(0, step - (params.steps - decay_steps)) / decay_steps
    return 1 - progress * (1 - floor)


def learning_rate(step, params):
    """The learning rate of the AdamW groups that use params.lr."""
    return params.lr * lr_multiplier(step, params)


def build_optimizers(model, params, fused=False, cpu=True):
    """{name: optimizer}, each param group with its own peak learning rate ('peak_lr').

    adamw: AdamW on everything, decay on matrices only (the earlier recipe and the reference's).
    muon: torch.optim.Muon on the hidden matrices; AdamW on the embedding (embed_lr, or lr when
    the head is tied to it), the untied head and the norm gains (lr). Muon orthogonalises each
    2-D update, which suits the hidden matrices only: embeddings are lookups, not linear maps.
    """
    betas = (params.beta1, params.beta2)
    groups = model.parameter_groups()
    if params.optimizer == "adamw":
        matrices = [p for p in model.parameters() if p.dim() == 2]
        adamw_groups = [
            {"params": matrices, "peak_lr": params.lr, "weight_decay": params.weight_decay},
            {"params": groups["gains"], "peak_lr": params.lr, "weight_decay": 0.0},
        ]
        return {"adamw": torch.optim.AdamW(adamw_groups, lr=params.lr, betas=betas, fused=fused)}
    tied = model.config.tie_embeddings
    adamw_groups = [
        {
            "params": groups["embedding"],
            "peak_lr": params.lr if tied else params.embed_lr,
            "weight_decay": params.weight_decay,
        },
        {"params": groups["head"], "peak_lr": params.lr, "weight_decay": params.weight_decay},
        {"params": groups["gains"], "peak_lr": params.lr, "weight_decay": 0.0},
    ]
    adamw_groups = [group for group in adamw_groups if group["params"]]
    for group in adamw_groups:
        group["lr"] = group["peak_lr"]
    muon_group = {"params": groups["matrices"], "peak_lr": params.matrix_lr}
    if any(p.dim() != 2 for p in muon_group["params"]):
        raise TrainingError("Muon takes 2-D matrices only")
    muon = CPUMuon if cpu else torch.optim.Muon
    return {
        "muon": muon([muon_group], lr=params.matrix_lr, weight_decay=params.weight_decay),
        "adamw": torch.optim.AdamW(adamw_groups, betas=betas, fused=fused),
    }


def _newton_schulz_fp32(grad, ns_coefficients, ns_steps, eps):
    """torch.optim.Muon's orthogonalisation, the same quintic iteration and coefficients, in fp32.

    torch runs it in bf16, which GPUs multiply natively; most CPUs emulate bf16 matrix products,
    10 to 50 times slower than fp32 (24 s instead of 0.8 s a step for a 10M-parameter model on an
    AVX2 CPU), and fp32 is the more exact of the two.
    """
    a, b, c = ns_coefficients
    tall = grad.size(0) > grad.size(1)
    x = grad.float().T if tall else grad.float()
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class CPUMuon(torch.optim.Muon):
    """torch.optim.Muon (same update, state and checkpoints) with its Newton-Schulz step in fp32."""

    @torch.no_grad()
    def step(self, closure=None):
        bf16_newton_schulz = torch.optim._muon._zeropower_via_newtonschulz
        torch.optim._muon._zeropower_via_newtonschulz = _newton_schulz_fp32
        try:
            return super().step(closure)
        finally:
            torch.optim._muon._zeropower_via_newtonschulz = bf16_newton_schulz


def set_learning_rates(optimizers, multiplier):
    for optimizer in optimizers.values():
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * multiplier


@dataclass
class Runtime:
    device: torch.device
    rank: int
    world_size: int
    compile: bool = False  # torch.compile the model
    bf16: bool = False  # bf16 autocast
    fused: bool = False  # fused AdamW kernel

    @property
    def is_main(self):
        return self.rank == 0


def start_runtime(params):
    """Picks the device and, under torchrun, joins the process group (NCCL on GPUs, gloo on CPU).

    compile, bf16 and the fused optimizer are for CUDA: on a CPU they cost more than they save.
    """
    use_cuda = params.device == "cuda" or (params.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise TrainingError("device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Runtime(
        device, rank, world_size, compile=use_cuda and params.compile, bf16=use_cuda and params.bf16, fused=use_cuda
    )


def save_checkpoint(path, model, optimizers, step, identity, history, complete):
    """Weights, every optimizer's state (AdamW moments, Muon momentum) and progress in one
    safetensors file, replaced atomically."""
    tensors = {f"model.{name}": t for name, t in model.weights().items()}
    for optimizer_name, optimizer in optimizers.items():
        for index, state in optimizer.state_dict()["state"].items():
            tensors.update({f"optimizer.{optimizer_name}.{index}.{name}": t for name, t in state.items()})
    metadata = {
        "step": str(step),
        "complete": str(int(complete)),
        "identity": json.dumps(identity, sort_keys=True),
        "history": json.dumps(history, sort_keys=True),
    }
    with atomic_output(path) as tmp:
        save_file({name: t.detach().contiguous().cpu() for name, t in tensors.items()}, tmp, metadata=metadata)


def _read_metadata(path):
    with safe_open(path, framework="pt") as f:
        return f.metadata()


def _first_difference(saved, current, prefix=""):
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = _first_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key}", a, b
    return None


def resume_state(path, identity, model, optimizers):
    """(first step, logged history) from an unfinished checkpoint at `path`, or (0, []) to start fresh.

    A finished checkpoint belongs to an earlier completed run and is ignored; an unfinished one
    from different params is an error, since silently restarting would discard hours of work.
    """
    path = Path(path)
    if not path.exists():
        return 0, []
    metadata = _read_metadata(path)
    if metadata["complete"] == "1":
        return 0, []
    difference = _first_difference(json.loads(metadata["identity"]), identity)
    if difference:
        key, saved, current = difference
        raise TrainingError(
            f"{path} is an unfinished run with {key} = {saved!r}, but params now say {current!r}. "
            f"Restore the param to resume, or delete {path} to start over."
        )
    tensors = load_file(path)
    model.load_weights({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
    states = {name: {} for name in optimizers}
    for name, tensor in tensors.items():
        if name.startswith("optimizer."):
            _, optimizer_name, index, key = name.split(".", 3)
            states[optimizer_name].setdefault(int(index), {})[key] = tensor
    for optimizer_name, optimizer in optimizers.items():
        saved = optimizer.state_dict()
        saved["state"] = states[optimizer_name]
        optimizer.load_state_dict(saved)
    return int(metadata["step"]), json.loads(metadata["history"])


def model_flops_per_token(config):
    """Training FLOPs per token: 6 per parameter plus attention's score and value products."""
    n_params = config.n_layers * (4 * config.d_model**2 + 3 * config.d_model * config.d_ff)
    n_params += config.vocab_size * config.d_model
    return 6 * n_params + 12 * config.n_layers * config.d_model * config.context_length


def _peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for gpu, flops in PEAK_BF16_FLOPS.items() if gpu in name), None)


# --- the loop ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunPaths:
    checkpoint: Path  # resume state (safetensors), kept until a run with other params starts
    live: Path  # dvclive metrics and plots
    model: Path  # the trained model folder


def train(
    model, params, *, sample_batch, evaluate, paths, identity, unique_tokens, checkpoint_every, desc, runtime=None
):
    """Trains `model` per TrainParams `params`, saves it to `paths.model`; returns the final evaluation metrics.

    sample_batch(step, micro) -> (inputs, targets) of the whole micro-batch (all processes);
    evaluate(model) -> {metric name: value}, run on the main process; unique_tokens: the size of
    the training data, for train/epochs; checkpoint_every: the steps between two checkpoints (and the
    last step has one). `runtime` defaults to what params.device picks.
    """
    runtime = runtime or start_runtime(params)
    if params.batch_size % runtime.world_size:
        raise TrainingError(f"batch_size {params.batch_size} must be divisible by the {runtime.world_size} processes")
    model.to(runtime.device)
    optimizers = build_optimizers(model, params, fused=runtime.fused, cpu=runtime.device.type == "cpu")
    start_step, history = resume_state(paths.checkpoint, identity, model, optimizers)
    if start_step and runtime.is_main:
        print(f"{desc}: resuming from step {start_step} ({paths.checkpoint})", flush=True)
    network = DistributedDataParallel(model) if runtime.world_size > 1 else model
    if runtime.compile:
        network = torch.compile(network)
    autocast = torch.autocast(runtime.device.type, dtype=torch.bfloat16) if runtime.bf16 else nullcontext()
    rows_per_process = params.batch_size // runtime.world_size
    own_rows = slice(runtime.rank * rows_per_process, (runtime.rank + 1) * rows_per_process)
    peak_flops = _peak_flops(runtime.device)
    flops_per_token = model_flops_per_token(model.config)

    live = _open_live(paths.live, history) if runtime.is_main else None
    # A bar for a person at a terminal; in a log (CI, `dvc repro > log`) a bar writes a line per update, so
    # there a line per logged window is printed instead.
    interactive = sys.stderr.isatty()
    progress = tqdm(total=params.steps, initial=start_step, desc=desc, disable=not (runtime.is_main and interactive))
    tokens_seen = history[-1]["train/tokens"] if history else 0
    window_loss, window_tokens, window_steps = torch.zeros((), device=runtime.device), 0, 0
    # The first step whose gradient was not finite, or -1. Kept on the device and read only when
    # logging or checkpointing, so the step itself never waits for the device.
    first_bad_step = torch.full((), -1, dtype=torch.long, device=runtime.device)
    window_start = time.perf_counter()
    metrics = {}
    for step in range(start_step, params.steps):
        multiplier = lr_multiplier(step, params)
        set_learning_rates(optimizers, multiplier)
        for micro in range(params.grad_accum):
            inputs, targets = sample_batch(step, micro)
            n_targets = max(1, int((targets != IGNORE_INDEX).sum()))  # a CPU tensor: no device sync
            inputs, targets = inputs[own_rows].to(runtime.device), targets[own_rows].to(runtime.device)
            # Weight each process's mean by its share of target tokens, so the all-reduced gradient
            # is the mean over the whole micro-batch even when masks leave uneven counts.
            share = (targets != IGNORE_INDEX).sum() / n_targets
            last_micro = micro == params.grad_accum - 1
            sync = network.no_sync() if runtime.world_size > 1 and not last_micro else nullcontext()
            with sync, autocast:
                _, loss = network(inputs, targets)
                scaled = loss * share * runtime.world_size / params.grad_accum
            scaled.backward()
            window_loss += (loss * share).detach() / params.grad_accum
            window_tokens += inputs.numel() * runtime.world_size
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), params.grad_clip)
        first_bad_step.masked_fill_((first_bad_step < 0) & ~torch.isfinite(grad_norm), step)
        for optimizer in optimizers.values():
            optimizer.step()
        model.zero_grad(set_to_none=True)
        done, window_steps = step + 1, window_steps + 1
        progress.update(1)

        final = done == params.steps
        evaluating = done % params.eval_every == 0 or final
        checkpointing = done % checkpoint_every == 0 or final
        if done % params.log_every == 0 or evaluating or checkpointing:
            bad = int(first_bad_step)
            if bad >= 0:
                raise TrainingError(
                    f"{desc}: non-finite loss or gradient at step {bad}; the last good checkpoint "
                    f"is kept at {paths.checkpoint}. Lower the learning rate or check the data."
                )
            tokens_seen += window_tokens
            row = _log_window(
                runtime, done, window_loss, window_steps, window_tokens, window_start, peak_flops, flops_per_token
            )
            row.update(
                {
                    "train/lr": learning_rate(step, params),
                    "train/tokens": tokens_seen,
                    "train/epochs": tokens_seen / unique_tokens,
                }
            )
            if runtime.is_main:
                if evaluating:
                    metrics = evaluate(model)
                    row.update(metrics)
                history.append(row)
                _log_row(live, row)
                progress.set_postfix(loss=f"{row['train/loss']:.3f}", tok_s=f"{row['train/tokens_per_second']:.0f}")
                if not interactive:
                    print(
                        f"{desc}: step {done}/{params.steps}, loss {row['train/loss']:.3f}, "
                        f"{row['train/tokens_per_second']:.0f} tokens/s",
                        flush=True,
                    )
            window_loss.zero_()
            window_tokens, window_steps, window_start = 0, 0, time.perf_counter()
        if runtime.is_main and checkpointing:
            save_checkpoint(paths.checkpoint, model, optimizers, done, identity, history, final)
    progress.close()
    if runtime.is_main:
        live.end()
        save_model(model, paths.model)
    if dist.is_initialized():
        dist.destroy_process_group()
    return metrics


def _log_window(runtime, done, window_loss, window_steps, window_tokens, window_start, peak_flops, flops_per_token):
    """The training figures of the steps since the last log: mean loss (over all processes) and speed."""
    if runtime.world_size > 1:
        dist.all_reduce(window_loss)
    elapsed = time.perf_counter() - window_start
    row = {
        "step": done,
        "train/loss": float(window_loss) / window_steps,
        "train/tokens_per_second": window_tokens / elapsed,
    }
    if peak_flops:
        row["train/mfu"] = window_tokens / elapsed * flops_per_token / (peak_flops * runtime.world_size)
    return row


def _open_live(live_dir, history):
    """dvclive logger writing metrics and plots only (dvc.yaml declares them; it is never rewritten).

    A resumed run replays the logged history, so its plots equal an uninterrupted run's.
    """
    live = Live(live_dir, resume=False, save_dvc_exp=False, dvcyaml=None)
    for row in history:
        _log_row(live, row)
    return live


def _log_row(live, row):
    """Logs `row` but for its wall-clock figures, which differ from machine to machine (and from run to run):
    in the tracked metrics and plots they would leave a fresh clone's tree modified after `dvc repro`. They are
    on the progress line and in the checkpoint's history."""
    live.step = row["step"]
    # In sorted order: a resumed run replays its rows from the checkpoint's JSON (sorted keys), and metrics.json
    # keeps the order the names were first logged in, so only one order makes the two runs' files the same.
    for name, value in sorted(row.items()):
        if name not in ("step", *WALL_CLOCK_FIGURES):
            live.log_metric(name, value, timestamp=False)
    live.make_summary()


def checkpoint_identity(model_config, params, seed, data):
    """What a checkpoint must match to be resumed: model shape, training params, seed, data.

    The checkpoint frequency is not among the training params (it changes when progress is saved, not what is
    trained), so a run resumes after it changes.
    """
    return {"model": model_config.model_dump(), "train": params.model_dump(), "seed": seed, "data": data}
