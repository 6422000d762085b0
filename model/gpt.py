"""The model: a decoder-only transformer shaped exactly like Llama.

Pre-norm RMSNorm (weight only), rotary position embeddings in the half-split `rotate_half`
layout, SwiGLU feed-forward, no biases, PyTorch's fused scaled-dot-product attention, and an
optional tied output head. Because the shapes and the RoPE layout are Llama's, exporting to the
Hugging Face format is a renaming of tensors (model/export.py), not a conversion.
"""

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import PositiveInt
from safetensors.torch import load_file, save_file

from model.files import atomic_output, json_text
from model.params import ModelParams

IGNORE_INDEX = -100  # targets with this value carry no loss (user turns, padding)


class GPTConfig(ModelParams):
    """The model's shape: the architecture of params.yaml's `model` section (its fields and checks), plus
    the vocabulary size, which the tokenizer fixes."""

    vocab_size: PositiveInt

    @property
    def head_dim(self):
        return self.d_model // self.n_heads


def rope_tables(head_dim, length, theta):
    """cos and sin of every position's rotation angles, (length, head_dim), halves repeated."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotates (B, H, T, D) queries or keys; pairs are (i, i + D/2), as in Llama."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class KVCache:
    """Keys and values of every layer for up to `batch_size` sequences of up to `max_length` tokens.

    A forward pass names the cache row of each of its sequences (`rows`, (B,)) and the absolute
    position of each of its tokens (`positions`, (B, T)). Each token is written at its own position,
    so the sequences of one batch may be at different lengths: the server decodes many requests
    together this way, and prefills a new one into a free row.
    """

    def __init__(self, config, batch_size, max_length, device=None, dtype=torch.float32):
        shape = (config.n_layers, batch_size, config.n_heads, max_length, config.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)

    def attend(self, layer, rows, positions, queries, keys, values):
        """Stores (B, H, T, D) keys and values, then attends each query to its own sequence up to itself.

        Sequence by sequence: a query then attends to exactly its own keys, with the same shapes
        whatever else is in the batch, so its result does not depend on the other sequences (a
        batched, masked product would change in the last bits with their lengths). `positions` must
        be consecutive within a sequence.
        """
        self.keys[layer, rows[:, None], :, positions] = keys.transpose(1, 2).to(self.keys.dtype)
        self.values[layer, rows[:, None], :, positions] = values.transpose(1, 2).to(self.values.dtype)
        outputs = []
        for query, own, row, end in zip(queries, positions, rows.tolist(), (positions[:, -1] + 1).tolist()):
            mask = None if len(own) == 1 else own[:, None] >= torch.arange(end, device=own.device)
            # (1, H, ., D): with a batch dimension, CPUs get the fused kernel, twice as fast for one query. The
            # server's int8 engine keeps its cache in 16-bit floats, attended in the query's type.
            row_keys, row_values = (
                cache[layer, row : row + 1, :, :end].to(query.dtype) for cache in (self.keys, self.values)
            )
            outputs.append(F.scaled_dot_product_attention(query[None], row_keys, row_values, attn_mask=mask))
        return torch.cat(outputs)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.q_proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.k_proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.v_proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.o_proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x, cos, sin, cache=None, layer=None, rows=None, positions=None):
        batch, length, width = x.shape
        q, k, v = (
            proj(x).view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = cache.attend(layer, rows, positions, q, k, v)
        return self.o_proj(y.transpose(1, 2).reshape(batch, length, width))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.mlp = FeedForward(config)

    def forward(self, x, cos, sin, cache=None, layer=None, rows=None, positions=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer, rows, positions)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(config.head_dim, config.context_length, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights("gpt2")

    @torch.no_grad()
    def init_weights(self, scheme):
        """Draws fresh weights: 'gpt2', 'zero_out' or 'reference' (see PretrainParams.init)."""
        residual_outputs = [block.attn.o_proj.weight for block in self.layers] + [
            block.mlp.down_proj.weight for block in self.layers
        ]
        for module in self.modules():
            if isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, nn.Embedding):
                if scheme == "reference":
                    nn.init.trunc_normal_(module.weight, std=1.0, a=-3.0, b=3.0)
                else:
                    nn.init.normal_(module.weight, std=0.02)
            elif isinstance(module, nn.Linear) and not (module is self.lm_head and self.config.tie_embeddings):
                if scheme == "reference":
                    std = math.sqrt(2 / (module.in_features + module.out_features))
                    nn.init.trunc_normal_(module.weight, std=std, a=-3 * std, b=3 * std)
                else:
                    nn.init.normal_(module.weight, std=0.02)
        if scheme == "gpt2":
            # Each residual branch adds to the stream, so its output starts smaller.
            for weight in residual_outputs:
                nn.init.normal_(weight, std=0.02 / math.sqrt(2 * self.config.n_layers))
        elif scheme == "zero_out":
            # Every block starts as the identity and the first logits are uniform; the updates
            # (Muon's especially, which are full-rank) grow them from there.
            for weight in residual_outputs:
                nn.init.zeros_(weight)
            if not self.config.tie_embeddings:
                nn.init.zeros_(self.lm_head.weight)
        elif scheme != "reference":
            raise ValueError(f"unknown init {scheme!r}; valid: gpt2, zero_out, reference")

    def num_parameters(self):
        return sum(p.numel() for p in self.parameters())

    def weights(self):
        """The state dict with each tensor once (a tied head is the embedding), for safetensors."""
        weights = self.state_dict()
        if self.config.tie_embeddings:
            del weights["lm_head.weight"]
        return weights

    def load_weights(self, weights):
        """Strict inverse of `weights`: a missing, extra or misshapen tensor is an error naming it."""
        weights = dict(weights)
        if self.config.tie_embeddings and "embed.weight" in weights:
            weights["lm_head.weight"] = weights["embed.weight"]
        expected = self.state_dict()
        for name in sorted(set(expected) | set(weights)):
            if name not in weights:
                raise ValueError(f"weights lack tensor '{name}' that this model config needs")
            if name not in expected:
                raise ValueError(f"weights hold tensor '{name}' that this model config does not have")
            if weights[name].shape != expected[name].shape:
                raise ValueError(
                    f"tensor '{name}' has shape {tuple(weights[name].shape)}, this model config "
                    f"needs {tuple(expected[name].shape)}"
                )
        self.load_state_dict(weights, strict=True)

    def forward(self, tokens, targets=None, cache=None, rows=None, positions=None):
        """Logits (B, T, vocab), and the mean loss over targets != IGNORE_INDEX when given.

        Without a cache the sequence starts at position 0 with causal attention. With a cache,
        `tokens` continue the sequences in cache `rows` (B,) at `positions` (B, T), and attend to
        all cached tokens of their sequence up to themselves.
        """
        if cache is None:
            length = tokens.shape[1]
            cos, sin = self.rope_cos[:length], self.rope_sin[:length]
        else:
            cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)
        x = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i, rows, positions)
        logits = self.lm_head(self.norm(x))
        if targets is None:
            return logits, None
        # The mean over real targets, and 0 (not NaN) for a batch that has none.
        total = F.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return logits, total / (targets != IGNORE_INDEX).sum().clamp(min=1)

    def parameter_groups(self):
        """The parameters by role, each once: hidden matrices (attention and feed-forward
        projections, all 2-D), the token embedding (the head too when tied), an untied output
        head, and the RMSNorm gains."""
        groups = {
            "matrices": [p for block in self.layers for p in block.parameters() if p.dim() == 2],
            "embedding": [self.embed.weight],
            "head": [] if self.config.tie_embeddings else [self.lm_head.weight],
            "gains": [p for p in self.parameters() if p.dim() == 1],
        }
        assert sum(len(g) for g in groups.values()) == len(list(self.parameters()))
        return groups


def save_model(model, out_dir):
    """`out_dir`/model.safetensors and config.json, written as one atomic folder."""
    with atomic_output(Path(out_dir)) as tmp:
        tmp.mkdir()
        save_file(
            {name: t.detach().contiguous().cpu() for name, t in model.weights().items()}, tmp / "model.safetensors"
        )
        (tmp / "config.json").write_text(json_text(model.config.model_dump()), encoding="utf-8")


def load_model(model_dir, device="cpu"):
    """A model saved by `save_model`; weights come from safetensors only, nothing is unpickled."""
    model_dir = Path(model_dir)
    model = GPT(GPTConfig.model_validate_json((model_dir / "config.json").read_text(encoding="utf-8")))
    model.load_weights(load_file(model_dir / "model.safetensors"))
    return model.to(device).eval()
