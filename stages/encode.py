"""Stage encode: token ids of every split to memory-mappable .npy arrays.

usage: python -m stages.encode TOKENIZER_MODEL COMBINED_DIR DIALOG_DIR OUT_DIR
"""

from pathlib import Path

from model.corpus import read_texts
from model.dialog import SPLITS
from model.encoding import pretraining_splits, write_token_folder
from model.errors import run_stage
from model.files import read_jsonl


def main(tokenizer_model, combined_dir, dialog_dir, out_dir):
    texts = {split: read_texts(Path(combined_dir) / f"{split}.jsonl") for split in pretraining_splits()}
    dialogues = {split: list(read_jsonl(Path(dialog_dir) / f"{split}.jsonl")) for split in SPLITS}
    write_token_folder(out_dir, tokenizer_model, texts, dialogues)


if __name__ == "__main__":
    run_stage(main)
