"""The gguf stage: llama.cpp's own converter turns both exports into GGUF files that run in llama.cpp
like our model does (same tokens, same greedy continuations, replies that end where ours end).

The llama.cpp tests need llama-cpp-python and llama-server (`make llamacpp` builds both, portable); .ci/run
does, a user's `make test` skips them without it (README). They run on the models of the session's
short pipeline: trained models, converted by the pipeline's own gguf stage.
"""

import shutil
import subprocess
import sys

import gguf
import httpx
import pytest
import torch

from model import llama_server
from model.export import CHAT_TEMPLATE, load_export
from model.llamacpp import NEWLINE_PIECE, OUTTYPES
from model.special_tokens import END_OF_TEXT_ID, USER_ID
from model.tokenizer import Tokenizer

# Our greedy token may differ from llama.cpp's only where ours wins by less than the error of the file's
# number format. Measured on the short pipeline's models over these prompts: logits within 2.1e-3 of ours at
# f16 and 4.4e-2 at q8_0, and one greedy token in 180 different, at q8_0, where ours won by 0.005.
NEAR_TIE = {"f16": 0.01, "q8_0": 0.15}
DOCUMENTS = ["The capital of France is", "In 1998, the city council", "Music is"]
CONVERSATIONS = [
    ["What is your name?"],
    ["Hello!"],
    ["Hi, how are you?", "I am fine, thank you.", "Where do you live?"],
]


def run_gguf_stage(models_dir, out_dir):
    return subprocess.run(
        [sys.executable, "-m", "stages.gguf", str(models_dir), str(out_dir)], capture_output=True, text=True
    )


def field(reader, key):
    found = reader.get_field(key)
    return None if found is None else found.contents()


@pytest.fixture(scope="module")
def models(tiny_exports):
    return tiny_exports()


@pytest.fixture(scope="module")
def converted(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "gguf"
    result = run_gguf_stage(models, out)
    assert result.returncode == 0, result.stderr
    return out


def test_the_stage_writes_both_models_at_f16_and_q8_0_with_what_llama_cpp_needs(converted, tokenizer):
    assert sorted(path.name for path in converted.iterdir()) == sorted(
        f"{name}-{outtype}.{ext}" for name in ("base", "chat") for outtype in OUTTYPES for ext in ("gguf", "Modelfile")
    )
    for name in ("base", "chat"):
        for outtype, weight_type in (("f16", gguf.GGMLQuantizationType.F16), ("q8_0", gguf.GGMLQuantizationType.Q8_0)):
            reader = gguf.GGUFReader(converted / f"{name}-{outtype}.gguf")
            names = {tensor.name for tensor in reader.tensors}
            assert "token_embd.weight" in names and ("output.weight" in names) is (name == "chat")  # chat: untied head
            assert {t.tensor_type for t in reader.tensors if t.name.endswith("attn_q.weight")} == {weight_type}
            assert field(reader, "llama.context_length") == 128
            assert field(reader, "general.sampling.temp") == pytest.approx(0.8)
            assert field(reader, "general.sampling.top_k") == 50
            assert field(reader, "tokenizer.ggml.bos_token_id") == END_OF_TEXT_ID
            assert field(reader, "tokenizer.ggml.eos_token_id") == END_OF_TEXT_ID
            # A document starts with <|endoftext|>, as our server starts one; a chat prompt does not.
            assert field(reader, "tokenizer.ggml.add_bos_token") is (name == "base")
            if name == "chat":
                assert field(reader, "tokenizer.chat_template") == CHAT_TEMPLATE
                assert field(reader, "tokenizer.ggml.eot_token_id") == tokenizer.sp.piece_to_id(NEWLINE_PIECE)
                assert field(reader, "tokenizer.ggml.eom_token_id") == USER_ID
            else:
                assert field(reader, "tokenizer.ggml.eot_token_id") is None
            # The chat model's newline ends a reply and is a control token, whose text llama.cpp leaves out.
            newline_type = field(reader, "tokenizer.ggml.token_type")[tokenizer.sp.piece_to_id(NEWLINE_PIECE)]
            assert newline_type == (gguf.TokenType.CONTROL if name == "chat" else gguf.TokenType.BYTE)
    modelfile = (converted / "chat-q8_0.Modelfile").read_text()
    assert "FROM ./chat-q8_0.gguf\n" in modelfile and "<|user|>\n{{ .Content }}\n" in modelfile
    assert 'PARAMETER stop "<|user|>"' in modelfile and "PARAMETER num_ctx 128\n" in modelfile


def test_the_stage_is_byte_identical_on_rerun(models, converted, tmp_path):
    result = run_gguf_stage(models, tmp_path / "again")
    assert result.returncode == 0, result.stderr
    for path in converted.iterdir():
        assert (tmp_path / "again" / path.name).read_bytes() == path.read_bytes(), path.name


@pytest.mark.parametrize("damage", ["missing folder", "missing tokenizer", "broken weights"])
def test_a_missing_or_broken_export_is_one_clear_error_and_the_previous_files_stay(models, tmp_path, damage):
    damaged = tmp_path / "models"
    shutil.copytree(models, damaged)
    if damage == "missing folder":
        shutil.rmtree(damaged / "chat")
    elif damage == "missing tokenizer":
        (damaged / "chat" / "tokenizer.model").unlink()
    else:
        (damaged / "chat" / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}broken")
    out = tmp_path / "gguf"
    out.mkdir()
    (out / "base-f16.gguf").write_bytes(b"the previous run's file")
    result = run_gguf_stage(damaged, out)
    assert result.returncode == 1
    assert str(damaged / "chat") in result.stderr and "Traceback" not in result.stderr
    assert [path.name for path in out.iterdir()] == ["base-f16.gguf"]
    assert (out / "base-f16.gguf").read_bytes() == b"the previous run's file"
    assert not [path for path in tmp_path.iterdir() if ".tmp-" in path.name]


# llama.cpp itself, on the short pipeline's trained models.


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (`make llamacpp`; README)")


@pytest.fixture(scope="module")
def pipeline_models(llama_cpp, short_pipeline):
    """Skips before the short pipeline runs when llama.cpp is absent (fixtures resolve in argument order)."""
    root = short_pipeline[0].root
    tokenizer = Tokenizer(root / "serve/models/chat/tokenizer.model")
    return root, tokenizer


def ours_and_llama_cpps(pipeline_models, name, outtype):
    """(tokenizer, our model `name`, llama.cpp's Llama on its GGUF file at `outtype`)."""
    from llama_cpp import Llama

    root, tokenizer = pipeline_models
    model, _ = load_export(root / "serve/models" / name)
    llm = Llama(
        model_path=str(root / f"serve/gguf/{name}-{outtype}.gguf"),
        n_ctx=0,
        n_threads=1,
        logits_all=True,
        seed=0,
        verbose=False,
    )
    return tokenizer, model, llm


def greedy_with_margins(model, prompt_ids, max_tokens, stop_ids):
    """Our greedy continuation (stop id included) and, per new token, how far its logit beat the runner-up."""
    ids, new, margins = list(prompt_ids), [], []
    with torch.no_grad():
        while len(new) < max_tokens and len(ids) < model.config.context_length:
            logits, _ = model(torch.tensor([ids]))
            top = logits[0, -1].topk(2)
            new.append(int(top.indices[0]))
            margins.append(float(top.values[0] - top.values[1]))
            ids.append(new[-1])
            if new[-1] in stop_ids:
                break
    return new, margins


def assert_same_greedy(ours, margins, theirs, outtype, what):
    for i, (our_token, their_token) in enumerate(zip(ours, theirs)):
        if our_token != their_token:
            assert margins[i] < NEAR_TIE[outtype], (
                f"{what}: llama.cpp ({outtype}) chose {their_token} at step {i} "
                f"where ours chose {our_token} by {margins[i]:.3f}"
            )
            return
    assert len(ours) == len(theirs), f"{what}: ours {ours}, llama.cpp's {theirs}"


@pytest.mark.parametrize("outtype", OUTTYPES)
def test_llama_cpp_tokenizes_plain_text_as_we_do_and_starts_documents_with_endoftext(pipeline_models, outtype):
    tokenizer, _, llm = ours_and_llama_cpps(pipeline_models, "base", outtype)
    texts = [
        "The quick brown fox jumps over the lazy dog.",
        "In 1998, 42 people paid $3.50 each!",
        "  two  spaces, a\ttab and\nnew lines\n",
        "Ünïcödé: naïve café, 東京, emoji 🙂",
        "x",
    ]
    for text in texts:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tokenizer.encode(text), text
        # The base file's own setting adds <|endoftext|> first, as our server does for a document.
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == tokenizer.document_prompt(text), text


@pytest.mark.parametrize("outtype", OUTTYPES)
def test_llama_cpp_continues_documents_with_our_greedy_tokens(pipeline_models, outtype):
    tokenizer, model, llm = ours_and_llama_cpps(pipeline_models, "base", outtype)
    for text in DOCUMENTS:
        prompt = tokenizer.document_prompt(text)
        ours, margins = greedy_with_margins(model, prompt, 30, tokenizer.document_end_ids)
        llm.reset()
        llm.eval(prompt)
        # The first step's logits, all of them, within the file format's error.
        first = torch.tensor(llm.scores[len(prompt) - 1])
        with torch.no_grad():
            expected = model(torch.tensor([prompt]))[0][0, -1]
        assert (first - expected).abs().max() < NEAR_TIE[outtype] / 2
        theirs = []
        for token in llm.generate(prompt, top_k=1, temp=0.0):
            theirs.append(token)
            if token in tokenizer.document_end_ids or len(theirs) == len(ours):
                break
        assert_same_greedy(ours, margins, theirs, outtype, text)


@pytest.mark.parametrize("outtype", OUTTYPES)
def test_llama_cpp_chats_with_our_template_and_ends_replies_where_we_do(pipeline_models, outtype):
    tokenizer, model, llm = ours_and_llama_cpps(pipeline_models, "chat", outtype)
    for turns in CONVERSATIONS:
        ours, margins = greedy_with_margins(model, tokenizer.chat_prompt(turns), 30, tokenizer.reply_end_ids)
        messages = [{"role": "assistant" if i % 2 else "user", "content": turn} for i, turn in enumerate(turns)]
        reply = llm.create_chat_completion(messages, max_tokens=30, temperature=0.0, top_k=1)["choices"][0]
        if reply["finish_reason"] == "stop":
            assert ours[-1] in tokenizer.reply_end_ids, turns
            ours = ours[:-1]  # both leave the ending token out of the reply
        assert not reply["message"]["content"].endswith("\n"), turns
        if reply["message"]["content"] != tokenizer.decode(ours):
            assert_same_greedy(ours, margins, tokenizer.encode(reply["message"]["content"]), outtype, turns)
    newline = tokenizer.sp.piece_to_id(NEWLINE_PIECE)
    # llama-server appends each token's text before it checks for the end, so the end-of-turn token's text
    # would end every reply: as a control token it has none; a prompt's newline is still that token.
    assert llm.detokenize([newline]) == b"" and newline in llm.tokenize(b"a\nb", add_bos=False, special=True)
    with pytest.raises(Exception, match="only user and assistant messages"):
        llm.create_chat_completion([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])


# llama.cpp's own server (`make llamacpp` builds it), as the README runs it: the chat template applied by its
# jinja engine and its reply parsing, which llama-cpp-python's create_chat_completion does not go through.


@pytest.fixture(scope="module")
def llama_server_chat(pipeline_models, tmp_path_factory):
    if not llama_server.binary().is_file():
        pytest.skip(f"llama-server is not built ({llama_server.binary()} is missing: `make llamacpp`; README)")
    root, _ = pipeline_models
    log = tmp_path_factory.mktemp("llama-server") / "chat.log"
    with llama_server.running(root / "serve/gguf/chat-q8_0.gguf", log) as url:
        yield url, log


def llama_server_reply(url, messages, max_tokens=30):
    reply = httpx.post(
        url + "/v1/chat/completions",
        json={"messages": messages, "max_tokens": max_tokens, "temperature": 0.0},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]


def test_llama_server_replies_with_our_greedy_text_and_ends_replies_where_we_do(pipeline_models, llama_server_chat):
    url, _ = llama_server_chat
    root, tokenizer = pipeline_models
    model, _ = load_export(root / "serve/models/chat")
    for turns in CONVERSATIONS:
        ours, margins = greedy_with_margins(model, tokenizer.chat_prompt(turns), 30, tokenizer.reply_end_ids)
        messages = [{"role": "assistant" if i % 2 else "user", "content": turn} for i, turn in enumerate(turns)]
        reply = llama_server_reply(url, messages)
        text = reply["message"]["content"]
        if reply["finish_reason"] == "stop":
            assert ours[-1] in tokenizer.reply_end_ids, turns
            ours = ours[:-1]
        assert not text.endswith("\n"), turns
        if text != tokenizer.decode(ours):
            assert_same_greedy(ours, margins, tokenizer.encode(text), "q8_0", turns)


def test_llama_server_merges_a_system_message_into_the_first_user_message_as_the_readme_says(llama_server_chat):
    url, log = llama_server_chat
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where do you live?"}]
    merged = [{"role": "user", "content": "Be brief.\nWhere do you live?"}]
    assert llama_server_reply(url, with_system) == llama_server_reply(url, merged)
    # The load-time warning the README explains (the end-of-turn and end-of-message tokens added to the
    # end-of-generation set), and no other.
    warnings = [line for line in log.read_text(errors="replace").splitlines() if "may be incorrect" in line]
    assert {line.split(": ", 1)[1] for line in warnings} == {
        "special_eot_id is not in special_eog_ids - the tokenizer config may be incorrect",
        "special_eom_id is not in special_eog_ids - the tokenizer config may be incorrect",
    }
