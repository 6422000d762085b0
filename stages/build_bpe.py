"""Stage build_bpe: train the sentencepiece BPE tokenizer on the training text and dialogues.

usage: python -m stages.build_bpe COMBINED_DIR DIALOG_DIR OUT_MODEL
"""

from pathlib import Path

from model.corpus import read_texts
from model.errors import run_stage
from model.files import atomic_output, read_jsonl
from model.params import load_params
from model.tokenizer import bpe_lines, sample_sentences, train_bpe


def main(combined_dir, dialog_dir, out_model):
    params = load_params()
    documents = read_texts(Path(combined_dir) / "train.jsonl")
    turns = [turn for dialogue in read_jsonl(Path(dialog_dir) / "train.jsonl") for turn in dialogue]
    sentences = sample_sentences(bpe_lines(documents + turns), params.tokenizer.max_sentences, params.seed)
    model = train_bpe(sentences, params.tokenizer.vocab_size, params.seed)
    with atomic_output(out_model) as tmp:
        tmp.write_bytes(model)


if __name__ == "__main__":
    run_stage(main)
