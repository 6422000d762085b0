"""Generation: the KV cache against full forward passes, the serving kernel, and the sampling rules."""

import copy
import gc
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from model.generate import Sampling, Sequence, generate, logits_to_probs, next_tokens, random_stream
from model.gpt import KVCache
from serve.kernel import (
    PRECISIONS,
    RowwiseDecoder,
    RowwiseLinear,
    RowwiseRMSNorm,
    decoder_arguments,
    library,
    rowwise_cache,
    rowwise_model,
)
from tests.paths import REPO_ROOT
from tests.tiny import markov_chain, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 256
CONTEXT = 32


def random_model(seed=0, **overrides):
    return tiny_model(seed, **overrides).eval()


@pytest.fixture(scope="module")
def trained_model():
    """A tiny model trained briefly on a Markov chain, so its predictions are peaked, not near-uniform."""
    model = random_model(seed=1)
    model.train()
    tokens = torch.from_numpy(markov_chain(20000, seed=2, vocab_size=VOCAB).astype(np.int64))
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


@torch.no_grad()
def uncached_greedy(model, prompt_ids, max_tokens):
    """The slow reference: every step runs the whole sequence again, no cache."""
    tokens = list(prompt_ids)
    for _ in range(max_tokens):
        logits, _ = model(torch.tensor([tokens]))
        tokens.append(int(logits[0, -1].argmax()))
    return tokens[len(prompt_ids) :]


def greedy(max_tokens, **fields):
    return Sampling(max_tokens, temperature=0.0, **fields)


def test_cached_greedy_generation_equals_uncached_on_a_random_model():
    model = random_model(seed=5)
    ids = prompt(5)
    cached = generate(model, ids, greedy(24))
    assert len(cached) == 24
    assert cached == uncached_greedy(model, ids, 24)


def test_cached_greedy_generation_equals_uncached_on_a_trained_model(trained_model):
    ids = prompt(4, seed=6)
    cached = generate(trained_model, ids, greedy(25))
    assert len(cached) == 25
    assert cached == uncached_greedy(trained_model, ids, 25)


def test_generation_stops_at_the_context_end(trained_model):
    ids = prompt(CONTEXT - 3)
    assert len(generate(trained_model, ids, Sampling(100))) == 3
    with pytest.raises(ValueError, match="context"):
        generate(trained_model, prompt(CONTEXT), Sampling(5))


def decode(model, cache, row, tokens, start):
    """Logits (T, vocab) of `tokens` continuing cache `row` from position `start`."""
    logits, _ = model(
        torch.tensor([tokens]),
        cache=cache,
        rows=torch.tensor([row]),
        positions=torch.arange(start, start + len(tokens))[None],
    )
    return logits[0]


def test_cached_logits_in_chunks_equal_full_forward_logits(trained_model):
    model = trained_model
    sequence = prompt(CONTEXT, seed=7)
    with torch.no_grad():
        full, _ = model(torch.tensor([sequence]))
        cache = KVCache(model.config, 1, CONTEXT)
        chunks = [decode(model, cache, 0, sequence[:6], 0), decode(model, cache, 0, sequence[6:13], 6)]
        chunks += [decode(model, cache, 0, sequence[t : t + 1], t) for t in range(13, CONTEXT)]
    torch.testing.assert_close(torch.cat(chunks), full[0], rtol=0, atol=1e-5)


def test_rows_prefilled_one_at_a_time_then_decoded_together_match_each_row_alone(trained_model):
    """The server's way: prefill each prompt alone into its cache row (rows 2, 0, 1: any free row),
    then decode all rows in one batch at their own positions."""
    model = trained_model
    rows = [
        prompt(3, seed=30) + prompt(8, seed=31),
        prompt(7, seed=32) + prompt(8, seed=33),
        prompt(5, seed=34) + prompt(8, seed=35),
    ]
    prompt_lengths, cache_rows = [3, 7, 5], [2, 0, 1]
    with torch.no_grad():
        alone = [model(torch.tensor([row]))[0][0] for row in rows]
        cache = KVCache(model.config, 3, CONTEXT)
        for b, length in enumerate(prompt_lengths):
            logits = decode(model, cache, cache_rows[b], rows[b][:length], 0)
            torch.testing.assert_close(logits, alone[b][:length], rtol=0, atol=1e-5)
        for step in range(8):
            positions = torch.tensor([[length + step] for length in prompt_lengths])
            inputs = torch.tensor([[rows[b][length + step]] for b, length in enumerate(prompt_lengths)])
            logits, _ = model(inputs, cache=cache, rows=torch.tensor(cache_rows), positions=positions)
            for b, length in enumerate(prompt_lengths):
                torch.testing.assert_close(logits[b, 0], alone[b][length + step], rtol=0, atol=1e-5)


def test_a_cache_row_ignores_what_other_rows_hold(trained_model):
    model = trained_model
    sequence = prompt(10, seed=12)
    with torch.no_grad():
        full, _ = model(torch.tensor([sequence]))
        cache = KVCache(model.config, 3, CONTEXT)
        cache.keys.fill_(3.0)
        cache.values.fill_(-3.0)
        logits = decode(model, cache, 1, sequence, 0)
    torch.testing.assert_close(logits, full[0], rtol=0, atol=1e-5)


# --- batch invariance: a row's results never depend on the other rows --------------------------------


@pytest.mark.parametrize("precision", PRECISIONS)
def test_rowwise_linear_rows_are_bitwise_the_same_in_any_batch(precision):
    torch.manual_seed(24)
    for out_features, in_features in ((37, 20), (64, 256), (8, 13)):  # widths that are and are not multiples of 8
        layer = torch.nn.Linear(in_features, out_features, bias=False)
        rowwise = RowwiseLinear(layer.weight, precision)
        inputs = torch.randn(11, in_features)
        alone = [rowwise(inputs[i : i + 1])[0] for i in range(11)]
        for start, size in ((0, 11), (3, 5), (2, 4), (7, 2)):
            batch = rowwise(inputs[start : start + size])
            for i in range(size):
                assert torch.equal(batch[i], alone[start + i])
        tolerance = 1e-5 if precision == "fp32" else 0.02 * float(layer.weight.detach().abs().max()) * in_features**0.5
        torch.testing.assert_close(rowwise(inputs), layer(inputs), rtol=0, atol=tolerance)


def test_int8_rows_are_the_documented_integer_arithmetic():
    """Each input row rounded to int8 by its own largest magnitude, int8 weights by their row's, the products
    summed exactly, both scales applied: computed here in float64 (exact for these integer sums), and equal to
    the bit, whichever multiply-add the CPU has (AVX2's 16-wide steps, AVX-512 VNNI's 64-wide ones with the
    weights offset by 128), on widths that fill and do not fill those steps and the 4-row, 4-column tiles."""
    torch.manual_seed(25)
    for out_features, in_features, rows in ((37, 20, 11), (64, 256, 16), (8, 13, 3), (20, 333, 6), (6, 1280, 5)):
        weight = torch.randn(out_features, in_features)
        inputs = torch.randn(rows, in_features) * 4
        inputs[1] = 0.0  # a row of zeros has scale 0 and gives zeros
        layer = RowwiseLinear(weight, "int8")
        largest = inputs.abs().amax(dim=1)
        rounded = torch.round(inputs * torch.where(largest > 0, 127 / largest, 0.0)[:, None])
        assert rounded.abs().max() <= 127
        sums = rounded.double() @ layer.weight.double().T
        expected = sums.float() * (largest / 127)[:, None] * layer.scale[None, :]
        torch.testing.assert_close(layer(inputs), expected, rtol=0, atol=0)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_decoded_logits_of_a_row_are_bitwise_the_same_alone_and_batched(trained_model, precision):
    """The server's way: its model prefills, its decode kernel steps."""
    model = rowwise_model(trained_model, precision)
    sequences = [prompt(length, seed=40 + length) for length in (5, 9, 3, 12, 7)]
    with torch.no_grad():
        cache = rowwise_cache(model.config, 5, CONTEXT, precision)
        decoder = RowwiseDecoder(model, cache)
        for row, sequence in enumerate(sequences):
            decode(model, cache, row, sequence[:-1], 0)

        def step(batch):
            return decoder([sequences[row][-1] for row in batch], batch, [len(sequences[row]) - 1 for row in batch])

        alone = [step([row])[0] for row in range(len(sequences))]
        for batch in ([0, 1, 2, 3, 4], [3, 1], [4, 0, 2]):
            for b, row in enumerate(batch):
                assert torch.equal(step(batch)[b], alone[row])


def test_the_kernels_rms_norm_equals_torchs():
    norm = torch.nn.RMSNorm(37, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    rows = torch.randn(5, 37) * 3
    torch.testing.assert_close(RowwiseRMSNorm(norm)(rows), norm(rows), rtol=1e-5, atol=1e-6)


# int8 rounds each weight to 1/254 of its row's largest: logits within a few percent of their largest.
@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-6), ("int8", 0.02)])
def test_the_kernels_decode_step_equals_the_models_forward_pass(trained_model, precision, tolerance):
    sequences = [prompt(length, seed=50 + length) for length in (6, 11, 2)]
    model = rowwise_model(trained_model, precision)
    with torch.no_grad():
        cache = rowwise_cache(trained_model.config, 3, CONTEXT, precision)  # int8: a 16-bit cache
        for row, sequence in enumerate(sequences):
            decode(model, cache, row, sequence[:-1], 0)
        logits = RowwiseDecoder(model, cache)([s[-1] for s in sequences], [0, 1, 2], [len(s) - 1 for s in sequences])
        for row, sequence in enumerate(sequences):
            expected = trained_model(torch.tensor([sequence]))[0][0, -1]
            atol = tolerance * float(expected.abs().max())
            torch.testing.assert_close(logits[row], expected, rtol=0, atol=atol)


def test_a_copied_layer_computes_on_its_own_weights_after_the_original_is_gone():
    """Nothing in a layer or decoder points into memory it does not hold: a copy outlives its original."""
    layer = RowwiseLinear(torch.randn(24, 16), "int8")
    inputs = torch.randn(3, 16)
    expected = layer(inputs)
    copied = copy.deepcopy(layer)
    del layer
    gc.collect()
    torch.testing.assert_close(copied(inputs), expected, rtol=0, atol=0)


def os_threads():
    return len(os.listdir("/proc/self/task"))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_the_kernels_threads_change_no_bit_and_end_with_the_thread_that_used_them(trained_model, precision):
    """Each output element is computed whole by one of the kernel's threads, so their number changes nothing;
    a thread's workers are its own and end with it (an engine's, when the engine closes)."""
    sequences = [prompt(length, seed=70 + length) for length in (3, 9, 5, 12, 2)]
    model = rowwise_model(trained_model, precision)

    def logits(threads):
        cache = rowwise_cache(trained_model.config, len(sequences), CONTEXT, precision)
        for row, sequence in enumerate(sequences):
            decode(model, cache, row, sequence[:-1], 0)
        decoder = RowwiseDecoder(model, cache, threads)
        return decoder([s[-1] for s in sequences], range(len(sequences)), [len(s) - 1 for s in sequences])

    before = os_threads()
    results = {}
    for threads in (1, 2, 3):
        worker = threading.Thread(target=lambda threads=threads: results.update({threads: logits(threads)}))
        worker.start()
        worker.join()
    assert torch.equal(results[1], results[2]) and torch.equal(results[1], results[3])
    deadline = time.monotonic() + 5  # a finished thread's own cleanup (which ends its workers) runs after join()
    while os_threads() != before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert os_threads() == before


def swap(items, i, j):
    items[i], items[j] = items[j], items[i]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda args: swap(args["weights"], 6, 8), "layers.0.mlp.gate_proj.weight must have shape"),  # gate, down
        (lambda args: args.update(keys=args["keys"].half()), "cache's keys and values must be Half, not Float"),
        (lambda args: args.update(head_scale=None), "the output head: an int8 weight needs its scale"),
        (lambda args: args.update(rope_cos=args["rope_cos"][:, :3]), "rotary tables must be"),
        (lambda args: args.update(embed=args["embed"].t()), "embed must be contiguous"),
        (lambda args: args.update(threads=0), "threads must be at least 1"),
    ],
    ids=["weight order", "cache dtype", "missing scale", "rotary tables", "strided", "threads"],
)
def test_the_decoder_checks_the_model_and_cache_it_is_given(trained_model, change, message):
    """A wrong argument is a RuntimeError naming it, when the decoder is made (not a crash or garbage later)."""
    model = rowwise_model(trained_model, "int8")
    args = decoder_arguments(model, rowwise_cache(trained_model.config, 3, CONTEXT, "fp32"), threads=1)
    change(args)
    with pytest.raises(RuntimeError, match=message):
        torch.classes.rowwise.Decoder(*args.values())


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda ops: ops.linear(torch.ones(2, 4), torch.ones(3, 4), None, 0), "threads must be at least 1, not 0"),
        (lambda ops: ops.linear(torch.ones(2, 0), torch.ones(3, 0), None, 1), "at least one feature"),
        (
            lambda ops: ops.linear(torch.ones(2, 4), torch.ones(3, 4, dtype=torch.int8), torch.ones(2), 1),
            "the weight's scale must have shape",
        ),
        (lambda ops: ops.rms_norm(torch.ones(2, 0), torch.ones(0), 1e-5), "the norm's weight must be"),
    ],
    ids=["threads", "no features", "scale shape", "empty norm"],
)
def test_the_kernels_operators_check_what_they_are_given(call, message):
    """A wrong argument is a RuntimeError naming it (a zero count of threads or features divided by zero before)."""
    with pytest.raises(RuntimeError, match=message):
        call(library())


@pytest.mark.parametrize(
    "tokens, rows, positions, message",
    [
        ([0, VOCAB], [0, 1], [0, 0], f"token {VOCAB} is not in the vocabulary of {VOCAB}"),
        ([0, -1], [0, 1], [0, 0], "token -1 is not in the vocabulary"),
        ([0, 1], [0, 3], [0, 0], "row 3 is not in the cache's 3"),
        ([0, 1], [0, 1], [0, CONTEXT], f"position {CONTEXT} is past the cache's {CONTEXT}"),
        ([0, 1], [0], [0, 0], "one entry per sequence"),
    ],
    ids=["token", "negative token", "row", "position", "lengths"],
)
def test_a_decode_step_checks_what_it_indexes(trained_model, tokens, rows, positions, message):
    decoder = RowwiseDecoder(
        rowwise_model(trained_model, "int8"), rowwise_cache(trained_model.config, 3, CONTEXT, "int8")
    )
    with pytest.raises(RuntimeError, match=message):
        decoder(tokens, rows, positions)


def test_a_model_with_more_than_the_kernel_computes_is_refused(trained_model):
    """The decode step is model/gpt.py written again in C++: what it does not implement must stop the server,
    not give other tokens than the model."""
    grown = copy.deepcopy(trained_model)
    grown.layers[1].post_norm = torch.nn.RMSNorm(grown.config.d_model)
    with pytest.raises(ValueError, match=r"does not implement \['layers.1.post_norm.weight'\]"):
        RowwiseDecoder(rowwise_model(grown, "fp32"), rowwise_cache(grown.config, 1, CONTEXT, "fp32"))

    class GroupedQueryConfig(type(trained_model.config)):
        n_kv_heads: int = 2

    grown = copy.deepcopy(trained_model)
    grown.config = GroupedQueryConfig(**trained_model.config.model_dump())
    with pytest.raises(ValueError, match=r"does not implement \['n_kv_heads'\]"):
        RowwiseDecoder(rowwise_model(grown, "fp32"), rowwise_cache(grown.config, 1, CONTEXT, "fp32"))


# --- sampling ------------------------------------------------------------------------------------


def random_logits(rows=64, vocab=50, seed=14, scale=3.0):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def sample(logits, sampling, seed=None):
    """next_tokens for rows that all sample with `sampling`, each with its own stream."""
    sequences = [Sequence([0], sampling, random_stream(seed, choice)) for choice in range(logits.shape[0])]
    return torch.tensor(next_tokens(logits, sequences))


def test_temperature_zero_and_temperatures_below_the_greedy_threshold_are_argmax():
    logits = random_logits()
    for temperature in (0.0, 1e-9):
        assert torch.equal(sample(logits, Sampling(1, temperature)), logits.argmax(dim=-1))


def test_top_k_one_equals_greedy():
    logits = random_logits()
    for seed in range(5):
        assert torch.equal(sample(logits, Sampling(1, 1.5, top_k=1), seed), logits.argmax(dim=-1))


def test_top_k_one_generation_equals_greedy_generation(trained_model):
    ids = prompt(5, seed=16)
    assert generate(trained_model, ids, Sampling(20, 1.0, top_k=1), seed=3) == generate(trained_model, ids, greedy(20))


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
    first = generate(model, ids, Sampling(20), seed=42)
    assert first == generate(model, ids, Sampling(20), seed=42)


def test_every_bit_of_a_64_bit_seed_counts():
    # A random model is close to uniform over 256 tokens: 20 draws coincide with negligible probability.
    model = random_model(seed=18)
    ids = prompt(3, seed=19)
    texts = {tuple(generate(model, ids, Sampling(20), seed=seed)) for seed in (0, 1, 2**32, 2**63 - 1, -(2**63), -1)}
    assert len(texts) == 6


def test_the_choices_of_a_seeded_request_differ_and_choice_0_is_the_single_choice():
    streams = [random_stream(7, choice).random(4).tolist() for choice in range(3)]
    assert len({tuple(stream) for stream in streams}) == 3
    assert random_stream(7).random(4).tolist() == streams[0]


def test_sampling_follows_the_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).expand(20000, 4)
    draws = sample(logits, Sampling(1), seed=20)
    frequencies = torch.bincount(draws, minlength=4).float() / len(draws)
    torch.testing.assert_close(frequencies, torch.softmax(logits[0], -1), rtol=0, atol=0.015)


@pytest.mark.parametrize(
    "sampling", [Sampling(1, 0.8, top_p=0.9), Sampling(1, 1.3, top_k=40, top_p=0.5), Sampling(1, 0.0)]
)
def test_a_rows_token_does_not_depend_on_the_rows_sampled_beside_it(sampling):
    """Peaked rows (a narrow nucleus) and flat ones (a nucleus wider than the candidates), alone and together."""
    logits = torch.cat(
        [random_logits(rows=4, vocab=400, seed=25, scale=8.0), random_logits(rows=4, vocab=400, seed=26, scale=0.01)]
    )
    for seed in range(10):
        together = next_tokens(logits, [Sequence([0], sampling, random_stream(seed, row)) for row in range(8)])
        alone = [
            next_tokens(logits[row : row + 1], [Sequence([0], sampling, random_stream(seed, row))])[0]
            for row in range(8)
        ]
        assert together == alone


def stop_loving_model(stop_id):
    """A real model whose output head strongly favours `stop_id`."""
    model = random_model(seed=21, tie_embeddings=False)
    bias = torch.zeros(VOCAB)
    bias[stop_id] = 50.0
    model.lm_head.register_forward_hook(lambda module, inputs, output: output + bias)
    return model


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_min_tokens_suppresses_the_stop_id(temperature):
    stop_id = 7
    model = stop_loving_model(stop_id)
    ids = prompt(4, seed=22)
    assert generate(model, ids, Sampling(20, temperature, stop_ids=(stop_id,))) == [stop_id]
    out = generate(model, ids, Sampling(20, temperature, min_tokens=6, stop_ids=(stop_id,)))
    assert len(out) == 7
    assert stop_id not in out[:6]
    assert out[6] == stop_id


# --- fixed-prompt completions of the evaluate stage ------------------------------------------------


def biased_model(vocab_size, token_id):
    model = random_model(seed=23, vocab_size=vocab_size, tie_embeddings=False)
    bias = torch.zeros(vocab_size)
    bias[token_id] = 50.0
    model.lm_head.register_forward_hook(lambda module, inputs, output: output + bias)
    return model


def evaluate_params(max_new_tokens=5):
    from model.params import EvaluateParams

    return EvaluateParams(batch_size=1, eval_batches=1, max_new_tokens=max_new_tokens, temperature=0.0, top_k=5)


@pytest.mark.parametrize(
    "chat, stop_piece", [(True, "<|endoftext|>"), (True, "<|user|>"), (True, "<0x0A>"), (False, "<|endoftext|>")]
)
def test_completions_leave_out_the_stop_token_that_ended_them(tokenizer, chat, stop_piece):
    from model.completions import completions

    stop_id = tokenizer.sp.piece_to_id(stop_piece)
    model = biased_model(tokenizer.vocab_size, stop_id)
    results = completions(model, tokenizer, chat, evaluate_params(), seed=0)
    assert len(results) == 3
    assert [completion for _, completion in results] == ["", "", ""]


def test_completions_decode_the_generated_tokens(tokenizer):
    from model.completions import completions

    word_id = tokenizer.encode("lantern")[0]
    model = biased_model(tokenizer.vocab_size, word_id)
    for _, completion in completions(model, tokenizer, True, evaluate_params(4), seed=0):
        assert completion == tokenizer.decode([word_id] * 4)


# --- building the kernel: at set-up, never by the server ---------------------------------------------


def kernel_script(tmp_path, code, compiler):
    """Runs `code` in a fresh process whose kernel build folder is `tmp_path` (so nothing is built there yet)
    and whose C++ compiler is `compiler`."""
    setup = f"import serve.kernel as kernel; from pathlib import Path; kernel.BUILD = Path({str(tmp_path)!r})\n"
    return subprocess.run(
        [sys.executable, "-c", setup + code],
        capture_output=True,
        text=True,
        env={**os.environ, "CXX": compiler},
        cwd=REPO_ROOT,
    )


def test_set_up_without_a_compiler_says_so_in_one_line_and_goes_on(tmp_path):
    result = kernel_script(tmp_path, "kernel.build()", "no-such-compiler")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1 and "no C++ compiler 'no-such-compiler' found" in result.stdout
    assert "install g++" in result.stdout and not list(tmp_path.glob("*.so"))


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed here")
def test_set_up_builds_the_kernel_every_time_it_runs_so_a_new_cpu_or_torch_gets_one():
    """The library is made for this source, these flags, this CPU and this torch. With a file stamp in the Makefile,
    `make setup` would do nothing after the CPU or torch changed, while the server tells the user to run it."""
    dry_run = subprocess.run(["make", "--dry-run", "setup"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert dry_run.returncode == 0, dry_run.stderr
    assert "python -m serve.kernel" in dry_run.stdout


@pytest.mark.parametrize(
    "compiler, cause",
    [("no-such-compiler", "building it needs a C++ compiler: install g++"), ("c++", "run `make setup`")],
)
def test_a_kernel_that_is_not_built_is_refused_with_what_to_do_not_compiled(tmp_path, compiler, cause):
    result = kernel_script(tmp_path, "kernel.library()", compiler)
    assert result.returncode == 1 and "KernelBuildError" in result.stderr and cause in result.stderr
    assert not list(tmp_path.iterdir())  # nothing was compiled
