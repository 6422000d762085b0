"""The tests' one model factory, and exported folders of its models (the tokenizer is the session's
`tokenizer_model_file` fixture of conftest.py, trained on the bundled sample)."""

from pathlib import Path

import numpy as np
import torch

from model.export import export_model
from model.gpt import GPT, GPTConfig


def tiny_config(vocab_size=256, context_length=32, **overrides):
    """A model config small enough for unit tests: 2 layers, width 32, 4 heads."""
    values = dict(
        vocab_size=vocab_size,
        context_length=context_length,
        n_layers=2,
        d_model=32,
        n_heads=4,
        d_ff=64,
        tie_embeddings=True,
        rope_theta=10000.0,
        norm_eps=1e-5,
    )
    return GPTConfig(**{**values, **overrides})


def tiny_model(seed=0, **overrides):
    """A fresh model of tiny_config(**overrides), its weights drawn from `seed`."""
    torch.manual_seed(seed)
    return GPT(tiny_config(**overrides))


def servable_model(vocab_size, tie_embeddings=False, context_length=128, seed=0):
    """A tiny model a little wider (64), as the export and server tests serve it."""
    return tiny_model(
        seed, vocab_size=vocab_size, context_length=context_length, tie_embeddings=tie_embeddings, d_model=64, d_ff=128
    ).eval()


def make_exports(folder, tokenizer_path, vocab_size, context_length=128):
    """serve-able folders `base` (tied head) and `chat` (untied) under `folder`; returns them."""
    summary = {"metrics": {"val/dialog/loss": 3.0}, "training": {"steps": 1}}
    generation = {"temperature": 0.8, "top_k": 50}
    folders = {}
    for name, chat, tied in (("base", False, True), ("chat", True, False)):
        model = servable_model(vocab_size, tie_embeddings=tied, context_length=context_length, seed=len(name))
        folders[name] = Path(folder) / name
        export_model(model, tokenizer_path, folders[name], name, chat, summary, generation)
    return folders


def markov_chain(n_tokens, seed, vocab_size, table_seed=0):
    """A token stream (uint16, as the real token arrays) in which each token is followed by one of two distinct
    successors, each with probability 1/2: a model that learns the table reaches ln 2 nats per token."""
    rng = np.random.default_rng(table_seed)
    first = rng.permutation(vocab_size)
    second = (first + 1 + rng.integers(0, vocab_size - 1, size=vocab_size)) % vocab_size
    successors = np.stack([first, second], axis=1)
    coins = np.random.default_rng(seed).integers(0, 2, size=n_tokens)
    tokens = np.empty(n_tokens, dtype=np.uint16)
    tokens[0] = 0
    for i in range(1, n_tokens):
        tokens[i] = successors[tokens[i - 1], coins[i]]
    return tokens
