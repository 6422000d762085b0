"""Held-out evaluation: loss and bits per byte, what the training stages and the evaluate stage measure.

Fixed-prompt completions are model/completions.py's: the training stages do not depend on the sampling code.
"""

import math

import numpy as np
import torch

from model.batches import dialogue_batch
from model.errors import PipelineError
from model.gpt import IGNORE_INDEX
from model.token_arrays import heldout_sources, load_dialogues, load_meta, load_tokens


class EvaluationError(PipelineError, ValueError):
    """Held-out data that cannot be evaluated as asked."""


def evaluation_windows(tokens, n_batches, batch_size, context_length):
    """Fixed, evenly spaced windows over a held-out split, so every evaluation sees the same text."""
    if len(tokens) <= context_length:
        raise EvaluationError(
            f"a held-out split has {len(tokens)} tokens, fewer than model.context_length + 1 = "
            f"{context_length + 1}: lower model.context_length or hold out more data"
        )
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


def heldout_evaluator(token_dir, context_length, batch_size, n_batches):
    """evaluate(model) -> loss and bits per byte on each source's held-out split."""
    meta = load_meta(token_dir)
    sources = heldout_sources(meta)
    meta = meta["splits"]
    batches = {
        source: list(evaluation_windows(load_tokens(token_dir, f"val_{source}"), n_batches, batch_size, context_length))
        for source in sources
    }

    def evaluate(model):
        device = model.rope_cos.device
        metrics = {}
        for source in sources:
            loss = mean_loss(model, batches[source], device)
            split = meta[f"val_{source}"]
            metrics[f"val/{source}/loss"] = loss
            metrics[f"val/{source}/bpb"] = bits_per_byte(loss, split["tokens"], split["bytes"])
        return metrics

    return evaluate


def dialog_evaluator(token_dir, split, context_length, batch_size, n_batches):
    """evaluate(model) -> loss on assistant tokens and bits per byte of their text, on a dialogue split."""
    tokens, mask, offsets = load_dialogues(token_dir, split)
    n_dialogues = min(len(offsets) - 1, n_batches * batch_size)
    picks = np.array_split(np.arange(n_dialogues), math.ceil(n_dialogues / batch_size))
    batches = [dialogue_batch(tokens, mask, offsets, chunk, context_length) for chunk in picks]
    meta = load_meta(token_dir)["splits"][f"dialog_{split}"]

    def evaluate(model):
        loss = mean_loss(model, batches, model.rope_cos.device)
        return {
            "val/dialog/loss": loss,
            "val/dialog/bpb": bits_per_byte(loss, meta["assistant_tokens"], meta["assistant_bytes"]),
        }

    return evaluate
