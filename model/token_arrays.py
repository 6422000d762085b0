"""The token folder as training and evaluation read it: memory-mapped .npy arrays and meta.json.

The encode stage writes the folder (model/encoding.py). Reading it needs nothing of the tokenizer or the
corpus code, so that an edit to those reruns the data stages, not training.
"""

import json
from pathlib import Path

import numpy as np

from model.errors import PipelineError

TOKEN_DTYPE = np.uint16  # params.py caps the vocabulary at 2**16


class VocabularyMismatchError(PipelineError, ValueError):
    """A model and a vocabulary that were not made for each other."""


def check_same_vocabulary(vocab_size, vocab_source, model_config, model_source):
    """The one check that a model's vocabulary is that of `vocab_source` (a tokenizer, or the token folder it
    encoded); the error names both."""
    if vocab_size != model_config.vocab_size:
        raise VocabularyMismatchError(
            f"{model_source} has a vocabulary of {model_config.vocab_size} tokens but {vocab_source} has "
            f"{vocab_size}: the model was trained with another tokenizer; rerun its training stage"
        )


def load_tokens(token_dir, split):
    """A split's token array, memory-mapped (nothing is read until used)."""
    return np.load(Path(token_dir) / f"{split}.npy", mmap_mode="r")


def load_dialogues(token_dir, split):
    """(tokens, assistant mask, offsets) of a dialogue split: dialogue i is tokens[offsets[i]:offsets[i + 1]]."""
    token_dir = Path(token_dir)
    return (
        np.load(token_dir / f"dialog_{split}.npy", mmap_mode="r"),
        np.load(token_dir / f"dialog_{split}_mask.npy", mmap_mode="r"),
        np.load(token_dir / f"dialog_{split}_offsets.npy"),
    )


def load_meta(token_dir):
    """The folder's vocabulary size and, per split, its documents, tokens and bytes."""
    return json.loads((Path(token_dir) / "meta.json").read_text(encoding="utf-8"))


def heldout_sources(meta):
    """The sources with a held-out split (val_wikipedia, val_c4, ...), as the encode stage named them."""
    return sorted(split.removeprefix("val_") for split in meta["splits"] if split.startswith("val_"))
