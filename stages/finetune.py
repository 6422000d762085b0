"""Stage finetune: teach the pretrained model the chat format, with loss on assistant replies only.

usage: python -m stages.finetune TOKENS_DIR PRETRAINED_DIR CHECKPOINT OUT_MODEL_DIR LIVE_DIR
"""

import hashlib
from pathlib import Path

from model.batches import batch_rng, dialogue_batch
from model.errors import run_stage
from model.evaluation import dialog_evaluator
from model.gpt import load_model
from model.params import load_params
from model.token_arrays import check_same_vocabulary, load_dialogues, load_meta
from model.training import RunPaths, checkpoint_identity, train


def main(token_dir, pretrained_dir, checkpoint, out_dir, live_dir):
    params = load_params()
    train_params = params.finetune
    model = load_model(pretrained_dir)
    check_same_vocabulary(load_meta(token_dir)["vocab_size"], token_dir, model.config, pretrained_dir)
    context_length = model.config.context_length
    tokens, mask, offsets = load_dialogues(token_dir, "train")
    evaluate = dialog_evaluator(
        token_dir, "validation", context_length, train_params.batch_size, train_params.eval_batches
    )

    def sample_batch(step, micro):
        rng = batch_rng(params.seed, step, micro)
        picks = rng.integers(0, len(offsets) - 1, size=train_params.batch_size)
        return dialogue_batch(tokens, mask, offsets, picks, context_length, rng)

    base = hashlib.sha256(Path(pretrained_dir, "model.safetensors").read_bytes()).hexdigest()
    identity = checkpoint_identity(
        model.config, train_params, params.seed, {"tokens": load_meta(token_dir), "base": base}
    )
    train(
        model,
        train_params,
        sample_batch=sample_batch,
        evaluate=evaluate,
        paths=RunPaths(checkpoint, live_dir, out_dir),
        identity=identity,
        unique_tokens=len(tokens),
        checkpoint_every=params.checkpoint_every.finetune,
        desc="finetune",
    )


if __name__ == "__main__":
    run_stage(main)
