"""The export is a standard Hugging Face Llama folder: transformers loads it and agrees with us."""

import hashlib

import pytest
import torch

from model.dialog import render_chat
from model.export import export_model, load_export
from model.generate import Sampling, generate
from tests.tiny import servable_model

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
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                             min_new_tokens=32)
    assert theirs[0, len(prompt):].tolist()[: len(ours)] == ours


def test_transformers_tokenizer_matches_sentencepiece(exported):
    tokenizer, models = exported
    hf = transformers.AutoTokenizer.from_pretrained(models[True][1])
    for text in ["Hello world", "  two  spaces\nand a newline 12345 café", "x<|user|>y", "Emoji 🙂 and 東京"]:
        assert hf.encode(text, add_special_tokens=False) == tokenizer.encode(text)


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
    export_model(model, folder / "tokenizer.model", tmp_path / "again", "m", True, {"metrics": {"loss": 1.5}},
                 {"temperature": 0.7})
    for path in sorted(folder.iterdir()):
        assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256((tmp_path / "again" / path.name).read_bytes()).digest(), path.name


def test_load_export_round_trips_our_model(exported):
    tokenizer, models = exported
    model, folder = models[False]
    loaded, listing = load_export(folder)
    tokens = torch.arange(20)[None] % tokenizer.vocab_size
    with torch.no_grad():
        assert torch.equal(loaded(tokens)[0], model(tokens)[0])
    assert listing["parameters"] == model.num_parameters() and listing["chat"] is True
