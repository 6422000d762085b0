"""Generation: the KV cache against full forward passes, and the sampling rules."""

import numpy as np
import pytest
import torch

from model.generate import generate, logits_to_probs, sample
from model.gpt import KVCache
from tests.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 256
CONTEXT = 32


def random_model(seed=0, **overrides):
    return tiny_model(seed, **overrides).eval()


def markov_chain(n_tokens, seed):
    """A token stream where each token is followed by one of two fixed successors."""
    rng = np.random.default_rng(seed)
    successors = rng.integers(0, VOCAB, size=(VOCAB, 2))
    tokens = np.empty(n_tokens, dtype=np.int64)
    tokens[0] = 0
    choices = rng.integers(0, 2, size=n_tokens)
    for i in range(1, n_tokens):
        tokens[i] = successors[tokens[i - 1], choices[i]]
    return tokens


@pytest.fixture(scope="module")
def trained_model():
    """A tiny model trained briefly on a Markov chain, so its predictions are peaked, not near-uniform."""
    model = random_model(seed=1)
    model.train()
    tokens = torch.from_numpy(markov_chain(20000, seed=2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(3)
    for _ in range(40):
        starts = torch.randint(0, len(tokens) - CONTEXT - 1, (16,), generator=generator)
        windows = torch.stack([tokens[s : s + CONTEXT + 1] for s in starts])
        _, loss = model(windows[:, :-1], windows[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss.detach()) < np.log(VOCAB) - 1.0, "the fixture model should have learned something"
    return model.eval()


def prompt(length, seed=4):
    return [int(t) for t in torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed))]


# --- the KV cache --------------------------------------------------------------------------------


def test_cached_greedy_generation_equals_uncached_on_a_random_model():
    model = random_model(seed=5)
    ids = prompt(5)
    cached = generate(model, ids, 24, temperature=0.0)
    assert len(cached) == 24
    assert cached == generate(model, ids, 24, temperature=0.0, use_cache=False)


def test_cached_greedy_generation_equals_uncached_on_a_trained_model(trained_model):
    ids = prompt(4, seed=6)
    cached = generate(trained_model, ids, 25, temperature=0.0)
    assert len(cached) == 25
    assert cached == generate(trained_model, ids, 25, temperature=0.0, use_cache=False)


def test_generation_stops_at_the_context_end(trained_model):
    ids = prompt(CONTEXT - 3)
    assert len(generate(trained_model, ids, 100)) == 3
    with pytest.raises(ValueError, match="context"):
        generate(trained_model, prompt(CONTEXT), 5)


def test_cached_logits_equal_full_forward_logits(trained_model):
    model = trained_model
    sequence = torch.tensor([prompt(CONTEXT, seed=7)])
    with torch.no_grad():
        full, _ = model(sequence)
        cache = KVCache(model.config, 1, CONTEXT)
        prefill = 6
        step_logits = [model(sequence[:, :prefill], cache=cache, positions=torch.arange(prefill)[None])[0]]
        for t in range(prefill, CONTEXT):
            step_logits.append(model(sequence[:, t : t + 1], cache=cache, positions=torch.tensor([[t]]))[0])
    cached = torch.cat(step_logits, dim=1)
    assert cached.shape == full.shape
    torch.testing.assert_close(cached, full, rtol=0, atol=1e-5)


def test_batch_rows_at_different_lengths_match_each_row_run_alone(trained_model):
    """Row 0 has a 9-token prompt, row 1 a 4-token one padded to 9; then both decode at their own positions."""
    model = trained_model
    rows = [prompt(9, seed=8) + prompt(6, seed=9), prompt(4, seed=10) + prompt(6, seed=11)]
    prompt_lengths = [9, 4]
    with torch.no_grad():
        alone = [model(torch.tensor([row]))[0][0] for row in rows]
        cache = KVCache(model.config, 2, CONTEXT)
        padded = torch.tensor([rows[0][:9], rows[1][:4] + [0] * 5])
        logits, _ = model(padded, cache=cache, positions=torch.arange(9).expand(2, 9))
        torch.testing.assert_close(logits[0], alone[0][:9], rtol=0, atol=1e-5)
        torch.testing.assert_close(logits[1, :4], alone[1][:4], rtol=0, atol=1e-5)
        for step in range(6):
            positions = torch.tensor([[length + step] for length in prompt_lengths])
            inputs = torch.tensor([[rows[b][int(positions[b, 0])]] for b in range(2)])
            logits, _ = model(inputs, cache=cache, positions=positions)
            for b in range(2):
                torch.testing.assert_close(logits[b, 0], alone[b][int(positions[b, 0])], rtol=0, atol=1e-5)


def test_rows_prefilled_one_at_a_time_then_decoded_together_match_each_row_alone(trained_model):
    """The server's way: prefill each prompt alone into a free cache row, then decode all rows in one batch."""
    model = trained_model
    rows = [prompt(3, seed=30) + prompt(8, seed=31), prompt(7, seed=32) + prompt(8, seed=33),
            prompt(5, seed=34) + prompt(8, seed=35)]
    prompt_lengths = [3, 7, 5]
    with torch.no_grad():
        alone = [model(torch.tensor([row]))[0][0] for row in rows]
        cache = KVCache(model.config, 3, CONTEXT)
        for b, length in enumerate(prompt_lengths):
            cache.first_row = b
            logits, _ = model(torch.tensor([rows[b][:length]]), cache=cache, positions=torch.arange(length)[None])
            torch.testing.assert_close(logits[0], alone[b][:length], rtol=0, atol=1e-5)
        cache.first_row = 0
        for step in range(8):
            positions = torch.tensor([[length + step] for length in prompt_lengths])
            inputs = torch.tensor([[rows[b][length + step]] for b, length in enumerate(prompt_lengths)])
            logits, _ = model(inputs, cache=cache, positions=positions)
            for b, length in enumerate(prompt_lengths):
                torch.testing.assert_close(logits[b, 0], alone[b][length + step], rtol=0, atol=1e-5)


def test_a_moved_cache_row_continues_its_sequence(trained_model):
    model = trained_model
    row = prompt(12, seed=36)
    with torch.no_grad():
        alone, _ = model(torch.tensor([row]))
        cache = KVCache(model.config, 3, CONTEXT)
        cache.first_row = 2
        model(torch.tensor([row[:8]]), cache=cache, positions=torch.arange(8)[None])
        cache.move_row(2, 0)
        cache.first_row = 0
        for t in range(8, 12):
            logits, _ = model(torch.tensor([[row[t]]]), cache=cache, positions=torch.tensor([[t]]))
            torch.testing.assert_close(logits[0, 0], alone[0, t], rtol=0, atol=1e-5)


def test_cache_rows_of_a_smaller_batch_are_independent_of_later_rows(trained_model):
    """A cache sized for 3 rows serves a batch of 2; the unused row does not leak into them."""
    model = trained_model
    sequence = torch.tensor([prompt(10, seed=12), prompt(10, seed=13)])
    with torch.no_grad():
        full, _ = model(sequence)
        cache = KVCache(model.config, 3, CONTEXT)
        cache.keys[:, 2].fill_(3.0)
        cache.values[:, 2].fill_(-3.0)
        logits, _ = model(sequence, cache=cache, positions=torch.arange(10).expand(2, 10))
    torch.testing.assert_close(logits, full, rtol=0, atol=1e-5)


# --- sampling ------------------------------------------------------------------------------------


def random_logits(rows=64, vocab=50, seed=14, scale=3.0):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def test_temperature_zero_is_argmax():
    logits = random_logits()
    assert torch.equal(sample(logits, 0.0), logits.argmax(dim=-1))


def test_top_k_one_equals_greedy():
    logits = random_logits()
    generator = torch.Generator().manual_seed(15)
    for _ in range(5):
        assert torch.equal(sample(logits, 1.5, top_k=1, generator=generator), logits.argmax(dim=-1))


def test_top_k_one_generation_equals_greedy_generation(trained_model):
    ids = prompt(5, seed=16)
    assert generate(trained_model, ids, 20, temperature=1.0, top_k=1, seed=3) == generate(trained_model, ids, 20)


def test_top_k_keeps_only_the_k_largest_logits():
    logits = random_logits(rows=8)
    probs = logits_to_probs(logits, 1.0, top_k=5)
    kept = probs > 0
    assert torch.equal(kept.sum(dim=-1), torch.full((8,), 5))
    top5 = torch.topk(logits, 5, dim=-1).indices
    assert torch.equal(torch.gather(kept, 1, top5), torch.ones(8, 5, dtype=torch.bool))
    torch.testing.assert_close(probs.sum(dim=-1), torch.ones(8))


@pytest.mark.parametrize("top_p, expected_kept", [(0.4, 1), (0.7, 2), (0.81, 3), (0.99, 4)])
def test_top_p_keeps_the_smallest_nucleus_reaching_p(top_p, expected_kept):
    base = torch.tensor([0.5, 0.3, 0.15, 0.05])
    order = torch.tensor([2, 0, 3, 1])  # the same distribution, not sorted in the vocabulary
    probs_in = base[order]
    out = logits_to_probs(probs_in.log()[None], 1.0, top_p=top_p)[0]
    kept = out > 0
    assert int(kept.sum()) == expected_kept
    # The kept tokens are the most likely ones, each with its share of the kept mass.
    most_likely = torch.argsort(probs_in, descending=True)[:expected_kept]
    assert set(torch.nonzero(kept).flatten().tolist()) == set(most_likely.tolist())
    torch.testing.assert_close(out[kept], probs_in[kept] / probs_in[kept].sum())
    # And it is the smallest such set: without its least likely member the mass is below top_p.
    assert float(probs_in[most_likely[:-1]].sum()) < top_p <= float(probs_in[most_likely].sum())


def test_temperature_sharpens_and_flattens_the_distribution():
    logits = random_logits(rows=1, seed=17)[0]
    cold, warm = logits_to_probs(logits, 0.5), logits_to_probs(logits, 2.0)
    top = int(logits.argmax())
    assert cold[top] > torch.softmax(logits, -1)[top] > warm[top]


def test_same_seed_gives_the_same_sampled_output():
    model = random_model(seed=18)
    ids = prompt(3, seed=19)
    first = generate(model, ids, 20, temperature=1.0, seed=42)
    assert first == generate(model, ids, 20, temperature=1.0, seed=42)


def test_different_seeds_give_different_sampled_outputs():
    # A random model is close to uniform over 256 tokens: 20 draws coincide with negligible probability.
    model = random_model(seed=18)
    ids = prompt(3, seed=19)
    assert generate(model, ids, 20, temperature=1.0, seed=42) != generate(model, ids, 20, temperature=1.0, seed=43)


def test_sampling_follows_the_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).expand(20000, 4)
    draws = sample(logits, 1.0, generator=torch.Generator().manual_seed(20))
    frequencies = torch.bincount(draws, minlength=4).float() / len(draws)
    torch.testing.assert_close(frequencies, torch.softmax(logits[0], -1), rtol=0, atol=0.015)


def stop_loving_model(stop_id):
    """A real model whose output head strongly favours `stop_id`."""
    model = random_model(seed=21, tie_embeddings=False)
    bias = torch.zeros(VOCAB)
    bias[stop_id] = 50.0
    model.lm_head.register_forward_hook(lambda module, inputs, output: output + bias)
    return model


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_min_new_tokens_suppresses_the_stop_id(temperature):
    stop_id = 7
    model = stop_loving_model(stop_id)
    ids = prompt(4, seed=22)
    assert generate(model, ids, 20, temperature=temperature, stop_ids=(stop_id,)) == [stop_id]
    out = generate(model, ids, 20, temperature=temperature, stop_ids=(stop_id,), min_new_tokens=6)
    assert len(out) == 7
    assert stop_id not in out[:6]
    assert out[6] == stop_id


# --- fixed-prompt completions of the evaluate stage ------------------------------------------------


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    from model.tokenizer import Tokenizer, train_bpe

    rng = np.random.default_rng(0)
    words = ["river", "stone", "lantern", "quiet", "market", "garden", "yellow", "window", "morning", "candle",
             "the", "a", "under", "beside", "carried", "painted", "found", "old", "small", "bright"]
    sentences = sorted({" ".join(rng.choice(words, size=6)) + "." for _ in range(300)})
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.model"
    path.write_bytes(train_bpe(sentences, vocab_size=300, seed=0))
    return Tokenizer(path)


def biased_model(vocab_size, token_id):
    model = random_model(seed=23, vocab_size=vocab_size, tie_embeddings=False)
    bias = torch.zeros(vocab_size)
    bias[token_id] = 50.0
    model.lm_head.register_forward_hook(lambda module, inputs, output: output + bias)
    return model


def evaluate_params(max_new_tokens=5):
    from model.params import EvaluateParams

    return EvaluateParams(batch_size=1, eval_batches=1, max_new_tokens=max_new_tokens, temperature=0.0, top_k=5)


@pytest.mark.parametrize("chat, stop_piece", [(True, "<|endoftext|>"), (True, "<|user|>"), (True, "<0x0A>"),
                                              (False, "<|endoftext|>")])
def test_completions_leave_out_the_stop_token_that_ended_them(small_tokenizer, chat, stop_piece):
    from model.evaluation import completions

    stop_id = small_tokenizer.sp.piece_to_id(stop_piece)
    model = biased_model(small_tokenizer.vocab_size, stop_id)
    results = completions(model, small_tokenizer, chat, evaluate_params(), seed=0)
    assert len(results) == 3
    assert [completion for _, completion in results] == ["", "", ""]


def test_completions_decode_the_generated_tokens(small_tokenizer):
    from model.evaluation import completions

    word_id = small_tokenizer.encode("lantern")[0]
    model = biased_model(small_tokenizer.vocab_size, word_id)
    for prompt, completion in completions(model, small_tokenizer, True, evaluate_params(4), seed=0):
        assert completion == small_tokenizer.decode([word_id] * 4)
