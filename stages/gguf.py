"""Stage gguf: both exported models as GGUF files (llama.cpp, Ollama, LM Studio) with Ollama Modelfiles.

usage: python -m stages.gguf MODELS_DIR OUT_DIR

Writes OUT_DIR/{base,chat}-{f16,q8_0}.gguf, each with a .Modelfile beside it, all at once: OUT_DIR is
replaced only when every file is written.
"""

import json
from pathlib import Path

from model.errors import run_stage
from model.files import atomic_output
from model.llamacpp import OUTTYPES, check_export, convert, modelfile

MODELS = {"base": False, "chat": True}  # served name -> chat model?


def main(models_dir, out_dir):
    for name in MODELS:
        check_export(Path(models_dir) / name)
    with atomic_output(Path(out_dir)) as tmp:
        tmp.mkdir()
        for name, chat in MODELS.items():
            export = Path(models_dir) / name
            config = json.loads((export / "config.json").read_text(encoding="utf-8"))
            generation = json.loads((export / "generation_config.json").read_text(encoding="utf-8"))
            for outtype in OUTTYPES:
                gguf_name = f"{name}-{outtype}.gguf"
                convert(export, tmp / gguf_name, outtype, chat)
                text = modelfile(gguf_name, chat, config["max_position_embeddings"], generation)
                (tmp / f"{name}-{outtype}.Modelfile").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    run_stage(main)
