"""The training loop shared by pretraining and finetuning.

AdamW with linear warmup and cosine decay, gradient accumulation and clipping; bf16 autocast,
torch.compile and fused AdamW on CUDA; DistributedDataParallel under torchrun (gloo on CPU).
Data order is a pure function of (seed, step, micro-batch), so a run resumed from a checkpoint
sees exactly the batches an uninterrupted run would, and on CPU ends bit-identical to it.
"""

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from dvclive import Live
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from model.files import atomic_output
from model.gpt import IGNORE_INDEX, save_model

# Dense bf16 peak of the GPUs we know, for model FLOPs utilisation.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "RTX 3060": 51e12}


class TrainingError(RuntimeError):
    """Training cannot start or go on; the message says why and what to change."""


# --- batches -------------------------------------------------------------------------------------


def batch_rng(seed, step, micro):
    return np.random.default_rng([seed, step, micro])


def pretraining_batch(tokens, rng, batch_size, context_length):
    """Random windows of context_length + 1 tokens: inputs and next-token targets."""
    starts = rng.integers(0, len(tokens) - context_length, size=batch_size)
    windows = np.stack([tokens[start : start + context_length + 1] for start in starts]).astype(np.int64)
    return torch.from_numpy(windows[:, :-1]), torch.from_numpy(windows[:, 1:])


def dialogue_batch(tokens, mask, offsets, picks, context_length, rng=None, pad_id=0):
    """One row per picked dialogue, never crossing into the next one.

    Targets are the next tokens where the mask marks assistant replies, IGNORE_INDEX elsewhere
    (user turns, role tokens, padding). A dialogue longer than the context is cut to a window:
    a random one when `rng` is given, else its start.
    """
    rows = []
    for pick in picks:
        ids, reply = tokens[offsets[pick] : offsets[pick + 1]], mask[offsets[pick] : offsets[pick + 1]]
        if len(ids) > context_length + 1:
            start = int(rng.integers(0, len(ids) - context_length)) if rng is not None else 0
            ids, reply = ids[start : start + context_length + 1], reply[start : start + context_length + 1]
        rows.append((ids.astype(np.int64), reply))
    width = max(len(ids) for ids, _ in rows) - 1
    inputs = np.full((len(rows), width), pad_id, dtype=np.int64)
    targets = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    for row, (ids, reply) in enumerate(rows):
        inputs[row, : len(ids) - 1] = ids[:-1]
        targets[row, : len(ids) - 1] = np.where(reply[1:] == 1, ids[1:], IGNORE_INDEX)
    return torch.from_numpy(inputs), torch.from_numpy(targets)


def evaluation_windows(tokens, n_batches, batch_size, context_length):
    """Fixed, evenly spaced windows over a held-out split, so every evaluation sees the same text."""
    if len(tokens) <= context_length:
        raise TrainingError(f"a held-out split has {len(tokens)} tokens, fewer than model.context_length + 1 = "
                            f"{context_length + 1}: lower model.context_length or hold out more data")
    starts = np.linspace(0, len(tokens) - context_length - 1, n_batches * batch_size).astype(np.int64)
    for batch_starts in np.array_split(starts, n_batches):
        windows = np.stack([tokens[s : s + context_length + 1] for s in batch_starts]).astype(np.int64)
        yield torch.from_numpy(windows[:, :-1]), torch.from_numpy(windows[:, 1:])


@torch.no_grad()
def mean_loss(model, batches, device):
    """Mean next-token loss (nats) over all target tokens of `batches`."""
    model.eval()
    total, count = 0.0, 0
    for inputs, targets in batches:
        _, loss = model(inputs.to(device), targets.to(device))
        n = int((targets != IGNORE_INDEX).sum())
        total, count = total + float(loss) * n, count + n
    model.train()
    return total / count


def bits_per_byte(loss, tokens, n_bytes):
    """Loss per token (nats) as bits per byte of text: comparable across vocabularies."""
    return loss / math.log(2) * tokens / n_bytes


# --- schedule, runtime, checkpoints --------------------------------------------------------------


def learning_rate(step, params):
    """Linear warmup to params.lr, then cosine decay to params.min_lr at params.steps."""
    if step < params.warmup_steps:
        return params.lr * (step + 1) / params.warmup_steps
    progress = (step - params.warmup_steps) / max(1, params.steps - params.warmup_steps)
    return params.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (params.lr - params.min_lr)


@dataclass
class Runtime:
    device: torch.device
    rank: int
    world_size: int

    @property
    def is_main(self):
        return self.rank == 0


def start_runtime(device_param):
    """Picks the device and, under torchrun, joins the process group (NCCL on GPUs, gloo on CPU)."""
    use_cuda = device_param == "cuda" or (device_param == "auto" and torch.cuda.is_available())
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
    return Runtime(device, rank, world_size)


def save_checkpoint(path, model, optimizer, step, identity, history, complete):
    """Weights, optimizer moments and progress in one safetensors file, replaced atomically."""
    tensors = {f"model.{name}": t for name, t in model.weights().items()}
    for index, state in optimizer.state_dict()["state"].items():
        tensors.update({f"optimizer.{index}.{name}": t for name, t in state.items()})
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


def resume_state(path, identity, model, optimizer):
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
    state = {}
    for name, tensor in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = tensor
    saved = optimizer.state_dict()
    saved["state"] = state
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


def train(model, params, sample_batch, evaluate, checkpoint_path, live_dir, out_dir, identity, desc):
    """Trains `model` per TrainParams `params`, saves it to `out_dir`; returns the final evaluation metrics.

    sample_batch(step, micro) -> (inputs, targets) of the whole micro-batch (all processes);
    evaluate(model) -> {metric name: value}, run on the main process.
    """
    runtime = start_runtime(params.device)
    if params.batch_size % runtime.world_size:
        raise TrainingError(f"batch_size {params.batch_size} must be divisible by the {runtime.world_size} processes")
    cuda = runtime.device.type == "cuda"
    model.to(runtime.device)
    optimizer = torch.optim.AdamW(model.optimizer_groups(params.weight_decay), lr=params.lr,
                                  betas=(params.beta1, params.beta2), fused=cuda)
    start_step, history = resume_state(checkpoint_path, identity, model, optimizer)
    if start_step and runtime.is_main:
        print(f"{desc}: resuming from step {start_step} ({checkpoint_path})", flush=True)
    network = DistributedDataParallel(model) if runtime.world_size > 1 else model
    if cuda and params.compile:
        network = torch.compile(network)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and params.bf16 else nullcontext()
    rows_per_process = params.batch_size // runtime.world_size
    own_rows = slice(runtime.rank * rows_per_process, (runtime.rank + 1) * rows_per_process)
    peak_flops = _peak_flops(runtime.device)
    flops_per_token = model_flops_per_token(model.config)

    live = _open_live(live_dir, history) if runtime.is_main else None
    progress = tqdm(total=params.steps, initial=start_step, desc=desc, disable=not runtime.is_main)
    window_loss, window_tokens, window_steps = torch.zeros((), device=runtime.device), 0, 0
    window_start = time.perf_counter()
    metrics = {}
    for step in range(start_step, params.steps):
        lr = learning_rate(step, params)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro in range(params.grad_accum):
            inputs, targets = sample_batch(step, micro)
            n_targets = max(1, int((targets != IGNORE_INDEX).sum()))
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
        if not torch.isfinite(grad_norm):
            raise TrainingError(f"{desc}: non-finite loss or gradient at step {step}; the last good checkpoint "
                                f"is kept at {checkpoint_path}. Lower the learning rate or check the data.")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done, window_steps = step + 1, window_steps + 1
        progress.update(1)

        final = done == params.steps
        if done % params.log_every == 0 or done % params.eval_every == 0 or final:
            if runtime.world_size > 1:
                dist.all_reduce(window_loss)
            elapsed = time.perf_counter() - window_start
            row = {
                "step": done,
                "train/loss": float(window_loss) / window_steps,
                "train/lr": lr,
                "train/tokens_per_second": window_tokens / elapsed,
            }
            if peak_flops:
                row["train/mfu"] = window_tokens / elapsed * flops_per_token / (peak_flops * runtime.world_size)
            if runtime.is_main:
                if done % params.eval_every == 0 or final:
                    metrics = evaluate(model)
                    row.update(metrics)
                history.append(row)
                _log_row(live, row)
                progress.set_postfix(loss=f"{row['train/loss']:.3f}", tok_s=f"{row['train/tokens_per_second']:.0f}")
            window_loss.zero_()
            window_tokens, window_steps, window_start = 0, 0, time.perf_counter()
        if runtime.is_main and (done % params.checkpoint_every == 0 or final):
            save_checkpoint(checkpoint_path, model, optimizer, done, identity, history, final)
    progress.close()
    if runtime.is_main:
        live.end()
        save_model(model, out_dir)
    if dist.is_initialized():
        dist.destroy_process_group()
    return metrics


def _open_live(live_dir, history):
    """dvclive logger writing metrics and plots only (dvc.yaml declares them; it is never rewritten).

    A resumed run replays the logged history, so its plots equal an uninterrupted run's.
    """
    live = Live(live_dir, resume=False, save_dvc_exp=False, dvcyaml=None)
    for row in history:
        _log_row(live, row)
    return live


def _log_row(live, row):
    live.step = row["step"]
    for name, value in row.items():
        if name != "step":
            live.log_metric(name, value, timestamp=False)
    live.make_summary()


def checkpoint_identity(model_config, params, seed, data):
    """What a checkpoint must match to be resumed: model shape, training params, seed, data."""
    return {"model": model_config.to_dict(), "train": asdict(params), "seed": seed, "data": data}
