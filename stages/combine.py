"""Stage combine: merge Wikipedia and C4, deduplicate, shuffle, hold out validation per source.

usage: python -m stages.combine WIKIPEDIA_JSONL C4_JSONL OUT_DIR MANIFEST_JSON
"""

from pathlib import Path

from model.corpus import combine, read_texts
from model.errors import run_stage
from model.files import atomic_output, write_json, write_jsonl
from model.params import load_params


def main(wikipedia_path, c4_path, out_dir, manifest_path):
    params = load_params()
    texts = {"wikipedia": read_texts(wikipedia_path), "c4": read_texts(c4_path)}
    train, validation, counts = combine(texts, params.combine.val_fraction, params.seed)
    with atomic_output(Path(out_dir)) as tmp:
        tmp.mkdir()
        write_jsonl(tmp / "train.jsonl", train)
        for source, documents in validation.items():
            write_jsonl(tmp / f"val_{source}.jsonl", documents)
    write_json(manifest_path, counts)


if __name__ == "__main__":
    run_stage(main)
