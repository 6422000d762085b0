"""GGUF files for llama.cpp, Ollama and LM Studio, written by llama.cpp's own converter.

The converter (`convert_hf_to_gguf.py` and its `conversion/` package) and its `gguf` library are
taken from the llama-cpp-python source distribution on PyPI, at one pinned release, by
`make setup` (`python -m model.llamacpp`): nothing of llama.cpp is copied into this repository.
It reads our Hugging Face export as it is (a Llama folder), then `gguf`'s own metadata copier adds
what llama.cpp needs to behave like our server:
- base model: <|endoftext|> is the start token and is added to every prompt, as our server starts a
  document (llama.cpp adds no start token otherwise);
- chat model: the reply-ending newline is the end-of-turn token and <|user|> the end-of-message token,
  so llama.cpp stops a reply where our server does (both are end-of-generation tokens there).
The chat template (which refuses a system message, as our API does), the context length and the
sampling defaults of generation_config.json are carried over by the converter itself.
"""

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from model.errors import PipelineError
from model.special_tokens import ASSISTANT, END_OF_TEXT, END_OF_TEXT_ID, USER, USER_ID

# The release whose vendored llama.cpp converts our models, and its source distribution's hash.
LLAMA_CPP_PYTHON = "0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
# What the stage writes per model: full-quality 16-bit, and 8-bit (half the size, near-identical output).
OUTTYPES = ("f16", "q8_0")
NEWLINE_PIECE = "<0x0A>"
EXPORT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "pipeline.json",
    "tokenizer.model",
    "tokenizer_config.json",
)


def converter_folder():
    """Where `make setup` puts the converter: inside the Python environment that runs the stage."""
    return Path(sys.prefix) / "llama.cpp"


def sdist_name():
    return f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"


def fetch_converter(folder):
    """Downloads the pinned sdist (pip, hash-checked), unpacks the converter into `folder` and installs
    its `gguf` library into this environment. Does nothing when `folder` already holds that release."""
    folder = Path(folder)
    if (folder / "VERSION").is_file() and (folder / "VERSION").read_text(encoding="utf-8") == LLAMA_CPP_PYTHON:
        return
    with tempfile.TemporaryDirectory() as tmp:
        requirement = Path(tmp) / "requirements.txt"
        requirement.write_text(f"llama-cpp-python=={LLAMA_CPP_PYTHON} --hash=sha256:{SDIST_SHA256}\n", encoding="utf-8")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--require-hashes",
                "-r",
                str(requirement),
                "-d",
                tmp,
            ],
            check=True,
        )
        unpacked = Path(tmp) / "unpacked"
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
        wanted = ("convert_hf_to_gguf.py", "LICENSE", "conversion/", "gguf-py/")
        with tarfile.open(Path(tmp) / sdist_name()) as sdist:
            members = [
                m for m in sdist.getmembers() if m.name.startswith(prefix) and m.name[len(prefix) :].startswith(wanted)
            ]
            sdist.extractall(unpacked, members=members, filter="data")
        staged = Path(tmp) / "staged"
        shutil.move(unpacked / prefix, staged)
        # The sdist itself stays beside the converter: `make llamacpp` builds llama-cpp-python from it.
        shutil.move(Path(tmp) / sdist_name(), staged / sdist_name())
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", str(staged / "gguf-py")], check=True
        )
        (staged / "VERSION").write_text(LLAMA_CPP_PYTHON, encoding="utf-8")
        if folder.exists():
            shutil.rmtree(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(staged, folder)


def check_export(folder):
    folder = Path(folder)
    missing = [name for name in EXPORT_FILES if not (folder / name).is_file()]
    if missing:
        raise PipelineError(
            f"{folder}: not a model folder written by the export stage (missing {', '.join(missing)}); "
            "run `dvc repro export`"
        )


def read_export_json(folder, name):
    return json.loads((Path(folder) / name).read_text(encoding="utf-8"))


def convert(export_folder, out_file, outtype):
    """Writes `out_file` (GGUF, `outtype` one of OUTTYPES) from an exported Hugging Face folder."""
    import gguf  # installed by fetch_converter, so imported only once it can be there
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    if outtype not in OUTTYPES:
        raise PipelineError(f"GGUF type {outtype!r}: expected one of {', '.join(OUTTYPES)}")
    check_export(export_folder)
    chat = read_export_json(export_folder, "pipeline.json")["chat"]
    converter = converter_folder() / "convert_hf_to_gguf.py"
    if not converter.is_file():
        raise PipelineError(f"llama.cpp's converter is not installed ({converter} is missing): run `make setup`")
    raw = Path(out_file).with_name(Path(out_file).name + ".converted")
    result = subprocess.run(
        [sys.executable, str(converter), str(export_folder), "--outtype", outtype, "--outfile", str(raw)],
        env={**os.environ, "NO_LOCAL_GGUF": "1"},
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raw.unlink(missing_ok=True)
        tail = "\n".join(result.stderr.strip().splitlines()[-5:])
        raise PipelineError(f"llama.cpp's converter failed on {export_folder} (exit {result.returncode}):\n{tail}")

    reader = gguf.GGUFReader(raw, "r")
    tokens = reader.get_field(gguf.Keys.Tokenizer.LIST).contents()
    token_id = {"bos": END_OF_TEXT_ID, "eot": tokens.index(NEWLINE_PIECE), "eom": USER_ID}
    uint32, boolean = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.BOOL
    new_metadata = {
        gguf.Keys.Tokenizer.BOS_ID: MetadataDetails(uint32, token_id["bos"]),
        gguf.Keys.Tokenizer.ADD_BOS: MetadataDetails(boolean, not chat),
    }
    if chat:
        new_metadata[gguf.Keys.Tokenizer.EOT_ID] = MetadataDetails(uint32, token_id["eot"])
        new_metadata[gguf.Keys.Tokenizer.EOM_ID] = MetadataDetails(uint32, token_id["eom"])
        # A control token's text is not part of a reply in llama.cpp (as its end-of-turn tokens usually are):
        # the newline that ends a reply then stays out of the reply's text, as in ours. A chat reply is one line,
        # so no newline inside one is lost; a newline in a prompt still becomes this token (byte fallback).
        token_types = list(reader.get_field(gguf.Keys.Tokenizer.TOKEN_TYPE).contents())
        token_types[token_id["eot"]] = gguf.TokenType.CONTROL
        new_metadata[gguf.Keys.Tokenizer.TOKEN_TYPE] = MetadataDetails(
            gguf.GGUFValueType.ARRAY, token_types, sub_type=gguf.GGUFValueType.INT32
        )
    writer = gguf.GGUFWriter(
        out_file, arch=reader.get_field(gguf.Keys.General.ARCHITECTURE).contents(), endianess=reader.endianess
    )
    copy_with_new_metadata(reader, writer, new_metadata, remove_metadata=[])
    del reader  # its memory map holds the file open
    raw.unlink()


def modelfile(export_folder, gguf_name):
    """An Ollama Modelfile for `gguf_name`, converted from `export_folder`, in the same folder as that file."""
    chat = read_export_json(export_folder, "pipeline.json")["chat"]
    context_length = read_export_json(export_folder, "config.json")["max_position_embeddings"]
    generation = read_export_json(export_folder, "generation_config.json")
    lines = [f"# ollama create NAME -f {gguf_name.removesuffix('.gguf')}.Modelfile", f"FROM ./{gguf_name}"]
    if chat:
        # Ollama's Go template of the chat format; system messages are left out (our API refuses them).
        lines.append(
            'TEMPLATE """{{- range .Messages }}{{ if eq .Role "user" }}' + USER + "\n{{ .Content }}\n"
            '{{ else if eq .Role "assistant" }}' + ASSISTANT + "\n{{ .Content }}\n"
            "{{ end }}{{ end }}" + ASSISTANT + '\n"""'
        )
        stops = [USER, END_OF_TEXT]
    else:
        lines.append('TEMPLATE """{{ .Prompt }}"""')
        stops = [END_OF_TEXT]
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    lines.append(f"PARAMETER num_ctx {context_length}")
    lines += [
        f"PARAMETER {name} {generation[name]}" for name in ("temperature", "top_k", "top_p") if name in generation
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    fetch_converter(converter_folder())
