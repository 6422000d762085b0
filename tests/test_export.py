"""The export is a standard Hugging Face Llama folder: transformers loads it and agrees with us."""

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from model.dialog import render_chat
from model.export import export_model, load_export
from model.generate import Sampling, generate
from tests.server import RunningServer
from tests.tiny import make_exports, servable_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer_model_file, tokenizer):
    folder = tmp_path_factory.mktemp("export")
    tokenizer_path = tokenizer_model_file
    models = {}
    for tied in (True, False):
        model = servable_model(tokenizer.vocab_size, tie_embeddings=tied, seed=int(tied))
        out = folder / f"tied-{tied}"
        export_model(model, tokenizer_path, out, "m", True, {"metrics": {"loss": 1.5}}, {"temperature": 0.7})
        models[tied] = (model, out)
    return tokenizer, models


@pytest.mark.parametrize("tied", [True, False])
def test_transformers_logits_equal_ours(exported, tied):
    tokenizer, models = exported
    model, folder = models[tied]
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tokens = torch.randint(0, tokenizer.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, _ = model(tokens)
        theirs = hf(tokens).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_transformers_greedy_continuation_equals_ours(exported, tied):
    tokenizer, models = exported
    model, folder = models[tied]
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    prompt = tokenizer.document_prompt("The capital of France is")
    ours = generate(model, prompt, Sampling(32, temperature=0.0))
    with torch.no_grad():
        theirs = hf.generate(
            torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None, min_new_tokens=32
        )
    assert theirs[0, len(prompt) :].tolist()[: len(ours)] == ours


# The llama.cpp tokenizer test's texts, and byte fallback (a character no piece covers) and special tokens.
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "In 1998, 42 people paid $3.50 each!",
    "  two  spaces, a\ttab and\nnew lines\n",
    "Ünïcödé: naïve café, 東京, emoji 🙂",
    "x",
    "x<|user|>y",
    "ẞ ꙮ 𓀀 ‽",
    "one<|endoftext|>two",
]


def test_transformers_tokenizer_matches_sentencepiece(exported):
    tokenizer, models = exported
    hf = transformers.AutoTokenizer.from_pretrained(models[True][1])
    for text in TEXTS[:-1]:
        assert hf.encode(text, add_special_tokens=False) == tokenizer.encode(text), text


def test_the_tokenizer_loads_without_sentencepiece_and_tokenizes_documents_as_the_server(
    tokenizer_model_file, tokenizer, tmp_path
):
    """tokenizer.json: a fresh `pip install "lm-eval[api,hf]"` has no sentencepiece, and transformers then read
    tokenizer.model as a tiktoken file and failed."""
    folders = make_exports(tmp_path, tokenizer_model_file, tokenizer.vocab_size)
    script = (
        "import json, sys; sys.modules['sentencepiece'] = None\n"  # an import of it now fails
        "from transformers import AutoTokenizer\n"
        "base, chat = (AutoTokenizer.from_pretrained(folder) for folder in sys.argv[1:3])\n"
        "texts = json.loads(sys.stdin.read())\n"
        "print(json.dumps([[base.encode(t), chat.encode(t)] for t in texts]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(folders["base"]), str(folders["chat"])],
        input=json.dumps(TEXTS),
        capture_output=True,
        text=True,
        check=True,
    )
    for text, (base_ids, chat_ids) in zip(TEXTS, json.loads(result.stdout)):
        if "<|user|>" not in text:  # our server keeps a role string as text; transformers reads the token
            assert base_ids == tokenizer.document_prompt(text), text
        assert chat_ids == base_ids[1:], text  # the chat model's adds no <|endoftext|> before a text


def readme_transformers_snippet():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", readme, re.DOTALL)
    return next(block for block in blocks if "AutoModelForCausalLM" in block)


def test_the_readmes_transformers_snippet_continues_text_as_our_server(
    tokenizer_model_file, tokenizer, tmp_path, monkeypatch
):
    """The README's snippet, as written (in a folder whose serve/models holds an export), gives the greedy
    tokens of our server at fp32, on several prompts."""
    snippet = readme_transformers_snippet()
    # Weights scaled up from their small initial values: the text then depends on the whole prompt, first
    # token included, as a trained model's does (at its initial scale it follows the last token alone).
    model = servable_model(tokenizer.vocab_size, tie_embeddings=True)
    with torch.no_grad():
        for weight in model.parameters():
            weight.mul_(4)
    export_model(
        model, tokenizer_model_file, tmp_path / "serve" / "models" / "base", "base", False, {}, {"temperature": 0.8}
    )
    monkeypatch.chdir(tmp_path)
    prompts = ["The capital of France is", "Once upon a time", "In 1998, 42 people", "Rivers flow into"]
    with RunningServer(tmp_path / "serve" / "models", precision="fp32") as server:
        for prompt in prompts:
            run = {"print": lambda *args: None}
            exec(snippet.replace('"The capital of France is"', repr(prompt)), run)
            reply = httpx.post(
                server.url + "/v1/completions",
                json={"model": "base", "prompt": prompt, "max_tokens": 30, "temperature": 0},
                timeout=60,
            ).json()
            # The same tokens, decoded as the server decodes: this random model draws byte pieces that make
            # invalid UTF-8, which tokenizers' decoder and sentencepiece's replace differently.
            new_ids = run["out"][0, run["ids"].shape[1] :].tolist()
            assert tokenizer.decode(new_ids) == reply["choices"][0]["text"], prompt


def test_chat_template_renders_the_training_format(exported):
    tokenizer, models = exported
    hf = transformers.AutoTokenizer.from_pretrained(models[True][1])
    turns = ["Hi, how are you?", "Fine, thanks.", "What is your name?"]
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    prompt = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == render_chat(turns) + "<|assistant|>\n"
    assert hf.encode(prompt, add_special_tokens=False) == tokenizer.chat_prompt(turns)
    whole = hf.apply_chat_template(messages[:2], tokenize=False)
    assert hf.encode(whole, add_special_tokens=False) == tokenizer.encode_chat(turns[:2])[0]


def test_export_is_byte_identical_on_rerun(exported, tmp_path):
    tokenizer, models = exported
    model, folder = models[False]
    export_model(
        model,
        folder / "tokenizer.model",
        tmp_path / "again",
        "m",
        True,
        {"metrics": {"loss": 1.5}},
        {"temperature": 0.7},
    )
    for path in sorted(folder.iterdir()):
        assert (
            hashlib.sha256(path.read_bytes()).digest()
            == hashlib.sha256((tmp_path / "again" / path.name).read_bytes()).digest()
        ), path.name


def test_load_export_round_trips_our_model(exported):
    tokenizer, models = exported
    model, folder = models[False]
    loaded, listing = load_export(folder)
    tokens = torch.arange(20)[None] % tokenizer.vocab_size
    with torch.no_grad():
        assert torch.equal(loaded(tokens)[0], model(tokens)[0])
    assert listing["parameters"] == model.num_parameters() and listing["chat"] is True
