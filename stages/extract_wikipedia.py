"""Stage extract_wikipedia: stream Wikipedia, clean it, stop at the byte cap.

usage: python -m stages.extract_wikipedia OUT_JSONL MANIFEST_JSON
"""

from model.corpus import clean_wikipedia, extract_to_jsonl
from model.errors import run_stage
from model.files import write_json
from model.params import load_params
from model.sources import stream_records


def main(out_path, manifest_path):
    params = load_params().wikipedia
    records, revision = stream_records(params.source, "wikipedia.source", data_dir=params.data_dir)
    stats = extract_to_jsonl(records, clean_wikipedia, params.max_bytes, params.min_chars, out_path)
    write_json(manifest_path, {"source": params.source, "data_dir": params.data_dir, "revision": revision, **stats})


if __name__ == "__main__":
    run_stage(main)
