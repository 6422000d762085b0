"""Stage pretrain: train the model from scratch on the token arrays; resumes from its checkpoint.

usage: python -m stages.pretrain TOKENS_DIR CHECKPOINT OUT_MODEL_DIR LIVE_DIR
(several processes or GPUs: torchrun --nproc_per_node N -m stages.pretrain ...)
"""

import torch

from model.batches import batch_rng, pretraining_batch
from model.errors import run_stage
from model.evaluation import heldout_evaluator
from model.gpt import GPT, GPTConfig
from model.params import load_params
from model.token_arrays import load_meta, load_tokens
from model.training import RunPaths, TrainingError, checkpoint_identity, train


def main(token_dir, checkpoint, out_dir, live_dir):
    params = load_params()
    train_params, context_length = params.pretrain, params.model.context_length
    config = GPTConfig(**params.model.model_dump(), vocab_size=load_meta(token_dir)["vocab_size"])
    tokens = load_tokens(token_dir, "train")
    if len(tokens) <= context_length:
        raise TrainingError(
            f"model.context_length = {context_length} is longer than the training data ({len(tokens)} tokens)"
        )
    evaluate = heldout_evaluator(token_dir, context_length, train_params.batch_size, train_params.eval_batches)

    def sample_batch(step, micro):
        return pretraining_batch(tokens, batch_rng(params.seed, step, micro), train_params.batch_size, context_length)

    torch.manual_seed(params.seed)
    model = GPT(config)
    model.init_weights(train_params.init)
    print(f"pretrain: {model.num_parameters() / 1e6:.2f}M parameters")
    identity = checkpoint_identity(config, train_params, params.seed, load_meta(token_dir))
    train(
        model,
        train_params,
        sample_batch=sample_batch,
        evaluate=evaluate,
        paths=RunPaths(checkpoint, live_dir, out_dir),
        identity=identity,
        unique_tokens=len(tokens),
        checkpoint_every=params.checkpoint_every.pretrain,
        desc="pretrain",
    )


if __name__ == "__main__":
    run_stage(main)
