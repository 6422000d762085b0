"""Pretraining text: cleaning, extraction up to a byte cap, the combined split, and atomic output files."""

import json
import os
from collections import Counter

import pytest

from model.corpus import (
    clean_wikipedia,
    combine,
    cut_trailing_sections,
    extract_documents,
    extract_to_jsonl,
    normalize_text,
)
from model.files import atomic_output, read_jsonl, write_jsonl

# --- normalize_text -------------------------------------------------------------------------------


def test_normalize_text_composes_to_nfc():
    decomposed = "Cafe\u0301 Ange\u0301lique"  # e + combining acute accent
    assert normalize_text(decomposed) == "Caf\u00e9 Ang\u00e9lique"


def test_normalize_text_turns_unicode_spaces_and_tabs_into_one_space():
    text = "no\u00a0break, em\u2003space, ideographic\u3000space, thin\u2009space,\ttab and  two"
    assert normalize_text(text) == "no break, em space, ideographic space, thin space, tab and two"


def test_normalize_text_turns_crlf_and_cr_into_newlines():
    assert normalize_text("first\r\nsecond\rthird") == "first\nsecond\nthird"


def test_normalize_text_removes_control_and_zero_width_characters():
    text = "a\x00b\x07c\x1bd\x7fe\u200bf\ufeffg\u200eh"
    assert normalize_text(text) == "abcdefgh"


def test_normalize_text_collapses_blank_line_runs_to_one_blank_line():
    text = "one\n\n\n\ntwo\n   \n\t\n\nthree\n\nfour"
    assert normalize_text(text) == "one\n\ntwo\n\nthree\n\nfour"


def test_normalize_text_strips_each_line_and_the_whole_text():
    assert normalize_text("\n\n  left\nright   \n  both  \n\n") == "left\nright\nboth"


# --- Wikipedia back matter ------------------------------------------------------------------------


@pytest.mark.parametrize("heading", ["References", "See also", "External links", "Other websites", "NOTES"])
def test_wikipedia_cleaner_cuts_back_matter_at_heading_lines(heading):
    article = f"Body of the article.\n\nHistory\n\nMore body text.\n\n{heading}\n\n* Item one\n* Item two"
    assert cut_trailing_sections(article) == "Body of the article.\n\nHistory\n\nMore body text."


def test_wikipedia_cleaner_cuts_back_matter_by_heading_not_substring():
    article = (
        "The river reaches the sea near the town; see also the river's delta for its wetlands.\n\n"
        "References to the river are found in many old songs.\n\n"
        "External links between the two ports were built in 1850."
    )
    assert cut_trailing_sections(article) == article


def test_wikipedia_cleaner_cuts_at_the_first_back_matter_heading():
    article = "Body.\n\nSee also\n\n* Other river\n\nReferences\n\n1. A book"
    assert cut_trailing_sections(article) == "Body."


def test_clean_wikipedia_finds_headings_after_normalizing_line_ends_and_spaces():
    raw = "Body text.\r\n\r\n\r\n  See\u00a0also  \r\n\r\n* Something else\r\n"
    assert clean_wikipedia(raw) == "Body text."


# --- extract_documents ----------------------------------------------------------------------------


def _records(texts, pulled):
    for text in texts:
        pulled.append(text)
        yield {"text": text}


def test_extract_documents_stops_reading_once_the_byte_cap_is_reached():
    texts = [f"Document number {i}. " + "word " * 20 for i in range(10)]
    size = len(normalize_text(texts[0]).encode("utf-8"))
    pulled, stats = [], Counter()
    kept = list(
        extract_documents(_records(texts, pulled), normalize_text, max_bytes=2 * size + 1, min_chars=0, stats=stats)
    )
    assert [doc["text"] for doc in kept] == [normalize_text(text) for text in texts[:3]]
    assert len(pulled) == 3, "no record past the one that reached the cap may be read"
    assert stats["documents_read"] == 3
    assert stats["documents_kept"] == 3
    assert stats["bytes_kept"] == sum(len(doc["text"].encode("utf-8")) for doc in kept)
    assert stats["stopped_at_cap"] == 1


def test_extract_documents_measures_the_cap_in_utf8_bytes_not_characters():
    texts = ["\u00e9" * 100] * 5  # 100 characters, 200 bytes each
    stats = Counter()
    kept = list(extract_documents(_records(texts, []), normalize_text, max_bytes=300, min_chars=0, stats=stats))
    assert len(kept) == 2
    assert stats["bytes_kept"] == 400


def test_extract_documents_keeps_everything_below_the_cap():
    texts = [f"Text {i} " + "long enough " * 5 for i in range(4)]
    stats = Counter()
    kept = list(extract_documents(_records(texts, []), normalize_text, max_bytes=10**6, min_chars=0, stats=stats))
    assert len(kept) == 4
    assert stats["stopped_at_cap"] == 0


def test_extract_documents_counts_empty_and_too_short_documents():
    long_text = "A sentence that is comfortably longer than the minimum length."
    records = [
        {"text": None},
        {"text": " \n\t\u00a0\n"},
        {"text": "Too short."},
        {"text": long_text},
        {"text": "\x00\u200b"},
        {"text": long_text + " Again."},
    ]
    stats = Counter()
    kept = list(extract_documents(records, normalize_text, max_bytes=10**6, min_chars=40, stats=stats))
    assert [doc["text"] for doc in kept] == [long_text, long_text + " Again."]
    assert stats["documents_read"] == 6
    assert stats["dropped_empty"] == 3
    assert stats["dropped_too_short"] == 1
    assert stats["documents_kept"] == 2


def test_extract_documents_applies_min_chars_to_the_cleaned_text():
    padded = "  short   text  " + "\u200b" * 30  # 46 raw characters, 10 after cleaning
    stats = Counter()
    assert list(extract_documents([{"text": padded}], normalize_text, 10**6, 20, stats)) == []
    assert stats["dropped_too_short"] == 1


def test_extract_to_jsonl_writes_kept_documents_and_returns_counts(tmp_path):
    texts = ["First document, long enough to keep.", "x", "Second document, also long enough."]
    out = tmp_path / "out.jsonl"
    stats = extract_to_jsonl(({"text": t} for t in texts), normalize_text, 10**6, 10, out)
    assert [record["text"] for record in read_jsonl(out)] == [texts[0], texts[2]]
    assert stats["documents_kept"] == 2
    assert stats["dropped_too_short"] == 1


def test_extract_to_jsonl_fails_when_no_document_survives(tmp_path):
    with pytest.raises(ValueError, match="no document survived"):
        extract_to_jsonl(iter([{"text": "tiny"}, {"text": ""}]), normalize_text, 10**6, 100, tmp_path / "out.jsonl")


# --- combine --------------------------------------------------------------------------------------


def _corpus(n_wikipedia=30, n_c4=40):
    return {
        "wikipedia": [f"Wikipedia article {i} about topic {i * 7 % 11}." for i in range(n_wikipedia)],
        "c4": [f"News story {i}: the council met on day {i % 5}." for i in range(n_c4)],
    }


def _texts(records):
    return [record["text"] for record in records]


def test_combine_drops_exact_duplicates_within_and_across_sources():
    corpus = _corpus(10, 10)
    corpus["wikipedia"] += [corpus["wikipedia"][0], corpus["wikipedia"][3]]  # within a source
    corpus["c4"].append(corpus["wikipedia"][5])  # across sources
    train, validation, counts = combine(corpus, 0.2, seed=1)
    everything = _texts(train) + [text for docs in validation.values() for text in _texts(docs)]
    assert counts["duplicates_dropped"] == 3
    assert len(everything) == len(set(everything)) == 20


def test_combine_keeps_near_duplicates_that_differ_by_a_character():
    corpus = _corpus(5, 5)
    corpus["c4"].append(corpus["c4"][0] + " ")
    train, validation, counts = combine(corpus, 0.2, seed=1)
    assert counts["duplicates_dropped"] == 0
    assert len(train) + sum(len(docs) for docs in validation.values()) == 11


def test_combine_is_deterministic_for_a_seed():
    assert combine(_corpus(), 0.1, seed=7) == combine(_corpus(), 0.1, seed=7)


def test_combine_shuffle_depends_on_the_seed():
    train_a, validation_a, _ = combine(_corpus(), 0.1, seed=7)
    train_b, validation_b, _ = combine(_corpus(), 0.1, seed=8)
    assert sorted(_texts(train_a) + _texts(validation_a["c4"]) + _texts(validation_a["wikipedia"])) == sorted(
        _texts(train_b) + _texts(validation_b["c4"]) + _texts(validation_b["wikipedia"])
    )
    assert _texts(train_a) != _texts(train_b)


def test_combine_shuffles_sources_together_in_train():
    train, _, _ = combine(_corpus(), 0.1, seed=3)
    sources = [record["source"] for record in train]
    first_c4 = sources.index("c4")
    assert "wikipedia" in sources[first_c4:], "train must interleave the sources, not concatenate them"


def test_combine_holds_out_validation_per_source_without_overlap():
    corpus = _corpus(30, 40)
    train, validation, counts = combine(corpus, 0.1, seed=5)
    assert set(validation) == {"wikipedia", "c4"}
    for source, documents in validation.items():
        assert {record["source"] for record in documents} == {source}
        assert set(_texts(documents)) <= set(corpus[source])
    assert len(validation["wikipedia"]) == 3
    assert len(validation["c4"]) == 4
    held_out = set(_texts(validation["wikipedia"])) | set(_texts(validation["c4"]))
    assert held_out.isdisjoint(_texts(train))
    assert held_out | set(_texts(train)) == set(corpus["wikipedia"]) | set(corpus["c4"])
    assert counts["train_documents"] == len(train) == 63
    assert counts["val_wikipedia_documents"] == 3
    assert counts["val_c4_documents"] == 4


def test_combine_holds_out_at_least_one_document_of_a_small_source():
    train, validation, _ = combine(_corpus(2, 40), 0.01, seed=5)
    assert len(validation["wikipedia"]) == 1
    assert [record["source"] for record in train].count("wikipedia") == 1


@pytest.mark.parametrize("wikipedia", [["Only one article."], ["Same article.", "Same article."], []])
def test_combine_rejects_a_source_with_fewer_than_two_documents(wikipedia):
    corpus = _corpus()
    corpus["wikipedia"] = wikipedia
    with pytest.raises(ValueError, match="wikipedia"):
        combine(corpus, 0.1, seed=1)


# --- atomic output files (model/files.py) ---------------------------------------------------------


def _leftovers(folder):
    return sorted(path.name for path in folder.iterdir() if ".tmp-" in path.name)


def test_atomic_output_leaves_previous_file_and_no_temp_when_the_block_raises(tmp_path):
    target = tmp_path / "out.jsonl"
    target.write_text("previous\n", encoding="utf-8")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_output(target) as tmp:
            tmp.write_text("half-written", encoding="utf-8")
            raise RuntimeError("killed half-way")
    assert target.read_text(encoding="utf-8") == "previous\n"
    assert _leftovers(tmp_path) == []


def test_atomic_output_creates_nothing_when_the_block_raises_before_any_previous_file(tmp_path):
    target = tmp_path / "sub" / "out.jsonl"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_text("half-written", encoding="utf-8")
            raise RuntimeError
    assert not target.exists()
    assert _leftovers(target.parent) == []


def test_atomic_output_leaves_previous_folder_when_the_block_raises(tmp_path):
    target = tmp_path / "tokens"
    target.mkdir()
    (target / "old.npy").write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.mkdir()
            (tmp / "new.npy").write_bytes(b"new")
            raise RuntimeError
    assert sorted(path.name for path in target.iterdir()) == ["old.npy"]
    assert _leftovers(tmp_path) == []


def test_atomic_output_replaces_a_folder_as_a_whole(tmp_path):
    target = tmp_path / "tokens"
    target.mkdir()
    (target / "old.npy").write_bytes(b"old")
    with atomic_output(target) as tmp:
        tmp.mkdir()
        (tmp / "new.npy").write_bytes(b"new")
    assert sorted(path.name for path in target.iterdir()) == ["new.npy"]
    assert _leftovers(tmp_path) == []


def test_atomic_output_removes_stale_temporaries_of_killed_writers(tmp_path):
    target = tmp_path / "out.jsonl"
    (tmp_path / ".out.jsonl.tmp-99999").write_text("left by a killed writer", encoding="utf-8")
    stale_folder = tmp_path / ".out.jsonl.tmp-old-99998"
    stale_folder.mkdir()
    (stale_folder / "part").write_text("x", encoding="utf-8")
    other = tmp_path / ".other.jsonl.tmp-99999"
    other.write_text("another output's temporary", encoding="utf-8")
    with atomic_output(target) as tmp:
        tmp.write_text("new\n", encoding="utf-8")
    assert target.read_text(encoding="utf-8") == "new\n"
    assert _leftovers(tmp_path) == [other.name]


def test_atomic_output_temporary_is_a_hidden_sibling_of_the_target(tmp_path):
    target = tmp_path / "out.jsonl"
    with atomic_output(target) as tmp:
        assert tmp.parent == tmp_path
        assert tmp.name.startswith(".out.jsonl.tmp-")
        assert str(os.getpid()) in tmp.name
        tmp.write_text("x", encoding="utf-8")


def test_write_jsonl_round_trips_unicode_records(tmp_path):
    records = [{"text": "caf\u00e9 \U0001f600\nline two", "source": "c4"}, {"text": "", "source": "wikipedia"}]
    path = tmp_path / "records.jsonl"
    assert write_jsonl(path, records) == 2
    assert list(read_jsonl(path)) == records
    assert all(json.loads(line) for line in path.read_text(encoding="utf-8").splitlines())
