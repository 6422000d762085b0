"""Data pipeline benchmark: BPE training time and encoding throughput, on real text.

usage (from the repository root): .venv/bin/python -m benchmarks.data_pipeline

Reads the real-text slices in ../shared/corpus (Wikipedia and C4, about 3.5 MB once cleaned; they are
read in place, never copied into the repository), runs the project's own code paths on them, prints
a markdown report and writes it as the section "## Data pipeline (BPE and encoding)" of
BENCHMARKS.md (other sections are kept). Every time is the median of REPEATS runs.

1. BPE: `sample_sentences` + `train_bpe` at the ryangpt profile's vocabulary, on the slice's lines,
   then on 100k-800k and 2M lines made from the slice, to estimate the full ryangpt corpus
   (347 MB, which does not fit here), whose BPE input is bounded by tokenizer.max_sentences lines.
2. Encoding: `model.encoding.encode_documents` on the slice repeated to ~50 MB, against plain
   sentencepiece `encode(texts, num_threads=2)` on the same texts, with a check of identical ids.
"""

import datetime
import math
import os
import platform
import re
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # encode_documents' progress bar would clutter the report

import numpy as np  # noqa: E402
import sentencepiece as spm  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

from benchmarks.report import write_section  # noqa: E402
from model.corpus import clean_c4, clean_wikipedia, extract_documents  # noqa: E402
from model.encoding import encode_documents  # noqa: E402
from model.sources import stream_records  # noqa: E402
from model.special_tokens import END_OF_TEXT_ID  # noqa: E402
from model.tokenizer import CorpusTooSmallError, bpe_lines, sample_sentences, train_bpe  # noqa: E402

CORPUS = REPO.parent / "shared" / "corpus"
PROFILE = REPO / "configs" / "ryangpt.yaml"
HEADING = "## Data pipeline (BPE and encoding)"
COMMAND = ".venv/bin/python -m benchmarks.data_pipeline"

REPEATS = 3
FIT_LINE_COUNTS = (100_000, 200_000, 400_000, 800_000)  # measured, then fitted and extrapolated
SMALL_VOCAB = 8000  # also measured when the slice cannot support the profile's vocabulary
ENCODE_TARGET_BYTES = 50_000_000
ENCODE_THREADS = 2
FEW_MINUTES_S = 300  # the BPE goal: the full corpus "in a few minutes"
ENCODE_GOAL_MB_S = 10
MB = 1e6
BUSY_MACHINE_SHARE = 0.05  # above this share of CPU used by other processes, the report warns


# --- inputs ---------------------------------------------------------------------------------------


def load_profile():
    return yaml.safe_load(PROFILE.read_text(encoding="utf-8"))


def load_slice(profile):
    """Cleaned documents of the Wikipedia and C4 slices, through the extraction stages' code."""
    wikipedia, _ = stream_records(str(CORPUS / "wikipedia"), "wikipedia", data_dir="20231101.en")
    c4, _ = stream_records(str(CORPUS / "c4"), "c4", data_files="en/c4-train.*.json.gz")
    texts = []
    for records, clean, source in ((wikipedia, clean_wikipedia, "wikipedia"), (c4, clean_c4, "c4")):
        kept = extract_documents(records, clean, math.inf, profile[source]["min_chars"], Counter())
        texts.extend(record["text"] for record in kept)
    return texts


def utf8_bytes(texts):
    return sum(len(text.encode("utf-8")) for text in texts)


def words_of(lines):
    return {word for line in lines for word in line.split(" ")}


# --- synthetic corpora for the scaling curve --------------------------------------------------------


def heaps_exponent(lines, seed):
    """beta of distinct words ~ tokens**beta, fitted on prefixes of the slice's lines in seeded order."""
    order = np.random.default_rng(seed).permutation(len(lines))
    marks = {len(lines) // parts for parts in (16, 8, 4, 2, 1)}
    seen, tokens, points = set(), 0, []
    for count, index in enumerate(order, start=1):
        words = lines[index].split(" ")
        tokens += len(words)
        seen.update(words)
        if count in marks:
            points.append((tokens, len(seen)))
    return np.polyfit(*np.log(points).T, 1)[0]


def blend(head, tail):
    """A new word: the first half of `head` and the second half of `tail`."""
    return head[: (len(head) + 1) // 2] + tail[len(tail) // 2 :]


def variant_lines(lines, n_lines, beta, seed):
    """`n_lines` lines: copies of `lines` in which some words are replaced by new ones.

    Copy c (c >= 1) replaces each word with the probability that makes the distinct words of the first
    c + 1 copies about distinct(slice) * (c + 1) ** beta (Heaps' law). A new word blends two random
    slice words, so its characters and length look like those of real rare words. Plain replication
    keeps the slice's distinct words, which understates BPE's work: sentencepiece counts distinct
    whitespace-separated words (which is also why shuffling words within lines would not help).
    """
    rng = np.random.default_rng(seed)
    words = [line.split(" ") for line in lines]
    per_line = np.array([len(line_words) for line_words in words])
    line_of_word = np.repeat(np.arange(len(lines)), per_line)
    first_word = np.cumsum(per_line) - per_line
    vocabulary = sorted(words_of(lines))
    out, copy = list(lines), 1
    while len(out) < n_lines:
        share = len(vocabulary) * ((copy + 1) ** beta - copy**beta) / len(line_of_word)
        replaced = np.flatnonzero(rng.random(len(line_of_word)) < share)
        donors = rng.integers(len(vocabulary), size=(len(replaced), 2))
        changed = {}
        for position, (head, tail) in zip(replaced.tolist(), donors.tolist()):
            line = int(line_of_word[position])
            changed.setdefault(line, list(words[line]))[position - int(first_word[line])] = blend(
                vocabulary[head], vocabulary[tail]
            )
        out.extend(" ".join(changed[i]) if i in changed else line for i, line in enumerate(lines))
        copy += 1
    return out[:n_lines]


def replicated_lines(lines, n_lines):
    return (lines * math.ceil(n_lines / len(lines)))[:n_lines]


# --- measurements ---------------------------------------------------------------------------------


def median_seconds(run):
    """Median wall time of REPEATS calls of `run`, and the last call's result."""
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def time_bpe(lines, vocab_size, profile):
    """The build_bpe stage's two calls: the seeded sample (a no-op up to max_sentences), then training."""
    seed = profile["seed"]

    def build():
        return train_bpe(sample_sentences(lines, profile["tokenizer"]["max_sentences"], seed), vocab_size, seed)

    return median_seconds(build)


def slice_vocab_sizes(lines, profile):
    """The profile's vocabulary if the slice supports it, else the largest it supports and SMALL_VOCAB."""
    vocab_size = profile["tokenizer"]["vocab_size"]
    try:
        train_bpe(lines, vocab_size, profile["seed"])
        return [vocab_size], None
    except CorpusTooSmallError as error:
        largest = int(re.search(r"at most (\d+)", str(error)).group(1))
        return sorted({largest, min(SMALL_VOCAB, largest)}, reverse=True), str(error)


def bench_bpe(lines, profile):
    sizes, too_small = slice_vocab_sizes(lines, profile)
    on_slice = {size: time_bpe(lines, size, profile) for size in sizes}
    vocab = sizes[0]
    beta = heaps_exponent(lines, profile["seed"])
    counts = (*FIT_LINE_COUNTS, profile["tokenizer"]["max_sentences"])
    synthetic = variant_lines(lines, counts[-1], beta, profile["seed"])
    rows = []
    for n in counts:
        variants_s, _ = time_bpe(synthetic[:n], vocab, profile)
        replicated_s, _ = time_bpe(replicated_lines(lines, n), vocab, profile)
        rows.append(
            {
                "lines": n,
                "distinct": len(words_of(synthetic[:n])),
                "variants_s": variants_s,
                "replicated_s": replicated_s,
            }
        )
    fit = np.polyfit(np.log(counts[:-1]), np.log([row["variants_s"] for row in rows[:-1]]), 1)
    return {
        "vocab": vocab,
        "too_small": too_small,
        "beta": beta,
        "rows": rows,
        "fit_exponent": fit[0],
        "on_slice": {size: seconds for size, (seconds, _) in on_slice.items()},
        "model": on_slice[vocab][1],
        "extrapolated_s": math.exp(np.polyval(fit, math.log(counts[-1]))),
    }


def bench_encoding(texts, model):
    """encode_documents against plain sentencepiece on the slice repeated to ~ENCODE_TARGET_BYTES."""
    texts = texts * math.ceil(ENCODE_TARGET_BYTES / utf8_bytes(texts))
    with tempfile.TemporaryDirectory() as folder:
        model_file = Path(folder) / "tokenizer.model"
        model_file.write_bytes(model)
        project_s, tokens = median_seconds(lambda: encode_documents(model_file, texts, desc="encode"))
        processor = spm.SentencePieceProcessor(model_file=str(model_file))
        reference_s, ids = median_seconds(lambda: processor.encode(texts, num_threads=ENCODE_THREADS))
    reference = np.fromiter((i for doc in ids for i in (*doc, END_OF_TEXT_ID)), dtype=tokens.dtype)
    return {
        "documents": len(texts),
        "bytes": utf8_bytes(texts),
        "tokens": int(tokens.size),
        "project_s": project_s,
        "reference_s": reference_s,
        "identical": np.array_equal(tokens, reference),
    }


# --- report ---------------------------------------------------------------------------------------


def busy_cpu_seconds():
    """CPU seconds the whole machine has been busy since boot (/proc/stat), and those of this process."""
    user, nice, system, _idle, _iowait, irq, softirq = map(int, Path("/proc/stat").read_text().split()[1:8])
    own = os.times()  # children: the encoding workers, counted once they are reaped
    machine_s = (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")
    return machine_s, own.user + own.system + own.children_user + own.children_system


def machine():
    cpu = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
    return (
        f"{os.cpu_count()} cores ({cpu.group(1) if cpu else 'unknown CPU'}), Python "
        f"{platform.python_version()}, torch {torch.__version__}, sentencepiece {spm.__version__}"
    )


def render_header(info, corpus):
    lines = [
        f"Command: `{COMMAND}` (reads `../shared/corpus` in place). Machine: {info['machine']}. "
        f"Date: {info['date']}. Times are medians of {REPEATS} runs; MB = 10^6 bytes of UTF-8 text. "
        f"Other processes used {info['others_cpu_s']:.0f} CPU-seconds during the {info['wall_s']:.0f} s run "
        f"({info['others_share']:.0%} of the machine).",
        "",
    ]
    if info["others_share"] > BUSY_MACHINE_SHARE:
        lines += [
            "**Warning: the machine was busy with other work during this run; the times below are "
            "inflated. Rerun on an idle machine.**",
            "",
        ]
    return lines + [
        f"Input: the Wikipedia `20231101.en` and C4 `en` slices, cleaned as the extract stages clean them "
        f"(min_chars from `configs/ryangpt.yaml`): {corpus['documents']:,} documents, {corpus['lines']:,} "
        f"lines, {corpus['bytes'] / MB:.2f} MB, {corpus['distinct']:,} distinct words.",
        "",
    ]


def render_bpe(info, corpus, bpe):
    rows, full = bpe["rows"], bpe["rows"][-1]
    bytes_per_line = corpus["bytes"] / corpus["lines"]
    larger_estimate_s = max(full["variants_s"], bpe["extrapolated_s"])
    lines = ["### BPE training (`sample_sentences` + `train_bpe`)", ""]
    if bpe["too_small"]:
        lines += [f"The slice is too small for the profile's vocabulary: {bpe['too_small']}", ""]
    on_slice = ", ".join(f"vocab {size:,}: {seconds:.2f} s" for size, seconds in bpe["on_slice"].items())
    lines += [
        f"On the slice itself ({corpus['lines']:,} lines): {on_slice}.",
        "",
        f"Scaling, vocab {bpe['vocab']:,}, on lines made from the slice. *Variants*: copies of the slice's "
        f"lines in which a share of words is replaced by new words, so that distinct words grow by Heaps' law "
        f"with the slice's own exponent (beta = {bpe['beta']:.2f}); *replicated*: plain copies (distinct "
        f"words stay {corpus['distinct']:,}, a lower bound).",
        "",
        "| lines | distinct words (variants) | variants (s) | replicated (s) |",
        "|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {row['lines']:,} | {row['distinct']:,} | {row['variants_s']:.2f} | {row['replicated_s']:.2f} |"
        for row in rows
    ]
    return lines + [
        "",
        f"Full ryangpt corpus ({info['full_bytes'] / MB:.0f} MB; `tokenizer.max_sentences` = {full['lines']:,} "
        f"lines is the most BPE is given; at the slice's {bytes_per_line:.0f} bytes per line the corpus is "
        f"about {info['full_bytes'] / bytes_per_line / 1e6:.1f}M lines):",
        f"- **extrapolated**: a power law t = a * lines^b fitted to the {len(rows) - 1} variant points from "
        f"{rows[0]['lines']:,} to {rows[-2]['lines']:,} lines (b = {bpe['fit_exponent']:.2f}) gives "
        f"**{bpe['extrapolated_s']:.0f} s** at {full['lines']:,} lines;",
        f"- **measured on synthetic lines** ({full['lines']:,} variant lines, {full['distinct']:,} distinct "
        f"words): **{full['variants_s']:.0f} s** ({full['replicated_s']:.0f} s replicated).",
        "",
        f"Both are estimates from synthetic text, not a run on the real corpus. Goal (a few minutes, taken "
        f"as at most {FEW_MINUTES_S} s, on 2 cores): "
        f"**{'met' if larger_estimate_s <= FEW_MINUTES_S else 'not met'}** by the larger estimate "
        f"({larger_estimate_s:.0f} s).",
        "",
    ]


def render_encoding(info, bpe, encoding):
    project_rate = encoding["bytes"] / MB / encoding["project_s"]
    reference_rate = encoding["bytes"] / MB / encoding["reference_s"]
    return [
        f"### Encoding (the slice's tokenizer, vocab {bpe['vocab']:,})",
        "",
        f"The slice repeated to {encoding['bytes'] / MB:.1f} MB ({encoding['documents']:,} documents, "
        f"{encoding['tokens']:,} tokens with one `<|endoftext|>` per document).",
        "",
        "| encoder | seconds | MB/s |",
        "|---|---:|---:|",
        f"| `model.encoding.encode_documents` (one process per core) | {encoding['project_s']:.2f} | "
        f"{project_rate:.2f} |",
        f"| reference: `sp.encode(texts, num_threads={ENCODE_THREADS})` | {encoding['reference_s']:.2f} | "
        f"{reference_rate:.2f} |",
        "",
        f"Token ids identical (each document's ids + `<|endoftext|>`, concatenated): "
        f"**{'yes' if encoding['identical'] else 'NO'}**. Speed-up over the reference: "
        f"{project_rate / reference_rate:.2f}x. Goal (at least {ENCODE_GOAL_MB_S} MB/s on 2 cores): "
        f"**{'met' if project_rate >= ENCODE_GOAL_MB_S else 'not met'}**. At this rate the "
        f"{info['full_bytes'] / MB:.0f} MB corpus would encode in about "
        f"{info['full_bytes'] / MB / project_rate:.0f} s (extrapolated).",
        "",
    ]


def render(info, corpus, bpe, encoding):
    sections = render_header(info, corpus) + render_bpe(info, corpus, bpe) + render_encoding(info, bpe, encoding)
    return "\n".join(sections)


def main():
    profile = load_profile()
    start_wall, (start_machine, start_own) = time.perf_counter(), busy_cpu_seconds()
    info = {
        "machine": machine(),
        "full_bytes": profile["wikipedia"]["max_bytes"] + profile["c4"]["max_bytes"],
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    texts = load_slice(profile)
    lines = bpe_lines(texts)
    corpus = {
        "documents": len(texts),
        "lines": len(lines),
        "bytes": utf8_bytes(texts),
        "distinct": len(words_of(lines)),
    }
    bpe = bench_bpe(lines, profile)
    encoding = bench_encoding(texts, bpe["model"])
    end_machine, end_own = busy_cpu_seconds()
    info["wall_s"] = time.perf_counter() - start_wall
    info["others_cpu_s"] = max(0.0, (end_machine - start_machine) - (end_own - start_own))
    info["others_share"] = info["others_cpu_s"] / (info["wall_s"] * os.cpu_count())
    section = render(info, corpus, bpe, encoding)
    print(section)
    write_section(HEADING, section)


if __name__ == "__main__":
    main()
