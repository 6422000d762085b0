"""Small real fixtures shared by the export and server tests: a tokenizer trained on the bundled
sample corpus, tiny models, and their exported folders."""

from pathlib import Path

import pyarrow.parquet as pq
import torch

from model.dialog import read_split_zip
from model.export import export_model
from model.gpt import GPT, GPTConfig
from model.tokenizer import Tokenizer, bpe_lines, train_bpe

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample"


def sample_lines():
    """Lines of the bundled sample: encyclopedia paragraphs and dialogue turns."""
    articles = pq.read_table(SAMPLE / "wikipedia" / "20231101.sample").column("text").to_pylist()
    turns = [turn for dialogue in read_split_zip(SAMPLE / "dailydialog" / "train.zip", "train") for turn in dialogue]
    return bpe_lines(articles + turns)


def make_tokenizer(folder, vocab_size=600):
    path = Path(folder) / "tokenizer.model"
    path.write_bytes(train_bpe(sample_lines(), vocab_size, seed=0))
    return path, Tokenizer(path)


def tiny_config(vocab_size=256, context_length=32, **overrides):
    """A model config small enough for unit tests: 2 layers, width 32, 4 heads."""
    values = dict(vocab_size=vocab_size, context_length=context_length, n_layers=2, d_model=32, n_heads=4,
                  d_ff=64, tie_embeddings=True, rope_theta=10000.0, norm_eps=1e-5)
    return GPTConfig(**{**values, **overrides})


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(tiny_config(**overrides))


def make_model(vocab_size, tie_embeddings=False, context_length=128, seed=0):
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=vocab_size, context_length=context_length, n_layers=2, d_model=64, n_heads=4,
                       d_ff=128, tie_embeddings=tie_embeddings, rope_theta=10000.0, norm_eps=1e-5)
    return GPT(config).eval()


def make_exports(folder, tokenizer_path, vocab_size, context_length=128):
    """serve-able folders `base` (tied head) and `chat` (untied) under `folder`; returns them."""
    summary = {"metrics": {"val/dialog/loss": 3.0}, "training": {"steps": 1}}
    generation = {"temperature": 0.8, "top_k": 50}
    folders = {}
    for name, chat, tied in (("base", False, True), ("chat", True, False)):
        model = make_model(vocab_size, tie_embeddings=tied, context_length=context_length, seed=len(name))
        folders[name] = Path(folder) / name
        export_model(model, tokenizer_path, folders[name], name, chat, summary, generation)
    return folders
