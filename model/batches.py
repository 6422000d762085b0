"""Training batches: windows of the token stream for pretraining, whole dialogues for finetuning.

A batch is a pure function of (seed, step, micro-batch), so a resumed run sees exactly the batches
an uninterrupted run would.
"""

import numpy as np
import torch

from model.gpt import IGNORE_INDEX


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
