"""Stage extract_c4: stream C4 (realnewslike), clean it, stop at the byte cap.

usage: python -m stages.extract_c4 OUT_JSONL MANIFEST_JSON
"""

from model.corpus import clean_c4, extract_to_jsonl
from model.errors import run_stage
from model.files import write_json
from model.params import load_params
from model.sources import stream_records


def main(out_path, manifest_path):
    params = load_params().c4
    records, revision = stream_records(params.source, "c4.source", data_files=params.data_files)
    stats = extract_to_jsonl(records, clean_c4, params.max_bytes, params.min_chars, out_path)
    write_json(manifest_path, {"source": params.source, "data_files": params.data_files, "revision": revision, **stats})


if __name__ == "__main__":
    run_stage(main)
