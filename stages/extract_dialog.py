"""Stage extract_dialog: DailyDialog's split zips to lists of detokenised turns.

usage: python -m stages.extract_dialog OUT_DIR MANIFEST_JSON
"""

from pathlib import Path

from model.dialog import SPLITS, read_split_zip
from model.errors import run_stage
from model.files import atomic_output, write_json, write_jsonl
from model.params import load_params
from model.sources import fetch_file


def main(out_dir, manifest_path):
    params = load_params().dialog
    zips = {split: fetch_file(params.source, "dialog.source", f"{split}.zip") for split in SPLITS}
    manifest = {"source": params.source, "revision": next(iter(zips.values()))[1]}
    with atomic_output(Path(out_dir)) as tmp:
        tmp.mkdir()
        for split, (zip_path, _) in zips.items():
            dialogues = read_split_zip(zip_path, split)
            write_jsonl(tmp / f"{split}.jsonl", dialogues)
            manifest[f"{split}_dialogues"] = len(dialogues)
            manifest[f"{split}_turns"] = sum(len(turns) for turns in dialogues)
    write_json(manifest_path, manifest)


if __name__ == "__main__":
    run_stage(main)
