"""Writing the token folder that pretraining, finetuning and evaluation read (model/token_arrays.py)."""

import multiprocessing
import os

import numpy as np
from tqdm import tqdm

from model.corpus import SOURCES
from model.files import atomic_output, json_text
from model.token_arrays import TOKEN_DTYPE
from model.tokenizer import Tokenizer

DOCUMENTS_PER_CHUNK = 1024


_worker_tokenizer = None


def _start_worker(model_file):
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(model_file)


def _encode_chunk(texts):
    return _worker_tokenizer.encode_documents(texts)


def encode_documents(model_file, texts, desc):
    """All `texts` as one token array, each document followed by <|endoftext|>; one process per core."""
    chunks = [texts[start : start + DOCUMENTS_PER_CHUNK] for start in range(0, len(texts), DOCUMENTS_PER_CHUNK)]
    with multiprocessing.Pool(os.cpu_count(), initializer=_start_worker, initargs=(str(model_file),)) as pool:
        arrays = list(tqdm(pool.imap(_encode_chunk, chunks), total=len(chunks), desc=desc, unit="chunk"))
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=TOKEN_DTYPE)


def encode_dialogues(tokenizer, dialogues):
    """(tokens, assistant mask, offsets): dialogue i is tokens[offsets[i]:offsets[i + 1]]."""
    tokens, masks = [], []
    for turns in dialogues:
        ids, mask = tokenizer.encode_chat(turns)
        tokens.append(np.asarray(ids, dtype=TOKEN_DTYPE))
        masks.append(mask)
    offsets = np.zeros(len(dialogues) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(ids) for ids in tokens])
    return np.concatenate(tokens), np.concatenate(masks), offsets


def write_token_folder(out_dir, model_file, pretraining_texts, dialogues):
    """Writes every array of `out_dir` plus meta.json (token and byte counts for bits per byte).

    `pretraining_texts`: {"train": [...], "val_wikipedia": [...], ...}; `dialogues`: {split: [...]}.
    """
    tokenizer = Tokenizer(model_file)
    meta = {"vocab_size": tokenizer.vocab_size, "splits": {}}
    with atomic_output(out_dir) as tmp:
        tmp.mkdir()
        for split, texts in pretraining_texts.items():
            tokens = encode_documents(model_file, texts, desc=f"encode {split}")
            np.save(tmp / f"{split}.npy", tokens)
            meta["splits"][split] = {
                "documents": len(texts),
                "tokens": int(tokens.size),
                "bytes": sum(len(text.encode("utf-8")) for text in texts),
            }
        for split, split_dialogues in dialogues.items():
            tokens, mask, offsets = encode_dialogues(tokenizer, split_dialogues)
            np.save(tmp / f"dialog_{split}.npy", tokens)
            np.save(tmp / f"dialog_{split}_mask.npy", mask)
            np.save(tmp / f"dialog_{split}_offsets.npy", offsets)
            meta["splits"][f"dialog_{split}"] = {
                "documents": len(split_dialogues),
                "tokens": int(tokens.size),
                "assistant_tokens": int(mask.sum()),
                # The text the assistant tokens spell (replies and their newlines), for bits per byte.
                "assistant_bytes": sum(
                    len(turn.encode("utf-8")) + 1 for turns in split_dialogues for turn in turns[1::2]
                ),
            }
        (tmp / "meta.json").write_text(json_text(meta), encoding="utf-8")
    return meta


def pretraining_splits():
    return ["train"] + [f"val_{source}" for source in SOURCES]
