"""Stage gguf: both exported models as GGUF files (llama.cpp, Ollama, LM Studio) with Ollama Modelfiles.

usage: python -m stages.gguf MODELS_DIR OUT_DIR

Writes OUT_DIR/{base,chat}-{f16,q8_0}.gguf, each with a .Modelfile beside it, all at once: OUT_DIR is
replaced only when every file is written.
"""

from pathlib import Path

from model.errors import run_stage
from model.files import atomic_output
from model.llamacpp import OUTTYPES, check_export, convert, modelfile

MODELS = ("base", "chat")  # the export stage's folders; each says in its pipeline.json whether it chats


def main(models_dir, out_dir):
    for name in MODELS:
        check_export(Path(models_dir) / name)
    with atomic_output(Path(out_dir)) as tmp:
        tmp.mkdir()
        for name in MODELS:
            for outtype in OUTTYPES:
                gguf_name = f"{name}-{outtype}.gguf"
                convert(Path(models_dir) / name, tmp / gguf_name, outtype)
                (tmp / f"{name}-{outtype}.Modelfile").write_text(
                    modelfile(Path(models_dir) / name, gguf_name), encoding="utf-8"
                )


if __name__ == "__main__":
    run_stage(main)
