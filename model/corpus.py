"""Pretraining text: cleaning, extraction up to a byte cap, and the combined train / validation split."""

import hashlib
import re
import unicodedata
from collections import Counter

import numpy as np

from model.files import read_jsonl, write_jsonl

SOURCES = ("wikipedia", "c4")

# Wikipedia's back matter. Matched against whole heading lines only: the words also occur in
# ordinary sentences ("see also the river's delta"), where they must not cut the article.
TRAILING_HEADINGS = {
    "references",
    "external links",
    "see also",
    "other websites",
    "related pages",
    "notes",
    "further reading",
    "bibliography",
    "sources",
    "citations",
    "footnotes",
    "notes and references",
    "references and notes",
    "gallery",
    "other pages",
    "further reading and external links",
}

# Every run of Unicode spaces except the newline becomes one " ". The pattern leaves lone " " alone:
# replacing each of them by itself made a 50 MB document cost 0.6 GB and seconds.
_HORIZONTAL_SPACE = re.compile(r"[^\S\n]{2,}|[^\S\n ]")
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f\u200b\u200e\u200f\ufeff]")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalize_text(text):
    """NFC, one kind of space and newline, no control characters, at most one blank line in a row."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _HORIZONTAL_SPACE.sub(" ", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", text).strip()


def cut_trailing_sections(text):
    """Drops everything from the first back-matter heading: a whole line, after a blank line."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if i > 0 and lines[i - 1] == "" and line.strip().lower() in TRAILING_HEADINGS:
            return "\n".join(lines[:i]).strip()
    return text


def clean_wikipedia(text):
    return cut_trailing_sections(normalize_text(text))


def clean_c4(text):
    return normalize_text(text)


def extract_documents(records, clean, max_bytes, min_chars, stats):
    """Yields cleaned texts of `records` until `max_bytes` of UTF-8 text are kept.

    `stats` (a Counter) receives documents_read / documents_kept / dropped_* / bytes_kept.
    """
    for record in records:
        stats["documents_read"] += 1
        text = clean(record["text"] or "")
        if not text:
            stats["dropped_empty"] += 1
            continue
        if len(text) < min_chars:
            stats["dropped_too_short"] += 1
            continue
        stats["documents_kept"] += 1
        stats["bytes_kept"] += len(text.encode("utf-8"))
        yield {"text": text}
        if stats["bytes_kept"] >= max_bytes:
            stats["stopped_at_cap"] = 1
            return


def extract_to_jsonl(records, clean, max_bytes, min_chars, out_path):
    """Writes the kept documents as JSON lines; returns the manifest counters."""
    stats = Counter(
        documents_read=0, documents_kept=0, dropped_empty=0, dropped_too_short=0, bytes_kept=0, stopped_at_cap=0
    )
    write_jsonl(out_path, extract_documents(records, clean, max_bytes, min_chars, stats))
    if stats["documents_kept"] == 0:
        raise ValueError(
            f"no document survived cleaning ({stats['documents_read']} read, "
            f"{stats['dropped_too_short']} shorter than min_chars): nothing to write to {out_path}"
        )
    return dict(stats)


def combine(texts_by_source, val_fraction, seed):
    """Merges sources, drops exact duplicates, shuffles with `seed`, holds out `val_fraction` per source.

    Returns (train records, {source: validation records}, counts); records are {"source", "text"}.
    """
    seen = set()
    documents = []
    duplicates = 0
    for source in SOURCES:
        for text in texts_by_source[source]:
            digest = hashlib.sha256(text.encode("utf-8")).digest()
            if digest in seen:
                duplicates += 1
                continue
            seen.add(digest)
            documents.append({"source": source, "text": text})
    order = np.random.default_rng(seed).permutation(len(documents))
    shuffled = [documents[i] for i in order]
    validation = {}
    for source in SOURCES:
        of_source = [doc for doc in shuffled if doc["source"] == source]
        if len(of_source) < 2:
            raise ValueError(
                f"{source}: {len(of_source)} document(s) after deduplication; need at least 2 "
                f"to hold out a validation split"
            )
        validation[source] = of_source[: max(1, round(len(of_source) * val_fraction))]
    held_out = {id(doc) for docs in validation.values() for doc in docs}
    train = [doc for doc in shuffled if id(doc) not in held_out]
    counts = {"duplicates_dropped": duplicates, "train_documents": len(train)}
    counts.update({f"val_{source}_documents": len(validation[source]) for source in SOURCES})
    return train, validation, counts


def read_texts(path):
    return [record["text"] for record in read_jsonl(path)]
