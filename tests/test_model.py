"""The model: its size, the tied head, rotary embeddings, causality, saving and loading, config checks."""

import copy
import re

import pytest
import torch
import yaml

from model.gpt import GPT, IGNORE_INDEX, GPTConfig, apply_rope, load_model, rope_tables, save_model
from model.params import ParamsError, parse_params
from tests.paths import REPO_ROOT
from tests.tiny import tiny_config, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def random_tokens(config, length, seed=0, batch=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, length), generator=generator)


# --- size and the tied head ----------------------------------------------------------------------


def expected_parameter_count(config):
    """Llama's shapes without biases: embedding, per layer 4 attention and 3 SwiGLU matrices and
    two RMSNorm weights, the final norm, and an output head unless it is the embedding."""
    d, ff, vocab = config.d_model, config.d_ff, config.vocab_size
    per_layer = 4 * d * d + 3 * d * ff + 2 * d
    head = 0 if config.tie_embeddings else vocab * d
    return vocab * d + config.n_layers * per_layer + d + head


def test_ryangpt_shape_has_20_1m_parameters():
    with open(REPO_ROOT / "configs" / "ryangpt.yaml", encoding="utf-8") as f:
        model_params = yaml.safe_load(f)["model"]
    config = GPTConfig(vocab_size=16000, **model_params)
    assert (config.n_layers, config.d_model, config.n_heads, config.d_ff, config.tie_embeddings) == (
        6,
        320,
        5,
        1280,
        False,
    )
    with torch.device("meta"):  # shapes only: no memory and no initialisation time
        model = GPT(config)
    count = model.num_parameters()
    assert count == expected_parameter_count(config)
    assert round(count / 1e6, 1) == 20.1


def test_parameter_count_formula_matches_a_tiny_untied_model():
    config = tiny_config(tie_embeddings=False)
    assert GPT(config).num_parameters() == expected_parameter_count(config)


def test_tied_head_is_the_embedding_tensor():
    model = tiny_model(tie_embeddings=True)
    assert model.lm_head.weight is model.embed.weight
    assert model.num_parameters() == expected_parameter_count(model.config)
    assert "lm_head.weight" not in model.weights()
    with torch.no_grad():
        model.embed.weight[7].fill_(0.5)
    assert torch.equal(model.lm_head.weight[7], torch.full((model.config.d_model,), 0.5))


def test_untied_head_is_a_separate_tensor():
    model = tiny_model(tie_embeddings=False)
    assert model.lm_head.weight.data_ptr() != model.embed.weight.data_ptr()
    assert "lm_head.weight" in model.weights()


# --- rotary position embeddings -------------------------------------------------------------------


def rotate(vector, position, length=64, theta=10000.0):
    """`vector` (head_dim,) rotated to `position`, through the model's own tables."""
    cos, sin = rope_tables(vector.shape[-1], length, theta)
    x = vector.expand(1, 1, length, -1)
    return apply_rope(x, cos, sin)[0, 0, position]


def test_rope_preserves_vector_norms():
    head_dim, length = 16, 64
    x = torch.randn(2, 3, length, head_dim, generator=torch.Generator().manual_seed(0))
    cos, sin = rope_tables(head_dim, length, 10000.0)
    rotated = apply_rope(x, cos, sin)
    assert not torch.allclose(rotated, x)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)


def test_rope_attention_score_depends_only_on_relative_position():
    generator = torch.Generator().manual_seed(1)
    q, k = torch.randn(16, generator=generator), torch.randn(16, generator=generator)

    def score(m, n):
        return float(rotate(q, m) @ rotate(k, n))

    for m, n in [(5, 2), (10, 10), (3, 9), (0, 7)]:
        for shift in (1, 13, 40):
            assert score(m + shift, n + shift) == pytest.approx(score(m, n), abs=1e-4)
    # ...and it does depend on the offset, so the check above is not vacuous.
    assert abs(score(5, 2) - score(5, 4)) > 1e-3


def test_rope_at_position_zero_is_the_identity():
    v = torch.randn(16, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(rotate(v, 0), v)


# --- causality -----------------------------------------------------------------------------------


def test_logits_at_a_position_ignore_later_tokens():
    model = tiny_model()
    tokens = random_tokens(model.config, 20, seed=3)
    changed = tokens.clone()
    t = 9
    changed[0, t + 1 :] = (changed[0, t + 1 :] + 17) % model.config.vocab_size
    with torch.no_grad():
        before, _ = model(tokens)
        after, _ = model(changed)
    torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, t + 1 :], before[:, t + 1 :], atol=1e-4)


def test_loss_ignores_targets_marked_ignore_index():
    model = tiny_model()
    tokens = random_tokens(model.config, 12, seed=4)
    targets = random_tokens(model.config, 12, seed=5)
    masked = targets.clone()
    masked[:, :6] = IGNORE_INDEX
    with torch.no_grad():
        logits, loss = model(tokens, masked)
    expected = torch.nn.functional.cross_entropy(logits[0, 6:], targets[0, 6:])
    torch.testing.assert_close(loss, expected)


# --- saving and loading --------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
def test_save_and_load_model_round_trip_gives_identical_logits(tmp_path, tie):
    model = tiny_model(seed=6, tie_embeddings=tie)
    save_model(model, tmp_path / "model")
    loaded = load_model(tmp_path / "model")
    assert loaded.config == model.config
    tokens = random_tokens(model.config, 16, seed=7, batch=2)
    with torch.no_grad():
        assert torch.equal(loaded(tokens)[0], model(tokens)[0])
    if tie:
        assert loaded.lm_head.weight is loaded.embed.weight


def test_load_weights_rejects_a_wrong_shape_naming_the_tensor():
    model = tiny_model()
    weights = model.weights()
    name = "layers.1.mlp.up_proj.weight"
    weights[name] = torch.zeros(weights[name].shape[0] + 1, weights[name].shape[1])
    with pytest.raises(ValueError, match=re.escape(name)):
        tiny_model(seed=1).load_weights(weights)


def test_load_weights_rejects_a_missing_tensor_naming_it():
    weights = tiny_model().weights()
    del weights["layers.0.attn.k_proj.weight"]
    with pytest.raises(ValueError, match=re.escape("layers.0.attn.k_proj.weight")):
        tiny_model(seed=1).load_weights(weights)


# --- model params --------------------------------------------------------------------------------


def test_d_model_not_divisible_by_n_heads_is_an_error_naming_the_key():
    with open(REPO_ROOT / "params.yaml", encoding="utf-8") as f:
        raw = copy.deepcopy(yaml.safe_load(f))
    raw["model"]["n_heads"] = 3
    assert raw["model"]["d_model"] % 3 != 0
    with pytest.raises(ParamsError, match=r"model\.d_model"):
        parse_params(raw)
