"""Export to a standard Hugging Face Llama folder: a table of tensor names plus config files.

Our model is Llama-shaped (same RoPE layout, SwiGLU, RMSNorm, no biases), so nothing is
converted: tensors are renamed. The folder loads with `transformers.AutoModelForCausalLM` and
`AutoTokenizer` without remote code, and is what the server hosts.
"""

import hashlib
import json
import re
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from model.files import atomic_output, json_text
from model.gpt import GPT, GPTConfig
from model.special_tokens import ASSISTANT, ASSISTANT_ID, END_OF_TEXT, END_OF_TEXT_ID, UNK_ID, USER, USER_ID

# Our name -> the Hugging Face Llama name; {i} is the layer index.
TENSOR_NAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "layers.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.attn.q_proj.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attn.k_proj.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attn.v_proj.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attn.o_proj.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.mlp_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.mlp.gate_proj.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.mlp.up_proj.weight": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.mlp.down_proj.weight": "model.layers.{i}.mlp.down_proj.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}

# Our config field -> the Hugging Face Llama config key: hf_config writes through it, load_export reads back
# through it, so an architecture field is one line here.
CONFIG_KEYS = {
    "vocab_size": "vocab_size",
    "context_length": "max_position_embeddings",
    "n_layers": "num_hidden_layers",
    "d_model": "hidden_size",
    "n_heads": "num_attention_heads",
    "d_ff": "intermediate_size",
    "tie_embeddings": "tie_word_embeddings",
    "rope_theta": "rope_theta",
    "norm_eps": "rms_norm_eps",
}

# Renders a conversation exactly as finetuning saw it; with add_generation_prompt it ends where
# the assistant's reply begins.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{- '" + USER + "\\n' + message['content'] + '\\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- '" + ASSISTANT + "\\n' + message['content'] + '\\n' -}}"
    "{%- else -%}{{- raise_exception('only user and assistant messages are supported') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '"
    + ASSISTANT
    + "\\n' -}}{%- else -%}{{- '"
    + END_OF_TEXT
    + "' -}}{%- endif -%}"
)


def hf_tensor_name(name):
    match = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if match:
        return TENSOR_NAMES[f"layers.{{i}}.{match.group(2)}"].format(i=match.group(1))
    return TENSOR_NAMES[name]


def hf_config(config):
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **{key: getattr(config, field) for field, key in CONFIG_KEYS.items()},
        # What follows from our shape: every head has its own keys and values (no grouped-query attention).
        "num_key_value_heads": config.n_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": END_OF_TEXT_ID,
        "eos_token_id": END_OF_TEXT_ID,
        "pad_token_id": None,
        "torch_dtype": "float32",
    }


def hf_tokenizer_config(context_length, chat):
    """A document starts with <|endoftext|>, as every training document did and as our server starts a prompt,
    so the base model's tokenizer adds it as its BOS token; a chat prompt starts with its first turn."""
    special = {UNK_ID: "<unk>", END_OF_TEXT_ID: END_OF_TEXT, USER_ID: USER, ASSISTANT_ID: ASSISTANT}
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": not chat,
        "add_eos_token": False,
        "add_prefix_space": False,
        "legacy": False,
        "bos_token": END_OF_TEXT,
        "eos_token": END_OF_TEXT,
        "unk_token": "<unk>",
        "pad_token": None,
        "model_max_length": context_length,
        "added_tokens_decoder": {str(i): {"content": text, "special": True} for i, text in special.items()},
    }
    if chat:
        config["chat_template"] = CHAT_TEMPLATE
    return config


def model_card(name, chat, n_parameters, summary):
    kind = "chat model (finetuned on dialogues)" if chat else "base model (pretrained)"
    lines = [
        f"# {name}",
        "",
        f"A {n_parameters / 1e6:.1f}M-parameter Llama-architecture {kind}, built by this repository's DVC "
        "pipeline (`dvc repro`). Load it with `transformers.AutoModelForCausalLM.from_pretrained` or serve it "
        "with `python -m serve`.",
        "",
    ]
    if chat:
        lines += [
            "Chat format: `<|user|>\\n{text}\\n<|assistant|>\\n{text}\\n`, ending with `<|endoftext|>` "
            "(`tokenizer.apply_chat_template` renders it).",
            "",
        ]
    for section, values in summary.items():
        lines += [f"## {section}", "", "| | |", "|---|---|"]
        lines += [
            f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |"
            for key, value in sorted(values.items())
        ]
        lines.append("")
    return "\n".join(lines)


def export_model(model, tokenizer_model, out_dir, name, chat, summary, generation):
    """Writes `out_dir` as a complete Hugging Face Llama folder plus pipeline.json for the server.

    `summary`: {section: {key: value}} for the model card and the server's listing (params, data
    sizes, metrics); `generation`: default sampling settings for generation_config.json.
    """
    weights = {hf_tensor_name(name): t.detach().contiguous().cpu() for name, t in model.weights().items()}
    with atomic_output(Path(out_dir)) as tmp:
        tmp.mkdir()
        save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
        revision = hashlib.sha256((tmp / "model.safetensors").read_bytes()).hexdigest()[:12]
        (tmp / "config.json").write_text(json_text(hf_config(model.config)), encoding="utf-8")
        generation_config = {
            "eos_token_id": END_OF_TEXT_ID,
            "max_length": model.config.context_length,
            "do_sample": generation["temperature"] > 0,
            **generation,
        }
        (tmp / "generation_config.json").write_text(json_text(generation_config), encoding="utf-8")
        shutil.copyfile(tokenizer_model, tmp / "tokenizer.model")
        tokenizer_config = hf_tokenizer_config(model.config.context_length, chat)
        (tmp / "tokenizer_config.json").write_text(json_text(tokenizer_config), encoding="utf-8")
        write_fast_tokenizer(tmp)
        (tmp / "README.md").write_text(model_card(name, chat, model.num_parameters(), summary), encoding="utf-8")
        listing = {"name": name, "chat": chat, "parameters": model.num_parameters(), "revision": revision, **summary}
        (tmp / "pipeline.json").write_text(json_text(listing), encoding="utf-8")


def write_fast_tokenizer(folder):
    """tokenizer.json beside tokenizer.model and tokenizer_config.json in `folder`: transformers' own conversion
    of the sentencepiece model, so that loading the folder needs neither sentencepiece nor a conversion (without
    sentencepiece, transformers would read tokenizer.model as a tiktoken file and fail)."""
    import transformers  # here, not at the top: only the export stage needs it, and it takes seconds to import

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    (Path(folder) / "tokenizer.json").write_text(
        tokenizer.backend_tokenizer.to_str(pretty=True) + "\n", encoding="utf-8"
    )


def load_export(folder, device="cpu"):
    """(model, listing) from a folder written by `export_model`; safetensors only, nothing unpickled."""
    folder = Path(folder)
    hf = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    model = GPT(GPTConfig(**{field: hf[key] for field, key in CONFIG_KEYS.items()}))
    ours = {hf_tensor_name(name): name for name in model.weights()}
    tensors = load_file(folder / "model.safetensors")
    unknown = sorted(set(tensors) - set(ours))
    if unknown:
        raise ValueError(f"{folder}/model.safetensors holds tensors this config does not have: {unknown[:3]}")
    model.load_weights({ours[name]: tensor for name, tensor in tensors.items()})
    listing = json.loads((folder / "pipeline.json").read_text(encoding="utf-8"))
    return model.to(device).eval(), listing
