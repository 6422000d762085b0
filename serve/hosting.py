"""The hosted models: each exported model folder loaded with its tokenizer, sampling defaults and engine.

Models are chosen by name from this listing only; no client input ever becomes a path. A folder is
loaded only if nothing in it links outside the models folder the server was given (the symlink
policy of `load_models`), and a broken folder is reported and skipped rather than taking the others
down.
"""

import hashlib
import json
import logging
from pathlib import Path

from model.export import load_export
from model.token_arrays import check_same_vocabulary
from model.tokenizer import Tokenizer
from serve import kernel
from serve.engine import Engine
from serve.schema import TokenizerInfo

log = logging.getLogger("serve")
# Sampling from the model's own distribution: what a request gets where neither it nor the export says otherwise.
PLAIN_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": None}


class HostedModel:
    """One model folder as the server hosts it: its listing, tokenizer, sampling defaults and engine."""

    def __init__(self, name, folder, max_batch, precision, threads):
        model, self.listing = load_export(folder)
        self.name = name
        self.tokenizer = Tokenizer(folder / "tokenizer.model")
        check_same_vocabulary(self.tokenizer.vocab_size, folder / "tokenizer.model", model.config, folder)
        # The export holds no timestamp (a rerun writes the same bytes): the weights' file time is when it was
        # written (or checked out) here.
        self.created = int((folder / "model.safetensors").stat().st_mtime)
        # What a request gets for each sampling field it leaves out: the export's defaults, as transformers and
        # vLLM take them from generation_config.json (the GGUF and the Modelfile carry the same), else sampling
        # from the model's own distribution.
        generation_config = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
        self.sampling = {name: generation_config.get(name, plain) for name, plain in PLAIN_SAMPLING.items()}
        self.tokenizer_digest = hashlib.sha256((folder / "tokenizer.model").read_bytes()).hexdigest()
        tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        self.tokenizer_info = TokenizerInfo.model_validate(
            {name: tokenizer_config.get(name) for name in TokenizerInfo.model_fields}
        )
        # No token covers more characters than the longest piece: a text longer than limit * this is over the
        # limit before it is tokenized.
        self.max_piece_chars = self.tokenizer.longest_piece_chars()
        self.vocab_size = self.tokenizer.vocab_size
        self.context_length = model.config.context_length
        self.chat = bool(self.listing.get("chat"))
        self.engine = Engine(model, self.tokenizer, max_batch, precision, threads, name)

    def card(self):
        return {
            "id": self.name,
            "object": "model",
            "created": self.created,
            "owned_by": "dvc-gpt-pipeline",
            "context_length": self.context_length,
            "sampling": self.sampling,
            **self.listing,
        }


def _linked_out(folder, root):
    """Why `folder` (under `root`) must not be loaded: it or a file in it links outside `root`, or a link is
    dangling; None when it is sound."""
    if not folder.resolve().is_relative_to(root):
        return f"it links to {folder.resolve()}, outside {root}"
    for path in sorted(folder.rglob("*")):
        if path.is_symlink() and not path.exists():
            return f"{path.name} is a dangling link"
        if not path.resolve().is_relative_to(root):
            return f"{path.name} links to {path.resolve()}, outside {root}"
    return None


def load_models(models_dir, max_batch, precision, threads):
    """Every loadable model folder under `models_dir`; broken ones are reported and skipped.

    A model folder, or a file in it, may be a symlink (an alias such as `latest -> base`) only if it
    resolves inside `models_dir`: the server reads no model from outside the folder it was given.
    Raises serve.kernel.KernelBuildError when the decode kernel cannot be loaded.
    """
    # Every model decodes with the kernel: one that is not built is one error with its cause, raised here,
    # rather than the same error once per folder and then "no loadable model".
    kernel.library()
    root = Path(models_dir).resolve()
    hosted = {}
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if folder.name.startswith("."):
            continue
        if folder.is_symlink() and not folder.exists():
            log.error("skipping model folder %s: it is a dangling or looping link", folder)
            continue
        if not folder.is_dir():
            continue
        problem = _linked_out(folder, root)
        if problem:
            log.error("skipping model folder %s: %s", folder, problem)
            continue
        try:
            hosted[folder.name] = HostedModel(folder.name, folder, max_batch, precision, threads)
            log.info("serving model %s from %s", folder.name, folder)
        except Exception as error:  # a broken folder must not take the others down
            log.error("skipping model folder %s: %s: %s", folder, type(error).__name__, error)
    if not hosted:
        raise SystemExit(f"no loadable model under {models_dir}: run `dvc repro` (stage export) first")
    return hosted
