"""The training loop: it learns, its schedule, the finetune loss mask, checkpoints and resuming,
non-finite losses, DDP on gloo, and the training params' checks.

Run as a script (`torchrun --nproc_per_node 2 tests/test_training.py OUT_DIR`) this file is also the
DDP worker of `test_two_gloo_processes_train_like_one_process_with_the_same_global_batch`.
"""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # as a torchrun worker script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.batches import batch_rng, dialogue_batch, pretraining_batch  # noqa: E402
from model.encoding import encode_dialogues  # noqa: E402
from model.evaluation import evaluation_windows, mean_loss  # noqa: E402
from model.gpt import IGNORE_INDEX, load_model  # noqa: E402
from model.params import TrainParams  # noqa: E402
from model.special_tokens import ASSISTANT_ID, END_OF_TEXT_ID, USER_ID  # noqa: E402
from model.training import (  # noqa: E402
    CPUMuon,
    RunPaths,
    Runtime,
    TrainingError,
    build_optimizers,
    checkpoint_identity,
    learning_rate,
    lr_multiplier,
    resume_state,
    set_learning_rates,
    train,
)
from tests import tiny  # noqa: E402
from tests.paths import REPO_ROOT  # noqa: E402

VOCAB = 128
CONTEXT = 16


def tiny_model(seed=0, **overrides):
    return tiny.tiny_model(seed, vocab_size=VOCAB, context_length=CONTEXT, **overrides)


CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def scratch_cwd(tmp_path, monkeypatch):
    """dvclive writes nothing into the repo."""
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.chdir(tmp_path)


# --- fixtures: a Markov chain, a tiny model, training params --------------------------------------


def markov_chain(n_tokens, seed):
    return tiny.markov_chain(n_tokens, seed, VOCAB)


def train_params(**overrides):
    values = dict(
        steps=8,
        batch_size=4,
        grad_accum=1,
        optimizer="adamw",
        lr=1e-2,
        embed_lr=1e-2,
        matrix_lr=2e-2,
        schedule="cosine",
        min_lr=1e-3,
        warmup_steps=2,
        decay_fraction=0.5,
        weight_decay=0.1,
        beta1=0.9,
        beta2=0.95,
        grad_clip=1.0,
        log_every=2,
        eval_every=4,
        eval_batches=2,
        device="cpu",
        bf16=False,
        compile=False,
    )
    values.update(overrides)
    return TrainParams(**values)


def chain_sampler(tokens, params, seed=0, context=CONTEXT):
    def sample_batch(step, micro):
        return pretraining_batch(tokens, batch_rng(seed, step, micro), params.batch_size, context)

    return sample_batch


def run_train(
    run_dir,
    model,
    params,
    sample_batch,
    evaluate=None,
    identity=None,
    runtime=None,
    unique_tokens=4000,
    checkpoint_every=4,
):
    """train() with its outputs under `run_dir`; returns the final metrics."""
    run_dir = Path(run_dir)
    identity = identity if identity is not None else checkpoint_identity(model.config, params, 0, {"data": "chain"})
    paths = RunPaths(run_dir / "checkpoint.safetensors", run_dir / "live", run_dir / "model")
    return train(
        model,
        params,
        sample_batch=sample_batch,
        evaluate=evaluate or (lambda model: {}),
        paths=paths,
        identity=identity,
        unique_tokens=unique_tokens,
        checkpoint_every=checkpoint_every,
        desc="test",
        runtime=runtime,
    )


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"tensor {name} differs"


# --- learning --------------------------------------------------------------------------------------


RECIPES = {
    "adamw-cosine": dict(optimizer="adamw", schedule="cosine", lr=3e-2, min_lr=3e-3),
    "muon-wsd": dict(
        optimizer="muon", schedule="wsd", lr=3e-2, embed_lr=3e-2, matrix_lr=5e-2, min_lr=0.0, decay_fraction=0.4
    ),
}


@pytest.mark.parametrize("recipe", RECIPES)
def test_training_loss_falls_to_the_entropy_floor_of_a_markov_chain(tmp_path, recipe):
    train_tokens, heldout = markov_chain(40000, seed=1), markov_chain(4000, seed=2)
    batches = list(evaluation_windows(heldout, 4, 8, CONTEXT))

    def evaluate(model):
        return {"val/loss": mean_loss(model, batches, CPU)}

    model = tiny_model(seed=3)
    params = train_params(
        steps=60, batch_size=32, warmup_steps=5, weight_decay=0.0, log_every=10, eval_every=60, **RECIPES[recipe]
    )
    initial = evaluate(model)["val/loss"]
    final = run_train(tmp_path, model, params, chain_sampler(train_tokens, params), evaluate, checkpoint_every=60)[
        "val/loss"
    ]
    floor = math.log(2)
    assert initial > math.log(VOCAB) - 0.5  # an untrained model is near uniform
    assert final < initial - 3.0
    assert floor - 0.05 < final < floor + 0.25


def test_training_saves_the_final_model_and_a_complete_checkpoint(tmp_path):
    model = tiny_model()
    params = train_params(steps=4)
    run_train(tmp_path, model, params, chain_sampler(markov_chain(2000, seed=1), params))
    saved = load_model(tmp_path / "model")
    assert_same_weights(saved.weights(), model.weights())
    with safe_open(tmp_path / "checkpoint.safetensors", framework="pt") as f:
        metadata = f.metadata()
    assert (metadata["step"], metadata["complete"]) == ("4", "1")


# --- the learning-rate schedule --------------------------------------------------------------------


def test_learning_rate_warmup_starts_small_and_peaks_at_the_end_of_warmup():
    params = train_params(steps=100, lr=1e-3, min_lr=1e-4, warmup_steps=10)
    rates = [learning_rate(step, params) for step in range(10)]
    assert rates[0] == pytest.approx(params.lr / params.warmup_steps)
    assert all(a < b for a, b in zip(rates, rates[1:]))
    assert rates[-1] == pytest.approx(params.lr)
    assert learning_rate(params.warmup_steps, params) == pytest.approx(params.lr)


def test_learning_rate_decays_by_cosine_to_min_lr_at_the_last_step():
    params = train_params(steps=100, lr=1e-3, min_lr=1e-4, warmup_steps=10)
    rates = [learning_rate(step, params) for step in range(10, 101)]
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert learning_rate(params.steps, params) == pytest.approx(params.min_lr)
    halfway = params.warmup_steps + (params.steps - params.warmup_steps) // 2
    assert learning_rate(halfway, params) == pytest.approx((params.lr + params.min_lr) / 2)


def test_learning_rate_without_warmup_starts_at_the_peak():
    params = train_params(steps=50, lr=2e-3, min_lr=0.0, warmup_steps=0)
    assert learning_rate(0, params) == pytest.approx(params.lr)
    assert learning_rate(50, params) == pytest.approx(0.0, abs=1e-12)


def test_wsd_holds_the_peak_then_decays_linearly_to_min_lr_over_the_decay_fraction():
    params = train_params(steps=100, lr=1e-3, min_lr=1e-5, warmup_steps=10, schedule="wsd", decay_fraction=0.2)
    assert learning_rate(0, params) == pytest.approx(1e-4)
    assert all(learning_rate(step, params) == pytest.approx(1e-3) for step in range(9, 81))
    decay = [learning_rate(step, params) for step in range(80, 101)]
    steps = np.diff(decay)
    assert np.allclose(steps, steps[0]) and steps[0] < 0  # linear
    assert learning_rate(100, params) == pytest.approx(1e-5)


def test_wsd_with_decay_fraction_one_decays_from_the_start():
    params = train_params(steps=50, lr=2e-3, min_lr=0.0, warmup_steps=0, schedule="wsd", decay_fraction=1.0)
    assert learning_rate(0, params) == pytest.approx(2e-3)
    assert learning_rate(25, params) == pytest.approx(1e-3)
    assert learning_rate(50, params) == pytest.approx(0.0, abs=1e-12)


def test_every_group_follows_the_schedule_from_its_own_peak():
    model = tiny_model(tie_embeddings=False)
    params = train_params(
        optimizer="muon",
        schedule="wsd",
        steps=10,
        warmup_steps=0,
        lr=1e-3,
        embed_lr=5e-3,
        matrix_lr=2e-2,
        min_lr=1e-4,
        decay_fraction=0.5,
    )
    optimizers = build_optimizers(model, params)
    set_learning_rates(optimizers, lr_multiplier(9, params))
    rates = sorted(group["lr"] for optimizer in optimizers.values() for group in optimizer.param_groups)
    factor = learning_rate(9, params) / params.lr
    assert 0.1 < factor < 1
    assert rates == pytest.approx(sorted([1e-3 * factor, 1e-3 * factor, 5e-3 * factor, 2e-2 * factor]))


# --- optimizers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_muon_gets_the_hidden_matrices_and_adamw_everything_else_once(tied):
    model = tiny_model(tie_embeddings=tied)
    optimizers = build_optimizers(model, train_params(optimizer="muon"))
    muon = [p for group in optimizers["muon"].param_groups for p in group["params"]]
    adamw = [p for group in optimizers["adamw"].param_groups for p in group["params"]]
    assert isinstance(optimizers["muon"], torch.optim.Muon)
    assert muon and all(p.dim() == 2 for p in muon)
    block_matrices = {id(p) for layer in model.layers for p in layer.parameters() if p.dim() == 2}
    assert {id(p) for p in muon} == block_matrices
    assert model.embed.weight in adamw and all(
        p.dim() == 1 for p in adamw if p is not model.embed.weight and p is not model.lm_head.weight
    )
    everything = [id(p) for p in muon + adamw]
    assert sorted(everything) == sorted(id(p) for p in model.parameters())  # each exactly once


def test_adamw_recipe_is_one_adamw_with_decay_on_matrices_only():
    model = tiny_model(tie_embeddings=False)
    optimizers = build_optimizers(model, train_params(optimizer="adamw", weight_decay=0.1))
    assert list(optimizers) == ["adamw"]
    for group in optimizers["adamw"].param_groups:
        assert all((p.dim() == 2) == (group["weight_decay"] == 0.1) for p in group["params"])


def test_cpu_muon_makes_torch_muons_update_in_fp32():
    torch.manual_seed(0)
    initial = torch.randn(24, 40)
    weights = [torch.nn.Parameter(initial.clone()) for _ in range(2)]
    grads = [torch.randn(24, 40) for _ in range(3)]
    for weight, optimizer_class in zip(weights, (torch.optim.Muon, CPUMuon)):
        optimizer = optimizer_class([weight], lr=0.05, weight_decay=0.1)
        for grad in grads:
            weight.grad = grad.clone()
            optimizer.step()
    # The same update; bf16 rounding in torch's Newton-Schulz is all that differs.
    torch.testing.assert_close(weights[1], weights[0], rtol=0, atol=5e-3)
    assert not torch.equal(weights[1], weights[0])
    assert (weights[1] - initial).abs().max() > 0.05  # and it did move the weights
    assert torch.optim._muon._zeropower_via_newtonschulz.__module__ == "torch.optim._muon"  # restored


def test_the_accelerator_path_compile_bf16_and_fused_adamw_trains_on_cpu(tmp_path):
    """torch.compile, bf16 autocast and the fused AdamW kernel are what a GPU run uses: run them here so
    they cannot break unseen."""
    tokens = markov_chain(4000, seed=1)
    params = train_params(optimizer="muon", schedule="wsd", steps=6, log_every=2, eval_every=6)
    heldout = list(evaluation_windows(markov_chain(1000, seed=2), 2, 4, CONTEXT))
    model = tiny_model(seed=0)
    initial = mean_loss(model, heldout, CPU)
    runtime = Runtime(CPU, 0, 1, compile=True, bf16=True, fused=True)
    metrics = run_train(
        tmp_path,
        model,
        params,
        chain_sampler(tokens, params),
        lambda m: {"val/loss": mean_loss(m, heldout, CPU)},
        runtime=runtime,
        checkpoint_every=6,
    )
    assert metrics["val/loss"] < initial - 0.3
    assert load_model(tmp_path / "model").weights().keys() == model.weights().keys()


def test_epochs_are_logged_as_tokens_trained_over_unique_tokens(tmp_path):
    params = train_params(steps=4, log_every=2, eval_every=4)
    run_train(tmp_path, tiny_model(), params, chain_sampler(markov_chain(2000, seed=1), params), unique_tokens=256)
    with safe_open(tmp_path / "checkpoint.safetensors", framework="pt") as f:
        rows = json.loads(f.metadata()["history"])
    per_step = params.batch_size * CONTEXT
    assert [row["train/tokens"] for row in rows] == [2 * per_step, 4 * per_step]
    assert [row["train/epochs"] for row in rows] == [2 * per_step / 256, 4 * per_step / 256]


# --- batches ---------------------------------------------------------------------------------------


def test_pretraining_batch_targets_are_the_inputs_shifted_by_one():
    tokens = np.arange(1000, dtype=np.uint16)
    inputs, targets = pretraining_batch(tokens, batch_rng(0, 3, 0), 6, CONTEXT)
    assert inputs.shape == targets.shape == (6, CONTEXT)
    assert inputs.dtype == targets.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert torch.equal(targets - inputs, torch.ones_like(inputs))  # contiguous windows of 0..999


def test_batches_are_a_pure_function_of_seed_step_and_micro_batch():
    tokens = markov_chain(3000, seed=1)
    a = pretraining_batch(tokens, batch_rng(7, 5, 1), 4, CONTEXT)
    b = pretraining_batch(tokens, batch_rng(7, 5, 1), 4, CONTEXT)
    c = pretraining_batch(tokens, batch_rng(7, 6, 1), 4, CONTEXT)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_evaluation_windows_on_too_short_a_split_name_the_context_length():
    with pytest.raises(ValueError, match="context_length"):
        list(evaluation_windows(np.arange(CONTEXT, dtype=np.uint16), 2, 2, CONTEXT))


# --- the finetune loss mask ------------------------------------------------------------------------

SUBJECTS = [
    "The old baker",
    "My cousin",
    "A tired pilot",
    "Our neighbour",
    "The young painter",
    "Every student",
    "That quiet farmer",
    "The museum guide",
    "A clever fox",
    "Her brother",
    "The night nurse",
    "Some musicians",
    "The river captain",
    "A curious child",
    "The shop owner",
]
VERBS = [
    "carried",
    "painted",
    "borrowed",
    "repaired",
    "forgot",
    "described",
    "ordered",
    "found",
    "sold",
    "cleaned",
    "measured",
    "hid",
    "wrapped",
    "followed",
    "watched",
]
OBJECTS = [
    "a basket of pears",
    "the blue bicycle",
    "three wooden chairs",
    "an umbrella",
    "the morning paper",
    "a map of the valley",
    "two loaves of bread",
    "the broken clock",
    "a jar of honey",
    "the garden gate",
    "seven paper lanterns",
    "a winter coat",
    "the kitchen table",
    "an old violin",
    "a box of nails",
]
ENDINGS = [
    "yesterday.",
    "before lunch.",
    "after the storm.",
    "at the market.",
    "on Sunday.",
    "for the party.",
    "without a word.",
    "near the station.",
    "in the rain.",
    "by the lake.",
]


def made_up_sentences(n, seed):
    rng = np.random.default_rng(seed)
    sentences = set()
    while len(sentences) < n:
        parts = [words[rng.integers(len(words))] for words in (SUBJECTS, VERBS, OBJECTS, ENDINGS)]
        sentences.add(" ".join(parts))
    return sorted(sentences)


@pytest.fixture(scope="module")
def dialogues():
    """20 dialogues of 2 to 5 turns (some end on the user, some on the assistant)."""
    sentences = made_up_sentences(120, seed=1)
    rng = np.random.default_rng(2)
    return [
        [sentences[i] for i in rng.choice(len(sentences), size=int(rng.integers(2, 6)), replace=False)]
        for _ in range(20)
    ]


@pytest.fixture(scope="module")
def dialogue_arrays(tokenizer, dialogues):
    """(tokens, mask, offsets) as the encode stage stores them."""
    return encode_dialogues(tokenizer, dialogues)


def dialogue_ids(arrays, index):
    tokens, _, offsets = arrays
    return tokens[offsets[index] : offsets[index + 1]].astype(np.int64)


def test_dialogue_batch_targets_are_the_next_token_exactly_on_assistant_replies(tokenizer, dialogues, dialogue_arrays):
    picks = np.arange(len(dialogues))
    inputs, targets = dialogue_batch(*dialogue_arrays, picks, context_length=512)
    for row, pick in enumerate(picks):
        ids = dialogue_ids(dialogue_arrays, pick)
        n = len(ids) - 1
        assert inputs[row, :n].tolist() == ids[:-1].tolist()
        kept = (targets[row, :n] != IGNORE_INDEX).numpy()
        assert targets[row, :n][kept].tolist() == ids[1:][kept].tolist()
        # The kept targets spell the assistant's replies, each with the newline that ends it, and nothing else.
        replies = "".join(f"{reply}\n" for reply in dialogues[pick][1::2])
        assert tokenizer.decode(targets[row, :n][kept].tolist()) == replies
        # The closing <|endoftext|> is learned only after an assistant reply.
        assert kept[-1] == (len(dialogues[pick]) % 2 == 0)
        assert ids[-1] == END_OF_TEXT_ID


def test_dialogue_batch_ignores_user_turns_and_role_tokens(tokenizer, dialogues, dialogue_arrays):
    picks = np.arange(len(dialogues))
    inputs, targets = dialogue_batch(*dialogue_arrays, picks, context_length=512)
    for row, pick in enumerate(picks):
        ids = dialogue_ids(dialogue_arrays, pick)
        n = len(ids) - 1
        ignored = (targets[row, :n] == IGNORE_INDEX).numpy()
        next_ids = ids[1:]
        role_positions = np.isin(next_ids, [USER_ID, ASSISTANT_ID])
        assert role_positions.sum() == len(dialogues[pick]) - 1  # every role token but the first is a target slot
        assert ignored[role_positions].all()
        # The role line's newline belongs to the prompt (chat_prompt supplies it), not to the reply.
        after_role = np.flatnonzero(role_positions) + 1
        assert ignored[after_role[after_role < n]].all()
        ignored_text = tokenizer.decode([int(i) for i in next_ids[ignored] if i not in (USER_ID, ASSISTANT_ID)])
        for user_turn in dialogues[pick][0::2]:
            assert user_turn in ignored_text
        for reply in dialogues[pick][1::2]:
            assert reply not in ignored_text


def test_dialogue_batch_pads_short_rows_with_ignored_targets(dialogues, dialogue_arrays):
    picks = np.arange(len(dialogues))
    lengths = [len(dialogue_ids(dialogue_arrays, p)) for p in picks]
    assert len(set(lengths)) > 1
    inputs, targets = dialogue_batch(*dialogue_arrays, picks, context_length=512, pad_id=5)
    assert inputs.shape == targets.shape == (len(picks), max(lengths) - 1)
    for row, length in enumerate(lengths):
        assert (inputs[row, length - 1 :] == 5).all()
        assert (targets[row, length - 1 :] == IGNORE_INDEX).all()


def test_dialogue_batch_rows_never_cross_into_the_next_dialogue(dialogue_arrays):
    tokens, mask, offsets = dialogue_arrays
    n_dialogues = len(offsets) - 1
    context = 12
    assert max(np.diff(offsets)) > context + 1  # some dialogues need a window
    for step in range(10):
        rng = batch_rng(0, step, 0)
        picks = rng.integers(0, n_dialogues, size=8)
        inputs, targets = dialogue_batch(tokens, mask, offsets, picks, context, rng)
        assert inputs.shape[1] <= context
        for row, pick in enumerate(picks):
            ids = dialogue_ids(dialogue_arrays, pick)
            reply = mask[offsets[pick] : offsets[pick + 1]]
            width = min(len(ids) - 1, context)
            # The row's inputs are a window of its own dialogue, with room for the last target inside it...
            starts = [s for s in range(len(ids) - width) if ids[s : s + width].tolist() == inputs[row, :width].tolist()]
            assert starts, f"row {row} is not a window of dialogue {pick}"
            s = starts[0]
            # ...and its targets are that window's next tokens where they are assistant replies.
            expected = np.where(reply[s + 1 : s + width + 1] == 1, ids[s + 1 : s + width + 1], IGNORE_INDEX)
            assert targets[row, :width].tolist() == expected.tolist()
            # A dialogue's <|endoftext|> ends it: it is never an input, which it would be for a crossing row.
            assert END_OF_TEXT_ID not in inputs[row, :width].tolist()


def test_dialogue_batch_cuts_only_dialogues_longer_than_the_context():
    context = 8
    lengths = [context + 1, context + 2, 3]  # fits exactly, one token too long, short
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = np.arange(offsets[-1], dtype=np.uint16) + 10
    mask = np.ones(offsets[-1], dtype=np.uint8)
    for seed in range(5):
        inputs, targets = dialogue_batch(tokens, mask, offsets, [0, 1, 2], context, np.random.default_rng(seed))
        assert inputs.shape == (3, context)
        assert inputs[0].tolist() == tokens[:context].tolist()  # whole, not cut
        assert targets[0].tolist() == tokens[1 : context + 1].tolist()
        start = int(inputs[1, 0]) - int(tokens[offsets[1]])
        assert start in (0, 1)  # a window of context + 1 tokens inside the 10-token dialogue
        assert inputs[1].tolist() == tokens[offsets[1] + start : offsets[1] + start + context].tolist()
        assert targets[1].tolist() == tokens[offsets[1] + start + 1 : offsets[1] + start + context + 1].tolist()
        assert inputs[2, :2].tolist() == tokens[offsets[2] : offsets[2] + 2].tolist()
        assert (targets[2, 2:] == IGNORE_INDEX).all()


# --- checkpoints and resuming ----------------------------------------------------------------------


class Interrupted(Exception):
    """Stands in for a kill: raised from inside the training loop."""


def interrupt_at(sample_batch, stop_step):
    def interrupted(step, micro):
        if step == stop_step:
            raise Interrupted(f"stopped at step {step}")
        return sample_batch(step, micro)

    return interrupted


@pytest.fixture(scope="module", params=["adamw", "muon"])
def resume_runs(request, tmp_path_factory):
    """An uninterrupted 8-step run, and one interrupted at step 5 (checkpoint at 4) then resumed: with
    AdamW (its moments) and with Muon (its momentum, and AdamW's moments of the other parameters)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
        monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
        yield _resume_runs(tmp_path_factory, request.param)
    torch.set_num_threads(threads)


def _resume_runs(tmp_path_factory, optimizer):
    tokens = markov_chain(4000, seed=1)
    heldout = list(evaluation_windows(markov_chain(1000, seed=2), 2, 4, CONTEXT))
    schedule = "cosine" if optimizer == "adamw" else "wsd"
    params = train_params(steps=8, grad_accum=2, eval_every=4, log_every=2, optimizer=optimizer, schedule=schedule)
    sample_batch = chain_sampler(tokens, params)

    def evaluate(model):
        return {"val/loss": mean_loss(model, heldout, CPU)}

    straight_dir = tmp_path_factory.mktemp(f"straight-{optimizer}")
    resumed_dir = tmp_path_factory.mktemp(f"resumed-{optimizer}")
    straight = tiny_model(seed=0)
    straight_metrics = run_train(straight_dir, straight, params, sample_batch, evaluate)

    with pytest.raises(Interrupted):
        run_train(resumed_dir, tiny_model(seed=0), params, interrupt_at(sample_batch, 5), evaluate)
    with safe_open(resumed_dir / "checkpoint.safetensors", framework="pt") as f:
        interrupted_metadata = f.metadata()
    resumed = tiny_model(seed=99)  # a different initialisation: the weights must come from the checkpoint
    resumed_metrics = run_train(resumed_dir, resumed, params, sample_batch, evaluate)
    return {
        "straight": straight,
        "resumed": resumed,
        "interrupted_metadata": interrupted_metadata,
        "straight_metrics": straight_metrics,
        "resumed_metrics": resumed_metrics,
        "straight_dir": straight_dir,
        "resumed_dir": resumed_dir,
        "optimizer": optimizer,
    }


def test_an_interrupted_run_leaves_an_unfinished_checkpoint_at_the_last_checkpoint_step(resume_runs):
    metadata = resume_runs["interrupted_metadata"]
    assert (metadata["step"], metadata["complete"]) == ("4", "0")


def test_resumed_run_ends_with_the_bit_identical_weights_of_an_uninterrupted_run(resume_runs):
    assert_same_weights(resume_runs["resumed"].state_dict(), resume_runs["straight"].state_dict())
    assert_same_weights(
        load_file(resume_runs["resumed_dir"] / "model" / "model.safetensors"),
        load_file(resume_runs["straight_dir"] / "model" / "model.safetensors"),
    )


def test_checkpoints_hold_every_optimizer_state(resume_runs):
    names = load_file(resume_runs["straight_dir"] / "checkpoint.safetensors").keys()
    if resume_runs["optimizer"] == "muon":
        assert any(name.startswith("optimizer.muon.") and name.endswith(".momentum_buffer") for name in names)
    assert any(name.startswith("optimizer.adamw.") and name.endswith(".exp_avg_sq") for name in names)


def test_resumed_run_logs_the_same_history_as_an_uninterrupted_run(resume_runs):
    assert resume_runs["resumed_metrics"] == resume_runs["straight_metrics"]

    def history(run_dir):
        with safe_open(run_dir / "checkpoint.safetensors", framework="pt") as f:
            rows = json.loads(f.metadata()["history"])
        return [{k: v for k, v in row.items() if k != "train/tokens_per_second"} for row in rows]

    straight, resumed = history(resume_runs["straight_dir"]), history(resume_runs["resumed_dir"])
    assert [row["step"] for row in straight] == [2, 4, 6, 8]
    assert resumed == straight


def test_unfinished_checkpoint_from_different_params_is_an_error_naming_the_key(tmp_path):
    tokens = markov_chain(2000, seed=1)
    params = train_params(steps=8)
    with pytest.raises(Interrupted):
        run_train(tmp_path, tiny_model(), params, interrupt_at(chain_sampler(tokens, params), 3), checkpoint_every=2)
    changed = params.model_copy(update={"lr": 5e-3})
    with pytest.raises(TrainingError, match=r"train\.lr") as info:
        run_train(tmp_path, tiny_model(), changed, chain_sampler(tokens, changed))
    assert "unfinished" in str(info.value)


def test_unfinished_run_resumes_after_checkpoint_every_changes(tmp_path, capsys):
    tokens = markov_chain(2000, seed=1)
    params = train_params(steps=8)
    with pytest.raises(Interrupted):
        run_train(tmp_path, tiny_model(), params, interrupt_at(chain_sampler(tokens, params), 3), checkpoint_every=2)
    run_train(tmp_path, tiny_model(), params, chain_sampler(tokens, params), checkpoint_every=4)
    assert "resuming from step 2" in capsys.readouterr().out


def test_finished_checkpoint_is_not_resumed(tmp_path):
    tokens = markov_chain(2000, seed=1)
    params = train_params(steps=4)
    run_train(tmp_path, tiny_model(), params, chain_sampler(tokens, params))
    fresh = tiny_model(seed=5)
    optimizers = build_optimizers(fresh, params)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    identity = checkpoint_identity(fresh.config, params, 0, {"data": "chain"})
    assert resume_state(tmp_path / "checkpoint.safetensors", identity, fresh, optimizers) == (0, [])
    assert_same_weights(fresh.state_dict(), before)


def test_non_finite_loss_is_an_error_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    tokens = markov_chain(2000, seed=1)
    params = train_params(steps=8)
    model = tiny_model()
    forward = model.forward
    poisoned_from = 3

    def sample_batch(step, micro):
        model.poisoned = step >= poisoned_from
        return chain_sampler(tokens, params)(step, micro)

    def poisoned_forward(tokens, targets=None, **kwargs):
        logits, loss = forward(tokens, targets, **kwargs)
        return logits, (loss * float("inf") if model.poisoned and loss is not None else loss)

    model.forward = poisoned_forward
    with pytest.raises(TrainingError, match=rf"step {poisoned_from}\b"):
        run_train(tmp_path, model, params, sample_batch, checkpoint_every=2)
    checkpoint = tmp_path / "checkpoint.safetensors"
    with safe_open(checkpoint, framework="pt") as f:
        metadata = f.metadata()
    assert (metadata["step"], metadata["complete"]) == ("2", "0")
    assert all(torch.isfinite(t).all() for t in load_file(checkpoint).values())
    assert not (tmp_path / "model").exists()


# --- DDP on gloo -----------------------------------------------------------------------------------

DDP_STEPS = 4
DDP_CHECKPOINT_EVERY = 2


def ddp_setup(optimizer):
    """Model, params and sample_batch of the DDP comparison; masks leave the two halves of each
    micro-batch with different numbers of target tokens, so the per-process weighting matters."""
    params = train_params(
        steps=DDP_STEPS,
        batch_size=4,
        grad_accum=2,
        lr=3e-3,
        warmup_steps=1,
        optimizer=optimizer,
        log_every=2,
        eval_every=DDP_STEPS,
    )
    tokens = markov_chain(4000, seed=1)
    plain = chain_sampler(tokens, params)

    def sample_batch(step, micro):
        inputs, targets = plain(step, micro)
        targets = targets.clone()
        for row in range(len(targets)):
            targets[row, : 3 * row] = IGNORE_INDEX  # rows 0-1 (process 0) keep more targets than rows 2-3
        return inputs, targets

    return tiny_model(seed=4), params, sample_batch


def ddp_worker(out_dir, optimizer):
    """One process of the DDP run (under torchrun): trains, then writes its own final weights."""
    torch.set_num_threads(1)
    model, params, sample_batch = ddp_setup(optimizer)
    run_train(out_dir, model, params, sample_batch, checkpoint_every=DDP_CHECKPOINT_EVERY)
    save_file(
        {k: v.contiguous() for k, v in model.weights().items()}, Path(out_dir) / f"rank{os.environ['RANK']}.safetensors"
    )


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_two_gloo_processes_train_like_one_process_with_the_same_global_batch(tmp_path, optimizer):
    ddp_dir = tmp_path / "ddp"
    ddp_dir.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), "DVC_NO_ANALYTICS": "1"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        __file__,
        str(ddp_dir),
        optimizer,
    ]
    result = subprocess.run(command, cwd=ddp_dir, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    model, params, sample_batch = ddp_setup(optimizer)
    run_train(tmp_path / "single", model, params, sample_batch, checkpoint_every=DDP_CHECKPOINT_EVERY)
    single = model.weights()
    rank0, rank1 = load_file(ddp_dir / "rank0.safetensors"), load_file(ddp_dir / "rank1.safetensors")
    assert_same_weights(rank0, rank1)  # the replicas stay in step
    assert_same_weights(load_file(ddp_dir / "model" / "model.safetensors"), rank0)  # rank 0 saved the model
    initial = tiny_model(seed=4).weights()
    for name, tensor in single.items():
        torch.testing.assert_close(rank0[name], tensor, rtol=0, atol=1e-5, msg=f"tensor {name}")
        assert not torch.equal(tensor, initial[name]), f"tensor {name} did not train"


if __name__ == "__main__":
    ddp_worker(sys.argv[1], sys.argv[2])
